"""One run per workdir (dypo_jax.io.lock): a second run refuses naming the holder; a holder that is
gone (dead pid on this host, or a stale heartbeat) is taken over, and said so; of racing starters
or takers exactly one wins; a holder whose lock was taken stops (LockLost, exit 7)."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
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


# ------------------------------------------------------------------------------- races


def _race(workdir: str, takers: int, **lock_kwargs) -> list:
  """`takers` threads, each its own WorkdirLock, acquire at once; returns the winners' locks
  (released after), and checks that every loser was refused with WorkdirLocked."""
  barrier = threading.Barrier(takers)
  won, errs = [], []

  def take():
    lock = lock_lib.WorkdirLock(workdir, heartbeat_s=60, settle_s=0, **lock_kwargs)
    barrier.wait()
    try:
      won.append(lock.acquire())
    except lock_lib.WorkdirLocked:
      pass
    except BaseException as e:  # pylint: disable=broad-except
      errs.append(e)

  threads = [threading.Thread(target=take) for _ in range(takers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errs, errs
  held = _holder(os.path.join(workdir, lock_lib.LOCK_FILENAME)) if won else None
  for lock in won:
    lock.release()
  if len(won) == 1:
    assert held["token"] == won[0].holder["token"]  # The file names the one winner.
  return won


def test_of_fresh_starts_at_the_same_moment_exactly_one_wins(tmp_path, capsys):
  for trial in range(40):
    (tmp_path / str(trial)).mkdir()
    won = _race(str(tmp_path / str(trial)), 4)
    assert len(won) == 1, f"trial {trial}: {len(won)} winners"
  assert "taking over" not in capsys.readouterr().out  # No starter read another's file as junk.


@pytest.mark.parametrize("stale", ["dead_pid", "old_heartbeat", "unreadable"])
def test_of_takeovers_of_one_stale_lock_at_the_same_moment_exactly_one_wins(tmp_path, stale):
  content = {
      "dead_pid": json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                              "start": time.time(), "heartbeat": time.time()}),
      "old_heartbeat": json.dumps({"host": "pod-worker-7", "pid": 1, "start": 0.0,
                                   "heartbeat": time.time() - 3600}),
      "unreadable": "garbage{"}[stale]
  for trial in range(40):
    workdir = tmp_path / str(trial)
    workdir.mkdir()
    (workdir / lock_lib.LOCK_FILENAME).write_text(content)
    won = _race(str(workdir), 4, stale_after_s=60)
    assert len(won) == 1, f"trial {trial}: {len(won)} winners"
    assert [p.name for p in workdir.iterdir()] == []  # Released; no claim file left.


def test_a_claim_left_by_a_taker_that_died_is_removed(tmp_path, capsys):
  path = tmp_path / lock_lib.LOCK_FILENAME
  path.write_text("garbage{")
  digest = hashlib.sha256(b"garbage{").hexdigest()[:16]
  claim = tmp_path / f"{lock_lib.LOCK_FILENAME}.takeover-{digest}"
  claim.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "start": 0.0,
                               "heartbeat": time.time()}))
  with lock_lib.WorkdirLock(str(tmp_path), settle_s=0):
    assert not claim.exists()
  assert f"removing {claim}" in capsys.readouterr().out


def test_a_live_takers_claim_is_respected_an_old_one_from_another_host_is_not(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILENAME
  path.write_text("garbage{")
  digest = hashlib.sha256(b"garbage{").hexdigest()[:16]
  claim = tmp_path / f"{lock_lib.LOCK_FILENAME}.takeover-{digest}"
  taker = {"host": "pod-worker-7", "pid": 1, "start": 0.0, "heartbeat": time.time()}
  claim.write_text(json.dumps(taker))  # Another host is taking it over right now.
  with pytest.raises(lock_lib.WorkdirLocked, match="being taken over by another run"):
    lock_lib.WorkdirLock(str(tmp_path), stale_after_s=60, settle_s=0).acquire()
  claim.write_text(json.dumps({**taker, "heartbeat": time.time() + 3600}))  # Left, clock ahead.
  with lock_lib.WorkdirLock(str(tmp_path), stale_after_s=60, settle_s=0) as lock:
    assert _holder(path)["token"] == lock.holder["token"] and not claim.exists()


def test_an_empty_lock_file_is_waited_on_then_taken(tmp_path, monkeypatch):
  monkeypatch.setattr(lock_lib, "EMPTY_GRACE_S", 0.3)
  path = tmp_path / lock_lib.LOCK_FILENAME
  path.write_bytes(b"")  # A starter between its O_EXCL create and its write...
  fill = threading.Timer(0.1, lambda: path.write_text(json.dumps(
      {"host": "pod-worker-7", "pid": 1, "start": 0.0, "heartbeat": time.time()})))
  fill.start()
  with pytest.raises(lock_lib.WorkdirLocked, match="'pod-worker-7'"):  # ... that then wrote.
    lock_lib.WorkdirLock(str(tmp_path), settle_s=0).acquire()
  fill.join()
  path.write_bytes(b"")  # Empty for longer than the grace: a creator that died.
  with lock_lib.WorkdirLock(str(tmp_path), settle_s=0) as lock:
    assert _holder(path)["token"] == lock.holder["token"]


# ---------------------------------------------------------------------------- fencing


def test_a_holder_whose_lock_was_taken_over_stops_and_never_overwrites_it(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILENAME
  lock = lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=0.02, settle_s=0).acquire()
  try:
    lock.check_held()
    other = json.dumps({"host": "pod-worker-7", "pid": 1, "start": 0.0, "token": "other",
                        "heartbeat": time.time()})
    path.write_text(other)  # Another run took it over while this one was frozen.
    time.sleep(0.2)  # Ten heartbeats.
    assert path.read_text() == other
    with pytest.raises(errors.LockLost, match=r"now held by process 1 on host 'pod-worker-7'"):
      lock.check_held()
  finally:
    lock.release()
  assert path.read_text() == other  # Not released: it is not this run's.


def test_a_removed_lock_is_lost(tmp_path):
  lock = lock_lib.WorkdirLock(str(tmp_path), heartbeat_s=60, settle_s=0).acquire()
  os.remove(tmp_path / lock_lib.LOCK_FILENAME)
  with pytest.raises(errors.LockLost, match="was removed while this run held it"):
    lock.check_held()
  lock.release()


def test_a_heartbeat_that_keeps_failing_past_the_stale_time_stops_the_run(tmp_path, monkeypatch):
  lock = lock_lib.WorkdirLock(str(tmp_path), stale_after_s=0.2, heartbeat_s=0.02,
                              settle_s=0).acquire()
  try:
    def fail(path, data):
      raise OSError(5, "Input/output error", str(path))
    monkeypatch.setattr(lock_lib.paths, "write_bytes", fail)
    time.sleep(0.1)
    lock.check_held()  # Failing for less than the stale time: still held.
    time.sleep(0.3)
    with pytest.raises(errors.LockLost, match=r"heartbeat of .* has failed for .*Input/output"):
      lock.check_held()
  finally:
    monkeypatch.undo()
    lock.release()


def test_a_save_checks_the_fence_before_it_writes(tmp_path):
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top

  class Untouchable:
    def __getattr__(self, name):
      raise AssertionError(f"{name} used after the lock was lost")

  def fence():
    raise errors.LockLost("taken")

  with pytest.raises(errors.LockLost):
    run_checkpoint.save(Untouchable(), Untouchable(), config=None, model_config=None,
                        writer=Untouchable(), fence=fence)


# ---------------------------------------------------------- clock skew, a directory, resume


def test_a_heartbeat_from_the_future_is_taken_once_it_stops_changing(tmp_path, capsys):
  path = tmp_path / lock_lib.LOCK_FILENAME
  future = {"host": "pod-worker-7", "pid": 1, "start": 0.0, "heartbeat": time.time() + 3600}
  path.write_text(json.dumps(future))  # Written by a host whose clock ran an hour ahead.
  with lock_lib.WorkdirLock(str(tmp_path), stale_after_s=0.3, settle_s=0):
    assert _holder(path)["host"] == socket.gethostname()
  assert "ahead of this host's clock and did not change for" in capsys.readouterr().out


def test_a_live_holder_with_a_clock_ahead_is_not_taken(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILENAME
  stop = threading.Event()

  def beat():  # A live holder an hour ahead, renewing its heartbeat.
    while not stop.wait(0.02):
      lock_lib.paths.write_bytes(str(path), json.dumps(
          {"host": "pod-worker-7", "pid": 1, "start": 0.0,
           "heartbeat": time.time() + 3600}).encode())

  lock_lib.paths.write_bytes(str(path), b'{"host": "x", "pid": 1, "heartbeat": 1e12}')
  holder = threading.Thread(target=beat)
  holder.start()
  try:
    with pytest.raises(lock_lib.WorkdirLocked, match="ahead of this host's clock"):
      lock_lib.WorkdirLock(str(tmp_path), stale_after_s=5, settle_s=0).acquire()
  finally:
    stop.set()
    holder.join()


def test_a_lock_path_that_is_a_directory_is_bad_input_naming_it(tmp_path):
  (tmp_path / lock_lib.LOCK_FILENAME).mkdir()
  with pytest.raises(errors.BadInput, match=rf"lock {tmp_path / lock_lib.LOCK_FILENAME} is a "
                                            "directory"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()


def test_the_stale_time_may_change_on_resume():
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top
  saved = tiny_runs.tiny_config()
  config = tiny_runs.tiny_config(**{"train.workdir_lock_stale_s": 30.0})
  lines = run_checkpoint.check_config(json.loads(saved.to_json()), config, where="step 2")
  assert lines == ["  train.workdir_lock_stale_s: 600.0 -> 30.0"]


# --------------------------------------------------------------- the frozen holder, end to end


def _checkpoint_entries(workdir: str) -> list[str]:
  try:
    return os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []


def _wait_for(what: str, ready, proc: subprocess.Popen, timeout_s: float = 240) -> None:
  deadline = time.monotonic() + timeout_s
  while not ready():
    assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before {what}"
    assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
    time.sleep(0.005)


@pytest.mark.slow
def test_a_frozen_holder_taken_over_exits_7_before_its_next_write(tmp_path, reference_run):
  workdir = str(tmp_path / "frozen")
  stale_s = 3.0
  run = {"train.num_steps": tiny_runs.REFERENCE_RUN["train.num_steps"],
         "train.checkpoint_every": 1, "train.workdir_lock_stale_s": stale_s}
  logs = {name: open(tmp_path / name, "w+", encoding="utf-8")  # pylint: disable=consider-using-with
          for name in ("first.out", "first.err", "second.out", "second.err")}

  def start(name):
    return subprocess.Popen(tiny_runs.main_command(workdir, **run), stdout=logs[f"{name}.out"],
                            stderr=logs[f"{name}.err"], env=tiny_runs.subprocess_env(),
                            cwd=tiny_runs.REPO)

  def frozen_between_saves() -> bool:
    """SIGSTOP once step 2 is saved and no save is in flight (else go on and try again)."""
    entries = _checkpoint_entries(workdir)
    if not any(n.isdigit() and int(n) >= 2 for n in entries) or len(entries) != len(
        [n for n in entries if n.isdigit()]):
      return False
    first.send_signal(signal.SIGSTOP)
    if all(n.isdigit() for n in _checkpoint_entries(workdir)):
      return True
    first.send_signal(signal.SIGCONT)
    return False

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  first = start("first")
  second = None
  try:
    _wait_for("a moment between two saves after step 2", frozen_between_saves, first)
    offset = os.path.getsize(metrics_path)
    time.sleep(stale_s + 0.5)  # Frozen past the stale time: its heartbeat is old.
    second = start("second")
    _wait_for("the second run's takeover", lambda: "lock: taking over" in open(
        tmp_path / "second.out", encoding="utf-8").read(), second)
    first.send_signal(signal.SIGCONT)  # Wakes mid-step, holding a lock that is not its own.
    first_rc = first.wait(timeout=120)
    second_rc = second.wait(timeout=300)
  finally:
    for proc in (first, second):
      if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
  out = {name: (tmp_path / name).read_text() for name in logs}
  assert first_rc == errors.EXIT_LOCK_LOST, out["first.err"][-3000:]
  assert f"workdir: lock lost: {workdir}/run.lock is now held by process {second.pid}" in (
      out["first.err"])
  assert "Traceback" not in out["first.err"], out["first.err"][-3000:]
  assert second_rc == 0, out["second.err"][-3000:]
  assert f"from process {first.pid} on host" in out["second.out"]
  # After the freeze only the second run logged: its steps once each, in order, to the end.
  with open(metrics_path, "rb") as f:
    f.seek(offset)
    steps = [json.loads(line)["step"] for line in f.read().splitlines() if line.strip()]
  assert steps == list(range(steps[0], run["train.num_steps"] + 1)), steps
  assert f"resumed at step {steps[0] - 1}" in out["second.out"]
  # And nothing the first run wrote after it woke changed what the second computed.
  tiny_runs.assert_same_metrics(tiny_runs.comparable_metrics(workdir),
                                tiny_runs.comparable_metrics(reference_run))


@pytest.mark.slow
def test_a_cli_run_whose_lock_path_is_a_directory_exits_2_naming_it(tmp_path):
  workdir = tmp_path / "run"
  (workdir / lock_lib.LOCK_FILENAME).mkdir(parents=True)
  proc = subprocess.run(tiny_runs.main_command(str(workdir)) + ["--mode=summary"],
                        capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                        cwd=tiny_runs.REPO, timeout=120)
  assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
  assert (f"input error: the workdir lock {workdir / lock_lib.LOCK_FILENAME} is a directory"
          in proc.stderr)
  assert "Traceback" not in proc.stderr

