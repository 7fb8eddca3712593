r"""The dypo_jax entry point: one linear run in named phases.

  python -m dypo_jax.main --config=experiments/cpu_tiny.py --workdir=/tmp/dypo_tiny
  python -m dypo_jax.main --config=experiments/cpu_tiny.py:quick --config.rl.alpha=0.8
  python -m dypo_jax.main --config=experiments/cpu_tiny.py --mode=summary

Phases: config -> host -> distributed -> workdir lock -> mesh -> data -> tokenizer -> model ->
base model -> train -> report.

Rerunning with the same --workdir resumes from its latest checkpoint (SIGTERM saves one and
exits); `python -m dypo_jax.tools.export --workdir=W --out=DIR` writes a checkpoint's policy as a
Hugging Face directory. Several processes (one per host; here two on one machine) join one run with
  --config.distributed.coordinator_address=127.0.0.1:12345 --config.distributed.num_processes=2
  --config.distributed.process_id=0   (and =1 in the second process)
(on a TPU pod, `--config.distributed.initialize=always` lets JAX find the coordinator itself).

Exit status: 0 done; 1 an error; 2 bad input (a config key or value, a flag, a data, tokenizer
or checkpoint file: one paragraph names it; `--verbose` or DYPO_JAX_TRACEBACK=1 adds the
traceback); 3 nothing left to learn (`train.max_empty_updates` empty updates in a row, checkpoint
saved); 4 too many non-finite updates (`train.max_nonfinite_updates`; the last good checkpoint is
kept); 5 another live run holds the workdir (`workdir/run.lock` names it); 6 the workdir has
checkpoints and none reads back (nothing was moved aside; the run did not start over); 7 the
workdir's lock was taken over by another run (this one was frozen past
`train.workdir_lock_stale_s`, or its heartbeat kept failing that long): it stopped before its
next write; 69 the storage kept failing for `train.storage_retry_s` (the path is named; rerun
once it is back); 74 no space left where the run writes (the failing save is named; the last
complete checkpoint is kept; free space and run the command again); 75 preempted (SIGTERM or SIGINT: a checkpoint was
saved at a step boundary, no final table; run the command again).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dypo_jax import config as config_lib
from dypo_jax import errors
from dypo_jax.io import lock as workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/cpu_tiny.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and plots go.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Config keys a resumed run may change although they change what "
    "it computes (e.g. optim.learning_rate,rl.alpha); without them such a resume is refused.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "summary"],
                          "train: the full run; summary: build everything, print, exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On bad input or a full disk, print the traceback "
                             f"too (as {errors.TRACEBACK_ENV}=1 does).")


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir (a folder or a bucket URL) and proves it writable, or says which path
  refuses and why."""
  from dypo_jax.io import paths  # pylint: disable=g-import-not-at-top
  probe = paths.join(workdir, f".write_test.{os.getpid()}")
  try:
    paths.makedirs(workdir)
    paths.write_bytes(probe, b"ok")
    paths.remove(probe)
  except (OSError, ImportError) as e:
    from dypo_jax.io import storage  # pylint: disable=g-import-not-at-top
    if errors.disk_full(e):
      raise
    if paths.is_remote(workdir) and storage.store_failed(e):
      raise errors.StorageUnavailable(f"--workdir={workdir}: the storage failed (retried for "
                                      f"train.storage_retry_s): {storage.first_line(e)}") from e
    why = getattr(e, "strerror", None) or e
    where = getattr(e, "filename", None) or workdir
    raise errors.BadInput(f"--workdir={workdir}: cannot write there ({why}: {where}); choose a "
                          "writable folder (a gs:// workdir needs the gcs extra: pip install "
                          "'dypo_jax[gcs]')") from e


def main(argv):
  del argv
  errors.shorten_disk_full_logs()
  # Phase: config, validated whole before anything is built.
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/cpu_tiny.py")
  config_lib.validate(config)
  workdir = _WORKDIR.value or config.workdir or "workdir"
  from dypo_jax.io import storage  # pylint: disable=g-import-not-at-top
  storage.bound_client_retries(config.train.storage_retry_s, tensorstore=False)  # No JAX yet.
  errors.shorten_disk_full_logs(storage.store_failed)
  _prepare_workdir(workdir)

  # JAX is imported after validation: a bad config fails in a second, not after JAX starts.
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import host  # pylint: disable=g-import-not-at-top

  # Phase: host (a CPU split into devices, programs on the calling thread, the compilation
  # cache), before JAX starts.
  host.configure_host(config.mesh)
  cache = host.configure_compilation_cache(config.compile_cache, workdir)
  print(f"compile cache: {cache or 'off'}", flush=True)
  # Phase: distributed.
  host.maybe_initialize_distributed(config.distributed)
  # Phase: workdir lock (one run per workdir; process 0 holds it).
  lock = (workdir_lock.WorkdirLock(workdir, stale_after_s=config.train.workdir_lock_stale_s)
          .acquire() if jax.process_index() == 0 else None)
  try:
    _run_phases(config, workdir, lock)
  except BaseException:
    if lock is not None:
      try:
        lock.release()
      except Exception as e:  # pylint: disable=broad-except  # Storage gone: say what stopped.
        print(f"workdir: WARNING the lock was not released: {e}", file=sys.stderr, flush=True)
    raise
  if lock is not None:
    lock.check_held()  # Taken over while it wrote its report: say so (exit 7), not a clean end.
    lock.release()


