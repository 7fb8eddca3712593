"""Tests for dypo_jax.io.checkpoint: round trips, retention, atomicity, errors, resharding, SIGTERM."""
import glob
import os
import signal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dypo_jax.io import checkpoint
from dypo_jax.models import ModelConfig
from dypo_jax.models import Transformer
from dypo_jax.rl.queues import HardItem
from dypo_jax.rl.queues import QueueSet

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of a step directory being written.


def _train_state(seed=0):
  """params (an nnx.State), adam state, step and rng key data, as the trainer will hold them."""
  config = ModelConfig(vocab_size=32, embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8,
                       mlp_dim=32)
  _, params = nnx.split(Transformer(config, rngs=nnx.Rngs(seed)), nnx.Param)
  opt_state = optax.adam(1e-3).init(params)
  # One optimizer update so that mu / nu / count are not all zeros.
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = optax.adam(1e-3).update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(seed, jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed))}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_save_restore_nnx_state_optax_state_and_extras(tmp_path):
  state = _train_state(3)
  extras = {"data": {"epoch": 1, "index": 17}, "eval": [{"step": 3, "id/pass@1": 0.25}],
            "config": {"rl": {"alpha": 0.5}}, "counters": {"hard": 4}}
  queues = QueueSet()
  queues.push_hard(HardItem(uid="q1", prompt_tokens=[1, 2], teacher="r1", teacher_index=1,
                            response_tokens=[3, 4, 2], step=3))
  with checkpoint.Checkpointer(str(tmp_path), keep=3) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state=state, extras=extras, queues=queues.to_bytes())
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    assert not ckpt.save(3, state=_train_state(4), extras={})  # Never overwritten.
  with checkpoint.Checkpointer(str(tmp_path), keep=3) as ckpt:  # As after a restart.
    assert ckpt.latest_step() == 3
    restored, restored_extras = ckpt.restore(abstract_state=checkpoint.abstract_like(state))
    queue_bytes = ckpt.restore_queues(3)
  assert queue_bytes == queues.to_bytes()
  assert QueueSet.from_bytes(queue_bytes).hard[0].uid == "q1"
  assert isinstance(restored["params"], nnx.State)
  _assert_trees_equal(restored, state)
  assert restored_extras == extras


def test_keep_2_keeps_the_last_two_and_async_save_then_wait(tmp_path):
  state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.asarray(0)}
  with checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=True) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, state={**state, "step": jnp.asarray(step)}, extras={"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.restore_queues(4) is None  # No queues were saved.
    for step in (3, 4):
      restored, extras = ckpt.restore(step, abstract_state=checkpoint.abstract_like(state))
      assert int(restored["step"]) == step and extras == {"step": step}
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_half_written_tmp_dir_is_ignored(tmp_path):
  state = {"w": jnp.arange(6.0)}
  with checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False) as ckpt:
    ckpt.save(1, state=state, extras={"ok": True})
  # What kill -9 during the save of step 5 leaves: an unfinalised directory with partial items.
  tmp_dir = tmp_path / f"5{_TMP_SUFFIX}"
  (tmp_dir / f"state{_TMP_SUFFIX}").mkdir(parents=True)
  (tmp_dir / f"state{_TMP_SUFFIX}" / "partial").write_bytes(b"\x00" * 10)
  (tmp_path / f"6{_TMP_SUFFIX}-1234567").mkdir()  # The timestamped form of other versions.
  with checkpoint.Checkpointer(str(tmp_path), keep=3, read_only=True) as reader:
    assert reader.all_steps() == [1]  # Ignored (and left alone) by a read-only reader.
  assert tmp_dir.exists()
  with checkpoint.Checkpointer(str(tmp_path), keep=3) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    _, extras = ckpt.restore(abstract_state=checkpoint.abstract_like(state))
    assert extras == {"ok": True}
    with pytest.raises(FileNotFoundError, match="step 5"):
      ckpt.restore(5, abstract_state=checkpoint.abstract_like(state))
  assert os.listdir(tmp_path) == ["1"]  # A writable Checkpointer cleans such leftovers up.


@pytest.mark.slow
def test_killed_during_async_save_leaves_previous_checkpoint(tmp_path, fake_devices):
  # A real kill: the process exits (no cleanup, no wait) right after starting an async save.
  fake_devices(f"""
      import os
      import jax.numpy as jnp
      from dypo_jax.io import checkpoint
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, keep=3, async_save=True)
      ckpt.save(1, state={{"w": jnp.zeros((4,))}}, extras={{"step": 1}})
      ckpt.wait()
      ckpt.save(2, state={{"w": jnp.ones((4_000_000,))}}, extras={{"step": 2}})
      os._exit(0)
  """, num_devices=1, timeout=120)
  left = sorted(os.listdir(tmp_path))
  assert left[0] == "1" and left[1].startswith("2" + _TMP_SUFFIX), left  # Step 2 was cut short.
  with checkpoint.Checkpointer(str(tmp_path), keep=3) as ckpt:
    assert ckpt.all_steps() == [1]
    restored, extras = ckpt.restore(
        abstract_state={"w": jax.ShapeDtypeStruct((4,), jnp.float32,
                                                  sharding=jax.sharding.SingleDeviceSharding(
                                                      jax.devices()[0]))})
  assert extras == {"step": 1} and not np.asarray(restored["w"]).any()


