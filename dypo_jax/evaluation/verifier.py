"""math-verify, crash- and hang-proof: the scoring function and the worker pool that runs it.

`math_verify_score` runs math-verify gold first: `verify(parse(gold), parse(pred))` (the relation is
not symmetric). A plain number loses its thousands separators and currency sign; any other side
without an unescaped `$`, or `\\boxed`, `\\(`, `\\[`, is wrapped in `\\boxed{...}` (math-verify
misreads bare LaTeX such as "p-q" or "2\\sqrt{2}" otherwise).

math-verify's own timeouts use `signal.alarm` and work only in a main thread, and a pathological
expression can still block in C code, so batches go through `MathVerifyPool`: worker processes
started with "spawn" (safe once JAX is imported in the parent), one item in flight per worker, a
per-item deadline counted from dispatch and a bound on the whole batch. Every unscored item scores
0 and is counted apart from wrong answers (`BatchFaults`): a *timeout* (math-verify's own timeout,
the item's deadline, or the batch's bound) or an *error* (the verifier raised, the gold does not
parse, the worker died). A hung or dead worker is killed and replaced, so a hanging item delays the
batch by at most its timeout and never delays the other workers' items. Workers log at most
`LOG_LINE_CHARS` characters a line (math-verify puts whole expressions in its warnings). As with
any spawn pool, a script that creates one needs the `if __name__ == "__main__":` guard.
"""
import collections
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dypo_jax.evaluation import answers

ScoreFn = Callable[[str, str], float]

LOG_LINE_CHARS = 300  # A pool worker's log lines are cut to this length.
_LATEX_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # Unescaped $, \boxed, \(, \[.


def _as_latex(text: str) -> str:
  """A math-verify input: plain numbers lose thousands separators; bare LaTeX gets \\boxed{}."""
  s = text.strip()
  number = answers.canonical_number(s)
  if number is not None:
    return number
  if _LATEX_DELIMITED.search(s):
    return s
  return "\\boxed{" + s + "}"


class VerifierTimeout(Exception):
  """The verifier gave up on an item (its own timeout): scored 0, counted as a timeout."""


def _short(text: str, limit: int = 80) -> str:
  return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def math_verify_score(gold: str, pred: str) -> float:
  """1.0 if math-verify accepts `pred` against `gold` (gold first), else 0.0.

  Raises VerifierTimeout when math-verify's own timeout fires (it would otherwise answer "wrong"),
  ValueError when the gold does not parse (a data problem), and whatever math-verify raised on a
  crash; the pool counts each apart from wrong answers. Uses math-verify's signal-based timeouts,
  so call it in a main thread (pool workers do).
  """
  # pylint: disable=g-import-not-at-top  # Heavy (sympy): only where used.
  import math_verify
  from math_verify.errors import TimeoutException
  # pylint: enable=g-import-not-at-top
  try:
    gold_parsed = math_verify.parse(_as_latex(gold), raise_on_error=True)
    if not gold_parsed:
      raise ValueError(f"math-verify cannot parse the gold answer {_short(gold)!r}")
    pred_parsed = math_verify.parse(_as_latex(pred), raise_on_error=True)
    if not pred_parsed:
      return 0.0
    return float(math_verify.verify(gold_parsed, pred_parsed, raise_on_error=True))
  except TimeoutException as e:  # A BaseException: caught by nothing else.
    raise VerifierTimeout(f"math-verify timed out on {_short(pred)!r}") from e


# What became of a pool item that has no score.
_OK, _TIMEOUT, _ERROR = "ok", "timeout", "error"


@dataclasses.dataclass
class BatchFaults:
  """Items of a batch that got no verdict (each scored 0, and not a wrong answer)."""
  timeouts: int = 0  # The verifier's own timeout, the item's deadline or the batch's bound.
  errors: int = 0  # The verifier raised, the gold did not parse, or the worker died.

  def count(self, outcome: str) -> None:
    if outcome == _TIMEOUT:
      self.timeouts += 1
    elif outcome == _ERROR:
      self.errors += 1