def _run_phases(config, workdir: str, lock) -> None:
  """The phases that follow the lock (`lock`: process 0's, checked before every write)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import host  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  # Phase: mesh.
  mesh = sharding.build_mesh(config.mesh)
  host.keep_host_heap(config.mesh)  # CPU: XLA's per-step temporaries reuse resident pages.
  # Phase: data and tokenizer.
  pools = build.build_data(config, workdir)
  tokenizer = build.build_tokenizer(config, workdir, pools)
  # Phase: model (born sharded, or read from a Hugging Face directory).
  model = build.build_model(config, mesh, tokenizer)
  if config.pretrain.enabled and _MODE.value == "train":
    # Phase: base model (teacher SFT to an accuracy gate, saved and reused).
    from dypo_jax.rl import pretrain  # pylint: disable=g-import-not-at-top
    model = pretrain.ensure_base(config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
                                 model=model, pools=pools, options=build.model_options(config),
                                 lock=lock)
  if jax.process_index() == 0:
    print(build.summary(config, mesh, tokenizer, model, pools), flush=True)
  if _MODE.value == "summary":
    return
  # Phase: train.
  from dypo_jax.rl import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  trainer_lib.Trainer(config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, model=model,
                      pools=pools, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                      lock=lock).run()
  if jax.process_index() == 0:
    if lock is not None:
      lock.check_held()
    # Phase: report (plots and the final table of base vs trained accuracy).
    from dypo_jax.io import report  # pylint: disable=g-import-not-at-top
    print(report.write_report(workdir), flush=True)


def _check_config_file(argv: list[str]) -> None:
  """A --config that names no file is a sentence, not ml_collections' traceback."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        raise config_lib.ConfigError(f"{arg}: there is no experiment file {path!r} (from "
                                     f"{os.getcwd()}); e.g. --config=experiments/cpu_tiny.py")


def _workdir_flag() -> str:
  """--workdir as given (the parsed flag, or the raw argument if parsing never happened)."""
  try:
    return _WORKDIR.value or "(config.workdir)"
  except flags.UnparsedFlagAccessError:
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir=")), "?")


def run():
  verbose = "--verbose" in sys.argv[1:]
  errors.set_verbose(verbose)
  errors.quiet_background_errors()
  try:
    _check_config_file(sys.argv[1:])
    config_lib.check_override_keys(sys.argv[1:])
  except config_lib.ConfigError as e:
    errors.exit_with("config error", e, errors.EXIT_BAD_INPUT, verbose=verbose)
  try:
    app.run(main, flags_parser=config_lib.parse_flags)
  except config_lib.ConfigError as e:
    errors.exit_with("config error", e, errors.EXIT_BAD_INPUT, verbose=verbose)
  except errors.BadInput as e:
    errors.exit_with("input error", e, errors.EXIT_BAD_INPUT, verbose=verbose)
  except workdir_lock.WorkdirLocked as e:
    print(f"workdir: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_WORKDIR_LOCKED)
  except errors.LockLost as e:  # Another run holds the workdir now: this one wrote nothing more.
    errors.exit_with("workdir: lock lost", e, errors.EXIT_LOCK_LOST, verbose=verbose, now=True)
  except errors.Preempted as e:  # Saved: a scheduler or wrapper should run the command again.
    print(f"train: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_PREEMPTED)
  except errors.NothingToLearn as e:
    print(f"training stopped: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_NOTHING_TO_LEARN)
  except FloatingPointError as e:  # Too many non-finite updates (train.max_nonfinite_updates).
    print(f"training stopped: {e}", file=sys.stderr)
    sys.exit(errors.EXIT_NONFINITE)
  except errors.CheckpointsUnreadable as e:
    errors.exit_with("resume", e, errors.EXIT_CHECKPOINTS_UNREADABLE, verbose=verbose)
  except errors.StorageUnavailable as e:  # A wrapper may rerun once the store is back.
    errors.exit_with("storage unavailable", e, errors.EXIT_STORAGE_UNAVAILABLE, verbose=verbose,
                     now=True)
  except Exception as e:  # pylint: disable=broad-except
    from dypo_jax.io import storage  # pylint: disable=g-import-not-at-top
    if not errors.disk_full(e) and storage.store_failed(e):
      errors.exit_with(f"storage unavailable: --workdir={_workdir_flag()}: the storage kept "
                       "failing (retried for train.storage_retry_s); rerun the same command once "
                       "it is back. The failed operation", e, errors.EXIT_STORAGE_UNAVAILABLE, verbose=verbose,
                       now=True)
    if not errors.disk_full(e):
      raise
    errors.exit_with(
        "disk full: no space left where the run writes; every checkpoint that was complete is "
        "kept (an unfinished one is never read). Free space and run the same command to resume. "
        "The failed write", e, errors.EXIT_DISK_FULL, verbose=verbose, now=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  run()