def test_missing_directory_and_step_raise_file_not_found(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    checkpoint.Checkpointer(str(missing), keep=2, read_only=True)
  state = {"w": jnp.zeros(3)}
  with checkpoint.Checkpointer(str(tmp_path / "empty"), keep=2) as ckpt:
    with pytest.raises(FileNotFoundError, match="no finalised checkpoint"):
      ckpt.restore(abstract_state=checkpoint.abstract_like(state))
    ckpt.save(2, state=state, extras={})
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available: \[2\]"):
      ckpt.restore(7, abstract_state=checkpoint.abstract_like(state))


@pytest.mark.parametrize("damage", ["truncate_data", "delete_extras", "queues_payload"])
def test_corrupt_checkpoint_raises_value_error_naming_step_dir(tmp_path, damage):
  state = {"w": jnp.arange(100.0).reshape(10, 10), "b": jnp.ones(3, jnp.int32)}
  with checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False) as ckpt:
    ckpt.save(4, state=state, extras={"a": 1}, queues=b"queue bytes")
  step_dir = os.path.join(str(tmp_path), "4")
  if damage == "truncate_data":
    data_files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                       recursive=True) if os.path.isfile(f)]
    assert data_files
    for f in data_files:
      os.truncate(f, 4)
  elif damage == "delete_extras":
    for f in glob.glob(os.path.join(step_dir, "extras", "*")):
      os.remove(f)
  else:
    path = glob.glob(os.path.join(step_dir, "queues", "*"))[0]
    text = open(path).read()
    with open(path, "w") as f:
      f.write(text.replace('"nbytes": 11', '"nbytes": 12'))
  with checkpoint.Checkpointer(str(tmp_path), keep=2) as ckpt:
    assert ckpt.latest_step() == 4
    with pytest.raises(ValueError, match=step_dir):
      if damage == "queues_payload":
        ckpt.restore_queues(4)
      else:
        ckpt.restore(4, abstract_state=checkpoint.abstract_like(state))


def test_save_rejects_non_json_extras(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path), keep=2) as ckpt:
    with pytest.raises(ValueError, match=r"extras\['counters'\]\['hard'\] \(a int64\)"):
      ckpt.save(1, state={"w": jnp.zeros(2)}, extras={"counters": {"hard": np.int64(3)}})
    assert ckpt.all_steps() == []


def test_abstract_like_keeps_shardings_and_names_bad_leaves():
  x = jnp.zeros((2, 3), jnp.bfloat16)
  abstract = checkpoint.abstract_like({"x": x, "n": np.zeros(4, np.int32)})
  assert abstract["x"].shape == (2, 3) and abstract["x"].dtype == jnp.bfloat16
  assert abstract["x"].sharding == x.sharding
  assert abstract["n"].dtype == np.int32
  with pytest.raises(ValueError, match=r"\['step'\]"):
    checkpoint.abstract_like({"step": 3})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_handlers_call_the_callback(sig):
  calls = []
  previous = checkpoint.install_stop_handlers(lambda: calls.append("saved"))
  try:
    os.kill(os.getpid(), sig)  # The handler runs before the next bytecode.
    assert calls == ["saved"]
    assert set(previous) == {signal.SIGTERM, signal.SIGINT}
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


@pytest.mark.slow
def test_restore_onto_a_different_mesh_reshards(tmp_path, fake_devices):
  out = fake_devices(f"""
      import jax
      import jax.numpy as jnp
      import numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from dypo_jax.io import checkpoint
      auto = jax.sharding.AxisType.Auto
      mesh4 = jax.make_mesh((4,), ("data",), axis_types=(auto,))
      w = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
      state = {{"w": jax.device_put(w, NamedSharding(mesh4, P("data", None))),
                "v": jax.device_put(jnp.arange(4), NamedSharding(mesh4, P("data"))),
                "step": jax.device_put(jnp.asarray(9), NamedSharding(mesh4, P()))}}
      with checkpoint.Checkpointer({str(tmp_path)!r}, keep=1) as ckpt:
        ckpt.save(9, state=state, extras={{"x": 1}})
      mesh22 = jax.make_mesh((2, 2), ("a", "b"), axis_types=(auto, auto))
      target = {{"w": NamedSharding(mesh22, P("a", "b")), "v": NamedSharding(mesh22, P()),
                 "step": NamedSharding(mesh22, P())}}
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              state, target)
      with checkpoint.Checkpointer({str(tmp_path)!r}, keep=1) as ckpt:
        restored, extras = ckpt.restore(abstract_state=abstract)
      assert extras == {{"x": 1}}
      for k in state:
        assert restored[k].sharding == target[k], (k, restored[k].sharding)
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
      shard_shapes = {{s.data.shape for s in restored["w"].addressable_shards}}
      assert shard_shapes == {{(4, 3)}}, shard_shapes
      print("RESHARD_OK")
  """, num_devices=4, timeout=300)
  assert "RESHARD_OK" in out
