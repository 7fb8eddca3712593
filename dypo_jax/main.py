r"""The dypo_jax entry point: one linear run in named phases.

  python -m dypo_jax.main --config=experiments/cpu_tiny.py --workdir=/tmp/dypo_tiny
  python -m dypo_jax.main --config=experiments/cpu_tiny.py:quick --config.rl.alpha=0.8
  python -m dypo_jax.main --config=experiments/cpu_tiny.py --mode=summary

Phases: flags -> config -> platform -> distributed -> mesh -> data -> tokenizer -> model ->
(train | summary).

Rerunning with the same --workdir resumes from its latest checkpoint (SIGTERM saves one and
exits); `python -m dypo_jax.export --workdir=W --out=DIR` writes a checkpoint's policy as a Hugging
Face directory. Several processes (one per host; here two on one machine) join one run with
  --config.distributed.coordinator_address=127.0.0.1:12345 --config.distributed.num_processes=2
  --config.distributed.process_id=0   (and =1 in the second process)
(on a TPU pod, `--config.distributed.initialize=always` lets JAX find the coordinator itself).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dypo_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/cpu_tiny.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and plots go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "summary"],
                          "train: the full run; summary: build everything, print, exit.")


def main(argv):
  del argv
  # Phase: config. Validated whole before anything is built.
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/cpu_tiny.py")
  config_lib.validate(config)
  workdir = _WORKDIR.value or config.workdir or "workdir"
  os.makedirs(workdir, exist_ok=True)

  # Imports after validation: a bad config fails in a second, not after JAX starts.
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax import runtime  # pylint: disable=g-import-not-at-top

  # Phase: platform (a CPU host split into devices, programs run on the calling thread), before
  # JAX starts its backend.
  runtime.configure_host(config.mesh)
  # Phase: distributed.
  runtime.maybe_initialize_distributed(config.distributed)
  # Phase: mesh.
  mesh = runtime.build_mesh(config.mesh)
  runtime.keep_host_heap(config.mesh)  # CPU: XLA's per-step temporaries reuse resident pages.
  # Phase: data and tokenizer.
  pools = runtime.build_data(config, workdir)
  tokenizer = runtime.build_tokenizer(config, workdir, pools)
  # Phase: model (born sharded, or read from a Hugging Face directory).
  model = runtime.build_model(config, mesh, tokenizer)
  if config.pretrain.enabled and _MODE.value == "train":
    # Phase: base model (teacher SFT to an accuracy gate, saved and reused).
    from dypo_jax import pretrain  # pylint: disable=g-import-not-at-top
    model = pretrain.ensure_base(config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                                 model=model, pools=pools)
  if jax.process_index() == 0:
    print(runtime.summary(config, mesh, tokenizer, model, pools), flush=True)
  if _MODE.value == "summary":
    return
  # Phase: train.
  from dypo_jax import trainer  # pylint: disable=g-import-not-at-top
  trainer.run(config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, model=model, pools=pools)
  if jax.process_index() == 0:
    # Phase: report (plots and the final table of base vs trained accuracy).
    from dypo_jax import report  # pylint: disable=g-import-not-at-top
    print(report.write_report(workdir), flush=True)


def run():
  try:
    config_lib.check_override_keys(sys.argv[1:])
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  try:
    app.run(main)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except FloatingPointError as e:  # Too many non-finite updates (train.max_nonfinite_updates).
    sys.exit(f"training stopped: {e}")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  run()
