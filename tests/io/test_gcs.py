"""A `gs://` workdir against a GCS API on loopback (tests/gcs_emulator.py): the path layer, the
workdir lock, and a run killed with -9 and resumed that equals an uninterrupted run."""
import copy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dypo_jax import errors
from dypo_jax.io import metrics as metrics_lib
from dypo_jax.io import paths
import tiny_runs

# Skip without importing: gcsfs reads its settings (environment()) when first imported.
if importlib.util.find_spec("gcsfs") is None or importlib.util.find_spec(
    "gcp_storage_emulator") is None:
  pytest.skip("needs the gcs and test extras (gcsfs, gcp-storage-emulator)",
              allow_module_level=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _plain_gcsfs(previous=None):
  """Makes `gs://` use gcsfs' plain JSON-API client (or `previous`) and forgets cached clients.

  `import gcsfs` picks its class once, from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at that moment: an
  import before the fixture set it gives the "extended" class, whose bucket-type probe over gRPC
  waits 60 s a call against the emulator. A cached client also keeps the endpoint it was made with.
  Returns the class that was registered before."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top
  before = fsspec.get_filesystem_class("gs")
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, previous or gcsfs.core.GCSFileSystem, clobber=True)
  before.clear_instance_cache()
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  return before


@pytest.fixture(scope="module")
def bucket():
  """gs://bucket served on 127.0.0.1; this process and its subprocesses pointed at it."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(tiny_runs.TESTS, "gcs_emulator.py"),
                           str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  assert proc.stdout.readline().strip() == "ready"
  saved = {k: os.environ.get(k) for k in gcs_emulator.environment(port)}
  os.environ.update(gcs_emulator.environment(port))
  import fsspec  # pylint: disable=g-import-not-at-top
  saved_conf = copy.deepcopy(fsspec.config.conf)
  fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read FSSPEC_* at import, before us.
  registered = _plain_gcsfs()
  try:
    yield "gs://bucket"
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved_conf)
    _plain_gcsfs(registered)
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_the_path_layer_on_a_bucket(bucket, tmp_path):
  root = f"{bucket}/layer"
  paths.makedirs(root)
  paths.write_text(paths.join(root, "a.txt"), "one")
  assert paths.read_bytes(paths.join(root, "a.txt")).decode() == "one"
  assert paths.isfile(paths.join(root, "a.txt")) and paths.isdir(root)
  # Exclusive create: the second creator loses.
  assert paths.create_exclusive(paths.join(root, "lock"), b"first")
  assert not paths.create_exclusive(paths.join(root, "lock"), b"second")
  assert paths.read_bytes(paths.join(root, "lock")) == b"first"
  # Folders move (copy, then delete) and round-trip through local disk.
  local = tmp_path / "tree"
  (local / "sub").mkdir(parents=True)
  (local / "x.bin").write_bytes(b"\0\1")
  (local / "sub" / "y.txt").write_text("y")
  paths.upload_tree(str(local), paths.join(root, "tree"), last=("x.bin",))
  paths.move_tree(paths.join(root, "tree"), paths.join(root, "moved"))
  assert not paths.exists(paths.join(root, "tree"))
  assert paths.listdir(paths.join(root, "moved")) == ["sub", "x.bin"]
  copy = paths.local_copy(paths.join(root, "moved"), cache=str(tmp_path / "cache"))
  assert open(os.path.join(copy, "sub", "y.txt")).read() == "y"
  # Metrics: staged locally, uploaded whole, read back by the next writer.
  with metrics_lib.MetricsWriter(f"{root}/run") as writer:
    writer.write(1, {"loss": 1.5})
  with metrics_lib.MetricsWriter(f"{root}/run") as writer:
    writer.write(2, {"loss": float("nan")})
  records = metrics_lib.read_jsonl(f"{root}/run/metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]
  assert paths.listdir(f"{root}/run/tb")


@pytest.mark.slow
def test_the_workdir_lock_on_a_bucket(bucket):
  from dypo_jax.io import lock as lock_lib  # pylint: disable=g-import-not-at-top
  workdir = f"{bucket}/locked"
  path = f"{workdir}/{lock_lib.LOCK_FILENAME}"
  first = lock_lib.WorkdirLock(workdir, heartbeat_s=0.05, settle_s=0).acquire()
  try:
    with pytest.raises(lock_lib.WorkdirLocked, match="in use by another run"):
      lock_lib.WorkdirLock(workdir, settle_s=0).acquire()
    first.check_held()
    # A stale lock is taken over through a claim object, which goes once the lock is replaced.
    stale = {"host": "pod-worker-7", "pid": 1, "start": 0.0, "heartbeat": time.time() - 3600}
    paths.write_text(path, json.dumps(stale))
    with lock_lib.WorkdirLock(workdir, stale_after_s=60, settle_s=0) as second:
      assert json.loads(paths.read_bytes(path).decode())["token"] == second.holder["token"]
      assert paths.listdir(workdir) == [lock_lib.LOCK_FILENAME]
      time.sleep(0.3)  # The first run's heartbeats find another token: they never overwrite it.
      assert json.loads(paths.read_bytes(path).decode())["token"] == second.holder["token"]
      with pytest.raises(errors.LockLost, match="now held by process"):
        first.check_held()
  finally:
    first.release()
  assert not paths.exists(path)
  # A run that lost the lock closes its logs without uploading them over the new holder's.
  paths.write_text(f"{workdir}/metrics.jsonl", '{"step": 7}\n')
  writer = metrics_lib.MetricsWriter(workdir)
  writer.write(8, {"loss": 1.0})
  writer.close(sync=False)
  assert paths.read_bytes(f"{workdir}/metrics.jsonl").decode() == '{"step": 7}\n'
  paths.write_text(f"{path}/inside", "x")  # run.lock as a "folder" (a name prefix).
  with pytest.raises(errors.BadInput, match="is a directory"):
    lock_lib.WorkdirLock(workdir, settle_s=0).acquire()


def _start(workdir: str, **overrides) -> subprocess.Popen:
  return subprocess.Popen(tiny_runs.main_command(workdir, **overrides), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=tiny_runs.subprocess_env(),
                          cwd=tiny_runs.REPO)


def _complete_steps(workdir: str) -> list[int]:
  """Steps Orbax has finalised: in a bucket a step's folder exists from its first write, and
  `commit_success.txt` marks it complete."""
  root = f"{workdir}/checkpoints"
  if not paths.exists(root):
    return []
  return sorted(int(n) for n in paths.listdir(root)
                if n.isdigit() and paths.exists(f"{root}/{n}/commit_success.txt"))


def _complete_steps_in(fs, workdir: str) -> list[int]:
  """`_complete_steps` through a given gcsfs client (`workdir` without the gs:// prefix)."""
  root = f"{workdir}/checkpoints"
  if not fs.exists(root):
    return []
  names = [name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(root, detail=False)]
  return sorted(int(n) for n in names
                if n.isdigit() and fs.exists(f"{root}/{n}/commit_success.txt"))


@pytest.mark.slow
def test_a_gs_workdir_survives_kill_9_and_refuses_a_second_run(bucket, reference_run):
  run = {"train.num_steps": tiny_runs.REFERENCE_RUN["train.num_steps"],
         "train.checkpoint_every": 1}
  reference = reference_run  # The same run on local disk.

  workdir = f"{bucket}/killed"
  first = _start(workdir, **run)
  try:
    deadline = time.monotonic() + 120
    while not paths.exists(f"{workdir}/run.lock"):
      assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
      time.sleep(0.2)
    # A second run on the live workdir refuses, naming the holder.
    second = _start(workdir, **run)
    out, err = second.communicate(timeout=300)
    assert second.returncode == errors.EXIT_WORKDIR_LOCKED, err[-3000:]
    assert f"{workdir} is in use by another run: process {first.pid}" in err
    # kill -9 once a checkpoint after the second run's refusal exists.
    seen = _complete_steps(workdir)
    while _complete_steps(workdir) == seen or not _complete_steps(workdir):
      assert first.poll() is None, "the run ended before it could be killed"
      time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  killed_at = _complete_steps(workdir)[-1]
  assert killed_at < run["train.num_steps"]

  resumed = _start(workdir, **run)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert f"lock: taking over {workdir}/run.lock from process {first.pid}" in out
  assert f"resumed at step {killed_at}" in out, out[-3000:]
  tiny_runs.assert_same_metrics(tiny_runs.comparable_metrics(workdir),
                                tiny_runs.comparable_metrics(reference))
  table = json.loads(paths.read_bytes(f"{workdir}/final_table.json").decode())
  assert table == json.loads(open(os.path.join(reference, "final_table.json")).read())
  assert "reward.png" in paths.listdir(f"{workdir}/plots")


def _emulator(port: int) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, os.path.join(tiny_runs.TESTS, "gcs_emulator.py"),
                           str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  assert proc.stdout.readline().strip() == "ready"
  return proc


def _run_against(port: int, workdir: str, **overrides) -> subprocess.Popen:
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  env = tiny_runs.subprocess_env()
  env.update(gcs_emulator.environment(port))
  return subprocess.Popen(tiny_runs.main_command(workdir, **overrides), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=tiny_runs.REPO)


@pytest.mark.slow
def test_storage_gone_mid_run_stops_with_its_own_status_in_one_sentence():
  """The emulator is killed after a checkpoint: retries are bounded by train.storage_retry_s
  (2 s here; every client's, gcsfs' and TensorStore's, not ~33 s a call each), then exit 69."""
  port = _free_port()
  emulator = _emulator(port)
  workdir = "gs://bucket/gone"
  run = _run_against(port, workdir, **{"train.num_steps": 40, "train.checkpoint_every": 1,
                                       "train.storage_retry_s": 2.0})
  try:
    # A client of its own for this emulator: the process's environment and gcsfs' cached clients
    # stay pointed at the module's bucket (a client keeps the endpoint it was made with).
    import gcsfs.core  # pylint: disable=g-import-not-at-top  # Plain client: see _plain_gcsfs.
    fs = gcsfs.core.GCSFileSystem(endpoint_url=f"http://127.0.0.1:{port}", token="anon",
                             skip_instance_cache=True, use_listings_cache=False)
    deadline = time.monotonic() + 120
    while len(_complete_steps_in(fs, "bucket/gone")) < 2:
      assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-3000:]
      time.sleep(0.2)
    emulator.kill()
    emulator.wait()
    out, err = run.communicate(timeout=90)  # Before: no exit after 240 s.
  finally:
    for proc in (run, emulator):
      if proc.poll() is None:
        proc.kill()
  assert run.returncode == errors.EXIT_STORAGE_UNAVAILABLE, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith("storage unavailable:") and "gs://bucket/gone" in lines[-1], \
      lines[-1]
  assert "Traceback" not in err and len(lines) <= 15, err[-3000:]
  assert "step 40/40" not in out


@pytest.mark.slow
def test_storage_down_at_start_stops_with_its_own_status_in_one_sentence():
  port = _free_port()  # Nothing listens there.
  run = _run_against(port, "gs://bucket/down", **{"train.storage_retry_s": 2.0})
  out, err = run.communicate(timeout=90)
  assert run.returncode == errors.EXIT_STORAGE_UNAVAILABLE, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith("storage unavailable: --workdir=gs://bucket/down: the storage "
                              "failed"), lines[-1]
  assert "Traceback" not in err and len(lines) <= 3, err[-3000:]
  del out
