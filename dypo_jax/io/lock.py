"""One run per workdir: `workdir/run.lock` names the holder (host, pid, start, token, heartbeat).

A second run started on a live workdir would resume from its checkpoints, delete the first run's
in-flight save and write the same logs. Process 0 takes the lock before anything is written and
renews its heartbeat from a background thread; a second run refuses, naming the holder. The
workdir may be a bucket (`io.paths`); every step below uses only what both stores make atomic:
an exclusive create ("only if absent") and a whole-file replace.

* Fresh start: `paths.create_exclusive` puts the file in place complete, so a second starter
  reads the first one's holder, never an empty file (an empty one, from a file system without
  hard links, is waited on for `EMPTY_GRACE_S`).
* Stale: a holder whose process on this host is gone, or whose heartbeat is older than
  `stale_after_s` by this host's clock. A heartbeat more than `CLOCK_TOLERANCE_S` in the future
  (the holder's clock runs ahead, or this one jumped back) is not trusted: the taker watches the
  file, and the holder counts as gone once its content has not changed for `stale_after_s` of
  this host's monotonic time (a live holder rewrites it every `heartbeat_s`).
* Takeover: of all the runs that judge one stale content gone, only the one that creates
  `run.lock.takeover-<hash of that content>` exclusively may replace the lock; it checks that the
  lock still holds that content, writes its own, removes the claim (a late taker that claims
  the same hash then finds the lock changed and backs off) and after `settle_s` checks that the
  file names its token. The others raise WorkdirLocked. A claim left by a taker that died
  mid-takeover is removed once its process on this host is gone or it is `stale_after_s` old.
* Fencing: every holder carries a random token. `check_held()` (before every log line and
  checkpoint save) raises `errors.LockLost` once the file names another token or is gone; the
  heartbeat thread re-reads the file before each write and never overwrites another run's lock,
  and it records LockLost when its writes have failed for longer than `stale_after_s` (another
  run may then rightly take the workdir over).

What remains: between a holder's check and its write, a holder frozen exactly there writes once
after a takeover; the next check of either run then finds the other's token and stops it, so the
workdir is never shared for longer than one step.
"""
import hashlib
import json
import os
import socket
import threading
import time
import uuid

from dypo_jax import errors
from dypo_jax.io import paths

LOCK_FILENAME = "run.lock"
CLOCK_TOLERANCE_S = 5.0  # A heartbeat this far ahead of our clock is still believed.
EMPTY_GRACE_S = 2.0  # An empty lock file is being written (O_EXCL create, then write).
LockLost = errors.LockLost


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


def _parse(raw: bytes) -> dict:
  """The holder recorded in `raw`, or {} when it is not one (garbage, an older format)."""
  try:
    held = json.loads(raw)
  except ValueError:
    return {}
  if not isinstance(held, dict) or not {"host", "pid", "heartbeat"} <= set(held):
    return {}
  try:
    float(held["heartbeat"]), int(held["pid"])  # pylint: disable=expression-not-assigned
  except (TypeError, ValueError):
    return {}
  return held


def _describe(held: dict) -> str:
  return (f"process {held['pid']} on host {held['host']!r}" if held else "an unreadable holder")


