"""Binary correctness rewards, a crash- and hang-proof math-verify pool, and the format penalty.

A reward function is `reward(record, response_text) -> float`, 1.0 for a correct final answer and
0.0 otherwise; DYPO's difficulty grading (Easy / Mid / Hard) uses exactly this binary value.
Functions live in a registry (`REWARDS`, `register`, `get_reward`); the trainer calls the front
door `reward_batch(name, records, responses, pool=...)`.

Final answer (`extract_answer`): the text after the last "Answer:" up to the end of that line; if
there is none (or it is empty), the content of the last balanced `\\boxed{...}`; else None. A
response without a final answer scores 0 under every reward here.

`exact_match` compares `normalize_answer` of both sides, which only
  * strips the ends and collapses runs of whitespace to one space;
  * unwraps a string that is entirely `$...$` or `\\boxed{...}`, and drops one trailing period;
  * canonicalises plain decimal numbers: a leading `$` / `\\$` currency sign and `+` go, thousands
    separators go ("1,000" -> "1000"), trailing fractional zeros and a bare trailing point go
    ("18.0" -> "18", "2.50" -> "2.5"), and "-0" becomes "0".
It is case-sensitive and knows no mathematics ("1/2" != "0.5"); use `math_verify` for that.

`math_verify` uses the math-verify package, gold first: `verify(parse(gold), parse(pred))` (the
relation is not symmetric). A plain number loses its thousands separators and currency sign; any
other side without an unescaped `$`, or `\\boxed`, `\\(`, `\\[`, is wrapped in `\\boxed{...}`
(math-verify misreads bare LaTeX such as "p-q" or "2\\sqrt{2}" otherwise). math-verify's own
timeouts use `signal.alarm` and work only in a main thread, and a pathological expression can
still block in C code, so batches go through `MathVerifyPool`: worker processes started with
"spawn" (safe once JAX is imported in the parent), one item in flight per worker, a per-item
deadline counted from dispatch and a bound on the whole batch. Every unscored item scores 0 and
is counted apart from wrong answers (`BatchFaults`): a *timeout* (math-verify's own timeout, the
item's deadline, or the batch's bound) or an *error* (the verifier raised, the gold does not
parse, the worker died). A hung or dead worker is killed and replaced, so a hanging item delays
the batch by at most its timeout and never delays the other workers' items. Workers log at most
`LOG_LINE_CHARS` characters a line (math-verify puts whole expressions in its warnings). As with
any spawn pool, a script that creates one needs the `if __name__ == "__main__":` guard.

`format_penalty` is a shaped term (<= 0) that the trainer may add to the GRPO reward; it is never
part of the binary grading.
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

from dypo_jax.data.benchmarks import last_boxed
from dypo_jax.data.records import PromptRecord

RewardFn = Callable[[PromptRecord, str], float]
ScoreFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {}
LOG_LINE_CHARS = 300  # A pool worker's log lines are cut to this length.

_ANSWER_MARKER = "Answer:"
_NUMBER = re.compile(r"^[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)?(?:\.\d*)?$")
_LATEX_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # Unescaped $, \boxed, \(, \[.


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator that adds a reward function to `REWARDS` under `name` (names are unique)."""

  def decorator(fn: RewardFn) -> RewardFn:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].__qualname__})")
    REWARDS[name] = fn
    return fn

  return decorator


def get_reward(name: str) -> RewardFn:
  """The registered reward `name`; an unknown name raises ValueError listing the allowed ones."""
  if name not in REWARDS:
    raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(sorted(REWARDS))}")
  return REWARDS[name]


def extract_answer(text: str) -> str | None:
  """The final answer of a response (see module docstring), stripped, or None."""
  idx = text.rfind(_ANSWER_MARKER)
  if idx >= 0:
    line = text[idx + len(_ANSWER_MARKER):].split("\n", 1)[0].strip()
    if line:
      return line
  boxed = last_boxed(text)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  return None


def _canonical_number(text: str) -> str | None:
  """Canonical form of a plain decimal number ("1,000.50" -> "1000.5"), or None if not one."""
  s = text
  for currency in ("\\$", "$"):
    if s.startswith(currency) and len(s) > len(currency):
      s = s[len(currency):]
      break
  if not _NUMBER.match(s) or not any(c.isdigit() for c in s):
    return None
  sign = "-" if s.startswith("-") else ""
  s = s.lstrip("+-").replace(",", "")
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  if not s:
    s = "0"
  if s.startswith("."):
    s = "0" + s
  if s.strip("0.") == "":
    return "0"
  return sign + s


