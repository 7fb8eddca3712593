"""dypo_jax.rl.program: one builder of the update's state, shardings and jit, for the Trainer
(real arrays) and for tools.aot (abstract ones), so the AOT check compiles the program a run
runs. On CPU devices here; tests/tools/test_aot.py does the same for TPU topologies when libtpu is
installed."""
import jax
import numpy as np
import pytest

from dypo_jax.parallel import sharding
from dypo_jax.tools import aot
import tiny_runs


@pytest.mark.slow
def test_aot_compiles_the_trainers_update_and_sampler_from_abstract_inputs():
  config = tiny_runs.tiny_config()
  mesh = sharding.build_mesh(config.mesh)
  train, generate = aot.compile_programs(config, mesh, ("train", "generate"))
  for report in (train, generate):
    assert not report.error, report.error
    assert min(report.argument, report.output, report.total) > 0 and report.flops > 0, report
  assert train.alias > 0, train  # The TrainState is donated, as the Trainer donates it.
  assert train.shapes.startswith("U=4 K=4 L="), train


@pytest.mark.slow
def test_abstract_state_has_the_trainers_shapes_and_shardings(tmp_path):
  trainer = tiny_runs.build_trainer(tiny_runs.tiny_config(), str(tmp_path))
  abstract = trainer.program.abstract_state(trainer.run_state.train.params)
  real = jax.tree.leaves(trainer.run_state.train)
  assert len(jax.tree.leaves(abstract)) == len(real)
  for a, r in zip(jax.tree.leaves(abstract), real):
    assert (a.shape, a.dtype) == (r.shape, r.dtype)
    assert a.sharding.is_equivalent_to(r.sharding, r.ndim)
  batch = trainer.program.abstract_batch(items=4)
  assert batch["tokens"].shape == (4, trainer.k, trainer.prompt_len + trainer.max_len)
  assert np.dtype(batch["input_mask"].dtype) == np.bool_