class WorkdirLock:
  """`acquire()` before a run writes; `check_held()` before each write; `release()` (or the
  context manager) when it ends."""

  def __init__(self, workdir: str, *, stale_after_s: float = 600.0,
               heartbeat_s: float | None = None, settle_s: float | None = None):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILENAME)
    self.stale_after_s = float(stale_after_s)
    self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(self.stale_after_s / 10, 1)
    # Longer than a store's write latency.
    self.settle_s = settle_s if settle_s is not None else min(0.5, self.stale_after_s / 10)
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
                   "token": uuid.uuid4().hex, "heartbeat_s": self.heartbeat_s}
    self._stop = threading.Event()
    self._thread = None
    self._lost: LockLost | None = None

  # ---------------------------------------------------------------------------- the file

  def _content(self) -> bytes:
    return json.dumps({**self.holder, "heartbeat": time.time()}).encode("utf-8")

  def _read_raw(self, path: str | None = None) -> bytes | None:
    """The lock file's bytes, None when there is none; a failing store raises."""
    path = path or self.path
    try:
      return paths.read_bytes(path)
    except FileNotFoundError:
      return None
    except IsADirectoryError:
      raise self._is_a_directory() from None

  def _is_a_directory(self) -> errors.BadInput:
    return errors.BadInput(f"the workdir lock {self.path} is a directory, not a lock file: "
                           "remove or rename it (no run of this version makes it a folder)")

  def _ours(self, held: dict) -> bool:
    return held.get("token") == self.holder["token"]

  # ------------------------------------------------------------------------------ acquire

  def _why_stale(self, raw: bytes) -> str | None:
    """Why the holder recorded in `raw` is gone, or None while it is live."""
    held = _parse(raw)
    if not held:
      return "it is unreadable"
    if held["host"] == self.holder["host"] and not _pid_alive(int(held["pid"])):
      return f"its process {held['pid']} on this host is gone"
    age = time.time() - float(held["heartbeat"])
    if age > self.stale_after_s:
      return f"its last heartbeat was {age:.0f} s ago (stale after {self.stale_after_s:.0f} s)"
    if age < -CLOCK_TOLERANCE_S:  # Our clock cannot judge it: whether it changes can.
      why = f"its heartbeat is {-age:.0f} s ahead of this host's clock"
      if not self._changes(raw, why, self.stale_after_s):
        return f"{why} and did not change for {self.stale_after_s:.0f} s"
    return None

  def _changes(self, raw: bytes, why: str, timeout_s: float) -> bool:
    """Whether the file stops holding `raw` within `timeout_s` of this host's monotonic time
    (its holder lives, or another run took it)."""
    print(f"lock: {self.path}: {why}; watching it for up to {timeout_s:.0f} s", flush=True)
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
      time.sleep(min(max(timeout_s / 20, 0.01), 5.0))
      if self._read_raw() != raw:
        return True
    return False

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLocked naming the live holder (BadInput when the lock
    path is a directory)."""
    for _ in range(5):  # Each pass sees a newer content; a few suffice even against a crowd.
      if paths.create_exclusive(self.path, self._content()):
        return self._verify_and_start(settle=False)
      if paths.isdir(self.path):  # In a bucket a "folder" reads as an empty object.
        raise self._is_a_directory()
      raw = self._read_raw()
      if raw is None:  # Released meanwhile.
        continue
      if not raw and self._changes(raw, "it is empty (being written?)", EMPTY_GRACE_S):
        continue
      why = self._why_stale(raw)
      if why is None:
        raise self._refusal(_parse(raw))
      if self._take_over(raw, why):
        return self._verify_and_start()
    raise WorkdirLocked(f"{self.path} kept changing while this run tried to take it; another "
                        "run is starting on this workdir")

  def _refusal(self, held: dict) -> WorkdirLocked:
    age = time.time() - float(held["heartbeat"])
    when = f"{age:.0f} s ago" if age >= 0 else f"{-age:.0f} s ahead of this host's clock"
    return WorkdirLocked(
        f"{self.workdir} is in use by another run: process {held['pid']} on "
        f"host {held['host']!r}, started {time.ctime(float(held.get('start', 0)))}, last "
        f"heartbeat {when} ({self.path}). Stop that run first, or give this one another "
        "--workdir.")

  def _take_over(self, raw: bytes, why: str) -> bool:
    """Replaces the stale content `raw` if this run wins its claim; False when the lock changed
    meanwhile (read it again); WorkdirLocked when another taker won."""
    claim = f"{self.path}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}"
    if not paths.create_exclusive(claim, self._content()):
      claimed = self._read_raw(claim)
      if claimed is None or not self._claim_left(claimed):
        raise WorkdirLocked(f"{self.path} is being taken over by another run at the same moment "
                            f"({_describe(_parse(claimed or b''))}, {claim})")
      print(f"lock: removing {claim}, left by a takeover that did not finish", flush=True)
      paths.remove(claim)  # Its taker is gone; the next pass claims anew.
      return False
    try:
      if self._read_raw() != raw:  # Renewed by its holder, or replaced by a taker before us.
        return False
      held = _parse(raw)
      print(f"lock: taking over {self.path}{f' from {_describe(held)}' if held else ''}: {why}",
            flush=True)
      paths.write_bytes(self.path, self._content())
    finally:
      # After the new content is in place: a late taker that claims this hash now finds the
      # lock changed and backs off.
      paths.remove(claim)
    return True

  def _claim_left(self, raw: bytes) -> bool:
    """Whether a takeover claim was left by a taker that died: its process on this host is gone,
    or it is older than `stale_after_s` (a live taker removes its claim within a moment; a claim
    is never renewed, so a time that far ahead of our clock is as old)."""
    held = _parse(raw)
    if not held:
      return True
    if held["host"] == self.holder["host"] and not _pid_alive(int(held["pid"])):
      return True
    return abs(time.time() - float(held["heartbeat"])) > self.stale_after_s

  def _verify_and_start(self, settle: bool = True) -> "WorkdirLock":
    """Starts the heartbeat once the file names this run (after `settle_s` past a takeover: a
    heartbeat the old holder began before it lands by then)."""
    if settle and self.settle_s:
      time.sleep(self.settle_s)
    held = _parse(self._read_raw() or b"")
    if not self._ours(held):
      raise WorkdirLocked(f"{self.path} was taken by another run at the same moment "
                          f"({_describe(held)})")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()
    return self

  # ----------------------------------------------------------------------- while held

  def lost(self) -> LockLost | None:
    """Why this run no longer holds the lock (read now), or None. A read the store fails says
    nothing: the heartbeat thread bounds how long that may last."""
    if self._lost is None:
      try:
        raw = self._read_raw()
      except errors.BadInput:
        raise
      except Exception:  # pylint: disable=broad-except  # The store's own error types too.
        return None
      self._note(self._not_ours(raw))
    return self._lost

  def check_held(self) -> None:
    """Raises LockLost once another run holds the workdir (or the heartbeat failed too long)."""
    if (lost := self.lost()) is not None:
      raise lost

  def _not_ours(self, raw: bytes | None) -> str | None:
    if raw is None:
      return f"{self.path} was removed while this run held it"
    held = _parse(raw)
    if self._ours(held):
      return None
    return f"{self.path} is now held by {_describe(held)} (this run's heartbeat went stale)"

  def _note(self, problem: str | None) -> None:
    if problem is not None and self._lost is None:
      self._lost = LockLost(f"{problem}; this run stopped before its next write and leaves the "
                            "workdir to the other run")

  def _beat(self) -> None:
    last_ok = time.monotonic()
    while not self._stop.wait(self.heartbeat_s):
      try:
        problem = self._not_ours(self._read_raw())
        if problem is not None:  # Never overwrite another run's lock.
          self._note(problem)
          return
        paths.write_bytes(self.path, self._content())
        last_ok = time.monotonic()
      except Exception as e:  # pylint: disable=broad-except  # A full disk, a store outage.
        failing = time.monotonic() - last_ok
        if failing > self.stale_after_s:
          self._note(f"the heartbeat of {self.path} has failed for {failing:.0f} s (stale after "
                     f"{self.stale_after_s:.0f} s), so another run may take the workdir over "
                     f"({type(e).__name__}: {str(e)[:200]})")
          return

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      if self._ours(_parse(self._read_raw() or b"")):
        paths.remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