def normalize_answer(text: str) -> str:
  """The light normalisation `exact_match` applies to both sides (see module docstring)."""
  s = " ".join(text.split())
  while True:
    before = s
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
      s = s.strip("$").strip()
    if s.startswith("\\boxed{") and s.endswith("}") and last_boxed(s) == s[len("\\boxed{"):-1]:
      s = s[len("\\boxed{"):-1].strip()
    if s.endswith(".") and len(s) > 1:
      s = s[:-1].rstrip()
    if s == before:
      break
  number = _canonical_number(s)
  return s if number is None else number


@register("exact_match")
def exact_match(record: PromptRecord, response: str) -> float:
  """1.0 if the response's final answer equals `record.answer` after `normalize_answer`."""
  answer = extract_answer(response)
  if answer is None:
    return 0.0
  return float(normalize_answer(answer) == normalize_answer(record.answer))


def _as_latex(text: str) -> str:
  """A math-verify input: plain numbers lose thousands separators; bare LaTeX gets \\boxed{}."""
  s = text.strip()
  number = _canonical_number(s)
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


def fault_injection_score(gold: str, pred: str) -> float:
  """`math_verify_score`, except pred "HANG" sleeps forever, "CRASH" kills the process with
  os._exit(13), "RAISE" raises, "GIVE_UP" raises VerifierTimeout and "LOG" logs a 30k-character
  warning. For testing `MathVerifyPool`'s fault handling only."""
  if pred == "LOG":
    logging.getLogger("math_verify").warning("Timeout during parsing: %s", "x" * 30_000)
    return 0.0
  if pred == "GIVE_UP":
    raise VerifierTimeout("injected timeout")
  if pred == "HANG":
    while True:
      time.sleep(3600)
  if pred == "CRASH":
    os._exit(13)  # pylint: disable=protected-access
  if pred == "RAISE":
    raise RuntimeError("injected failure")
  return math_verify_score(gold, pred)


@register("math_verify")
def math_verify_reward(record: PromptRecord, response: str) -> float:
  """math-verify of the response's final answer against `record.answer`, in this process.

  Main thread only (signal.alarm) and unprotected against hangs: batches should go through
  `reward_batch("math_verify", ..., pool=MathVerifyPool(...))`.
  """
  answer = extract_answer(response)
  if answer is None:
    return 0.0
  return math_verify_score(record.answer, answer)


def format_penalty(response_text: str, *, finished: bool, coef: float) -> float:
  """Shaped penalty for the GRPO reward: -coef if truncated or without a final answer, else 0.

  `finished` is False when generation stopped at the length limit rather than at an end token.
  The penalty is applied once (a truncated response without an answer gets -coef, not -2 coef)
  and is never part of the binary correctness used for Easy / Mid / Hard grading.
  """
  if coef < 0:
    raise ValueError(f"format_penalty coef must be >= 0, got {coef}")
  if not finished or extract_answer(response_text) is None:
    return -float(coef)
  return 0.0


# --------------------------------------------------------------------------- the worker pool


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


def reward_batch(name: str, records: Sequence[PromptRecord], responses: Sequence[str], *,
                 pool: MathVerifyPool | None = None,
                 timeout: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
  """Scores responses[i] against records[i] with reward `name`; returns (scores [n] f32, stats).

  "math_verify" runs through `pool` (a temporary one if None: hold one in a trainer); responses
  without a final answer score 0 without reaching the pool. Every other reward runs inline.
  stats: reward_mean, reward_timeouts and reward_errors (`BatchFaults`), no_answer_frac,
  reward_time_s.
  """
  fn = get_reward(name)
  if len(records) != len(responses):
    raise ValueError(f"reward_batch({name!r}): {len(records)} records but {len(responses)} "
                     "responses")
  start = time.perf_counter()
  n = len(records)
  answers = [extract_answer(r) for r in responses]
  scores = np.zeros((n,), np.float32)
  faults = BatchFaults()
  if name == "math_verify":
    idx = [i for i, a in enumerate(answers) if a is not None]
    if idx:
      own_pool = pool is None
      if own_pool:
        pool = MathVerifyPool(num_workers=min(default_workers(), len(idx)))
      try:
        sub_scores, faults = pool.score_batch([records[i].answer for i in idx],
                                              [answers[i] for i in idx], timeout=timeout)
      finally:
        if own_pool:
          pool.close()
      scores[np.asarray(idx)] = sub_scores
  else:
    for i, (record, response) in enumerate(zip(records, responses)):
      scores[i] = float(fn(record, response))
  stats = {
      "reward_mean": float(scores.mean()) if n else 0.0,
      "reward_timeouts": float(faults.timeouts),
      "reward_errors": float(faults.errors),
      "no_answer_frac": float(sum(a is None for a in answers) / n) if n else 0.0,
      "reward_time_s": time.perf_counter() - start,
  }
  return scores, stats