class _ShortLines(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    line = super().format(record)
    if len(line) > LOG_LINE_CHARS:
      line = f"{line[:LOG_LINE_CHARS]}... [{len(line) - LOG_LINE_CHARS} more characters]"
    return line


def _quiet_logging() -> None:
  """A worker's log: warnings and worse, one line each, cut to LOG_LINE_CHARS."""
  handler = logging.StreamHandler()
  handler.setFormatter(_ShortLines("math-verify worker %(process)d: %(levelname)s %(message)s"))
  root = logging.getLogger()
  root.handlers[:] = [handler]
  root.setLevel(logging.WARNING)


def _worker_main(conn: multiprocessing.connection.Connection, score_fn: ScoreFn) -> None:
  """A pool worker: warm up, say "ready", then score (task_id, gold, pred) until None or EOF."""
  _quiet_logging()
  try:
    score_fn("1", "1")  # Imports sympy / math-verify before the first timed item.
  except Exception:  # pylint: disable=broad-except
    pass
  conn.send(("ready", -1, 0.0, _OK))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    task_id, gold, pred = msg
    try:
      score, outcome = float(score_fn(gold, pred)), _OK
    except VerifierTimeout:
      score, outcome = 0.0, _TIMEOUT
    except Exception:  # pylint: disable=broad-except
      score, outcome = 0.0, _ERROR
    conn.send(("result", task_id, score, outcome))


@dataclasses.dataclass
class _Slot:
  process: Any  # multiprocessing.Process of the pool's context.
  conn: multiprocessing.connection.Connection
  start_deadline: float
  ready: bool = False
  task: tuple[int, int] | None = None  # (task id, item index) in flight.
  deadline: float = 0.0


def default_workers() -> int:
  """Verifier processes for this host: its cores minus one (the trainer's), at least one."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 2
  return max(1, cores - 1)


class MathVerifyPool:
  """Scores (gold, pred) pairs in worker processes with a per-item timeout; see module docstring.

  Use as a context manager (or call `close()`). Not thread-safe: one `score_batch` at a time.
  `score_fn(gold, pred) -> float` must be a picklable top-level function. `num_workers=0` takes
  `default_workers()`.
  """

  def __init__(self, num_workers: int = 0, *, timeout: float = 10.0,
               batch_timeout: float | None = None,
               score_fn: ScoreFn = math_verify_score, start_method: str = "spawn",
               start_timeout: float = 120.0, max_start_failures: int = 3):
    if num_workers < 0:
      raise ValueError(f"MathVerifyPool num_workers must be >= 0 (0: one per core but one), got "
                       f"{num_workers}")
    if timeout <= 0:
      raise ValueError(f"MathVerifyPool timeout must be > 0 seconds, got {timeout}")
    if batch_timeout is not None and batch_timeout <= 0:
      raise ValueError(f"MathVerifyPool batch_timeout must be > 0 seconds, got {batch_timeout}")
    if start_method == "fork":
      raise ValueError("MathVerifyPool start_method 'fork' is unsafe once JAX is imported; use "
                       "'spawn' or 'forkserver'")
    try:
      pickle.dumps(score_fn)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"MathVerifyPool score_fn {score_fn!r} is not picklable ({e}); pass a "
                       "top-level function") from e
    self._ctx = multiprocessing.get_context(start_method)
    self._score_fn = score_fn
    self.timeout = float(timeout)
    self.batch_timeout = None if batch_timeout is None else float(batch_timeout)
    self._start_timeout = float(start_timeout)
    self._max_start_failures = max_start_failures
    self._start_failures = 0
    self._task_ids = itertools.count()
    self.restarts = 0  # Workers killed or found dead and replaced.
    self.total_faults = BatchFaults()
    self._closed = False
    self.num_workers = num_workers or default_workers()
    self._slots = [self._start_worker() for _ in range(self.num_workers)]

  def _start_worker(self) -> _Slot:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(target=_worker_main, args=(child_conn, self._score_fn),
                                daemon=True, name="math-verify-worker")
    process.start()
    child_conn.close()
    return _Slot(process=process, conn=parent_conn,
                 start_deadline=time.monotonic() + self._start_timeout)

  @staticmethod
  def _kill(slot: _Slot) -> None:
    if slot.process.is_alive():
      slot.process.kill()
    slot.process.join(timeout=5.0)
    slot.conn.close()

  def _replace(self, i: int, *, before_ready: bool) -> None:
    """Kills worker i and starts a new one; too many failed starts in a row raise RuntimeError."""
    old = self._slots[i]
    self._kill(old)
    self.restarts += 1
    if before_ready:
      self._start_failures += 1
      if self._start_failures > self._max_start_failures:
        raise RuntimeError(
            f"math-verify worker failed to start {self._start_failures} times in a row (last "
            f"exit code {old.process.exitcode}, score_fn {self._score_fn.__qualname__})")
    self._slots[i] = self._start_worker()

  def score_batch(self, golds: Sequence[str], preds: Sequence[str], *,
                  timeout: float | None = None,
                  batch_timeout: float | None = None) -> tuple[np.ndarray, BatchFaults]:
    """Scores pairs; returns (scores [n] float32, the batch's faults).

    An item that takes longer than `timeout` seconds from dispatch, or is still unscored
    `batch_timeout` seconds after the call (defaults: the pool's), scores 0.0 and counts as a
    timeout; one that raises or whose worker dies scores 0.0 and counts as an error.
    """
    if self._closed:
      raise ValueError("MathVerifyPool.score_batch called after close()")
    if len(golds) != len(preds):
      raise ValueError(f"score_batch: {len(golds)} golds but {len(preds)} preds")
    timeout = self.timeout if timeout is None else float(timeout)
    if timeout <= 0:
      raise ValueError(f"score_batch timeout must be > 0 seconds, got {timeout}")
    batch_timeout = self.batch_timeout if batch_timeout is None else float(batch_timeout)
    if batch_timeout is not None and batch_timeout <= 0:
      raise ValueError(f"score_batch batch_timeout must be > 0 seconds, got {batch_timeout}")
    n = len(golds)
    batch_deadline = (float("inf") if batch_timeout is None
                      else time.monotonic() + batch_timeout)
    scores = np.zeros((n,), np.float32)
    faults = BatchFaults()
    pending = collections.deque(range(n))
    done = 0

    def finish(slot: _Slot, score: float, outcome: str) -> None:
      nonlocal done
      assert slot.task is not None
      scores[slot.task[1]] = score
      faults.count(outcome)
      done += 1
      slot.task = None

    while done < n:
      if time.monotonic() >= batch_deadline:  # The batch's bound: what is left times out.
        for i, slot in enumerate(self._slots):
          if slot.task is not None:
            finish(slot, 0.0, _TIMEOUT)
            self._replace(i, before_ready=False)
        faults.timeouts += len(pending)
        done += len(pending)
        pending.clear()
        break
      # Dispatch to idle ready workers; the deadline starts now.
      for i, slot in enumerate(self._slots):
        if not pending:
          break
        if slot.ready and slot.task is None:
          index = pending.popleft()
          task_id = next(self._task_ids)
          try:
            slot.conn.send((task_id, str(golds[index]), str(preds[index])))
          except (OSError, ValueError):  # Worker died between batches: retry on a new one.
            pending.appendleft(index)
            self._replace(i, before_ready=False)
            continue
          slot.task = (task_id, index)
          slot.deadline = min(time.monotonic() + timeout, batch_deadline)
      # Wait for a result, a death, or the nearest deadline.
      now = time.monotonic()
      deadlines = [s.deadline if s.ready else s.start_deadline for s in self._slots
                   if s.task is not None or not s.ready] + [batch_deadline]
      wait_s = max(0.0, min(deadlines) - now) if min(deadlines) < float("inf") else None
      waitables = {}
      for i, slot in enumerate(self._slots):
        waitables[slot.conn] = i
        waitables[slot.process.sentinel] = i
      fired = multiprocessing.connection.wait(list(waitables), timeout=wait_s)
      for i in sorted({waitables[obj] for obj in fired}):
        slot = self._slots[i]
        dead = False
        try:
          while slot.conn.poll():
            kind, task_id, score, outcome = slot.conn.recv()
            if kind == "ready":
              slot.ready = True
              self._start_failures = 0
            elif slot.task is not None and slot.task[0] == task_id:
              finish(slot, score, outcome)
        except (EOFError, OSError):
          dead = True
        if dead or not slot.process.is_alive():
          was_ready = slot.ready
          if slot.task is not None:
            finish(slot, 0.0, _ERROR)
          self._replace(i, before_ready=not was_ready)
      # Kill workers past their deadline (hung items, or workers that never became ready).
      now = time.monotonic()
      for i, slot in enumerate(self._slots):
        if slot.task is not None and now >= slot.deadline:
          finish(slot, 0.0, _TIMEOUT)
          self._replace(i, before_ready=False)
        elif not slot.ready and now >= slot.start_deadline:
          self._replace(i, before_ready=True)
    self.total_faults.timeouts += faults.timeouts
    self.total_faults.errors += faults.errors
    return scores, faults

  def close(self) -> None:
    """Stops every worker (politely, then by force). Safe to call twice."""
    if self._closed:
      return
    self._closed = True
    for slot in self._slots:
      try:
        slot.conn.send(None)
      except (OSError, ValueError):
        pass
    for slot in self._slots:
      slot.process.join(timeout=1.0)
      self._kill(slot)

  def __enter__(self) -> "MathVerifyPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
