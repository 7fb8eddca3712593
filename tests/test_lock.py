"""One run per workdir (dypo_jax.io.lock): a second run refuses naming the holder; a holder that is
gone (dead pid on this host, or a stale heartbeat) is taken over, and said so."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from dypo_jax import errors
from dypo_jax.io import lock as lock_lib
import tiny_runs


def _holder(path):
  with open(path) as f:
    return json.load(f)


def test_a_second_lock_on_a_live_workdir_is_refused_naming_the_holder(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path)) as first:
    path = tmp_path / lock_lib.LOCK_FILENAME
    assert _holder(path)["pid"] == os.getpid()
    with pytest.raises(lock_lib.WorkdirLocked,
                       match=rf"in use by another run: process {os.getpid()} on host"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert first.holder["pid"] == os.getpid()
  assert not path.exists()  # Released.


def _dead_pid() -> int:
  """A pid that runs nothing now (counting down from the top of the pid range)."""
  pid = 4_000_000
  while lock_lib._pid_alive(pid):  # pylint: disable=protected-access
    pid -= 1
  return pid


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, capsys):
  dead = _dead_pid()
  path = tmp_path / lock_lib.LOCK_FILENAME
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "start": time.time(),
                              "heartbeat": time.time()}))
  with lock_lib.WorkdirLock(str(tmp_path)):
    assert _holder(path)["pid"] == os.getpid()
  assert f"from process {dead} on host" in capsys.readouterr().out


def test_an_unreadable_lock_file_is_taken_over_and_said_so(tmp_path, capsys):
  path = tmp_path / lock_lib.LOCK_FILENAME
  path.write_text("garbage{")  # E.g. a holder killed while writing it.
  with lock_lib.WorkdirLock(str(tmp_path)):
    assert _holder(path)["pid"] == os.getpid()
  assert f"lock: taking over {path}: it is unreadable" in capsys.readouterr().out


def test_a_stale_heartbeat_from_another_host_is_taken_over_a_fresh_one_is_not(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILENAME
  other = {"host": "pod-worker-7", "pid": 1, "start": time.time() - 3600}
  path.write_text(json.dumps({**other, "heartbeat": time.time() - 5}))
  with pytest.raises(lock_lib.WorkdirLocked, match="'pod-worker-7'.*last heartbeat 5 s ago"):
    lock_lib.WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  path.write_text(json.dumps({**other, "heartbeat": time.time() - 120}))
  with lock_lib.WorkdirLock(str(tmp_path), stale_after_s=60):
    assert _holder(path)["host"] == socket.gethostname()


def test_the_heartbeat_is_renewed_while_held(tmp_path):
  with lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=0.05):
    first = _holder(tmp_path / lock_lib.LOCK_FILENAME)["heartbeat"]
    time.sleep(0.3)
    assert _holder(tmp_path / lock_lib.LOCK_FILENAME)["heartbeat"] > first


@pytest.mark.slow
def test_a_second_cli_run_on_a_live_workdir_exits_5(tmp_path):
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(tiny_runs.main_command(workdir, **{"train.num_steps": 1000}),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO)
  try:
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILENAME)):
      assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
      time.sleep(0.1)
    second = subprocess.run(tiny_runs.main_command(workdir) + ["--mode=summary"],
                            capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                            cwd=tiny_runs.REPO, timeout=120)
    assert second.returncode == errors.EXIT_WORKDIR_LOCKED, second.stderr[-2000:]
    assert f"process {first.pid} on host" in second.stderr
    assert "Traceback" not in second.stderr
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
