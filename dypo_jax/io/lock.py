"""One run per workdir: `workdir/run.lock` names the holder (host, pid, start, heartbeat).

A second run started on a live workdir would resume from its checkpoints, delete the first run's
in-flight save and write the same logs. Process 0 takes the lock before anything is written and
renews its heartbeat from a background thread; a second run refuses, naming the holder. A lock
whose holder is gone (a dead pid on this host, or no heartbeat for `stale_after_s` from another
host) is taken over, and the run says so. The workdir may be a bucket (`io.paths`): the lock is
then created with the store's "only if absent" precondition, and staleness is judged by the
heartbeat (or the pid, when the holder ran on this host).
"""
import json
import os
import socket
import threading
import time

from dypo_jax.io import paths

LOCK_FILENAME = "run.lock"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


class WorkdirLock:
  """`acquire()` before a run writes; `release()` (or the context manager) when it ends."""

  def __init__(self, workdir: str, *, stale_after_s: float = 600.0,
               heartbeat_s: float | None = None):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILENAME)
    self.stale_after_s = float(stale_after_s)
    self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(self.stale_after_s / 10, 1)
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
    self._stop = threading.Event()
    self._thread = None

  def _content(self) -> bytes:
    return json.dumps({**self.holder, "heartbeat": time.time()}).encode("utf-8")

  def _write(self) -> None:
    paths.write_bytes(self.path, self._content())

  def _read(self) -> dict | None:
    try:
      return json.loads(paths.read_bytes(self.path))
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # Unreadable: a crash mid-write of an older format; treated as stale.

  def _why_stale(self, held: dict) -> str | None:
    if not held or not {"host", "pid", "heartbeat"} <= set(held):
      return "it is unreadable"
    age = time.time() - float(held["heartbeat"])
    if held["host"] == self.holder["host"] and not _pid_alive(int(held["pid"])):
      return f"its process {held['pid']} on this host is gone"
    if age > self.stale_after_s:
      return f"its last heartbeat was {age:.0f} s ago (stale after {self.stale_after_s:.0f} s)"
    return None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLocked naming the live holder."""
    if not paths.create_exclusive(self.path, self._content()):
      held = self._read() or {}
      why = self._why_stale(held)
      if why is None:
        age = time.time() - float(held["heartbeat"])
        raise WorkdirLocked(
            f"{self.workdir} is in use by another run: process {held['pid']} on "
            f"host {held['host']!r}, started {time.ctime(float(held['start']))}, last heartbeat "
            f"{age:.0f} s ago ({self.path}). Stop that run first, or give this one another "
            f"--workdir.") from None
      holder = (f" from process {held['pid']} on host {held['host']!r}"
                if held and {"pid", "host"} <= set(held) else "")
      print(f"lock: taking over {self.path}{holder}: {why}", flush=True)
      self._write()
    if (self._read() or {}).get("pid") != self.holder["pid"]:  # Another taker won the race.
      raise WorkdirLocked(f"{self.path} was taken by another run at the same moment")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._write()
      except OSError:  # A full or vanished disk: the run itself will say so.
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      held = self._read() or {}
      if held.get("pid") == self.holder["pid"] and held.get("host") == self.holder["host"]:
        paths.remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
