"""How a run ends other than by finishing: the errors `main` and the tools turn into exit statuses.

Light on purpose (no JAX): `main` catches these before it imports anything heavy.
"""
import errno
import inspect
import logging
import os
import sys
import traceback

EXIT_ERROR = 1  # Any other error (a traceback).
EXIT_BAD_INPUT = 2  # The config, a flag or an input file is invalid: nothing was trained.
EXIT_NOTHING_TO_LEARN = 3  # train.max_empty_updates empty updates in a row; checkpoint saved.
EXIT_NONFINITE = 4  # More than train.max_nonfinite_updates non-finite updates.
EXIT_WORKDIR_LOCKED = 5  # Another live run holds the workdir (workdir/run.lock).
EXIT_CHECKPOINTS_UNREADABLE = 6  # The workdir has checkpoints and none reads: nothing was moved.
EXIT_LOCK_LOST = 7  # Another run took the workdir's lock over (or its heartbeat kept failing).
EXIT_STORAGE_UNAVAILABLE = 69  # Storage kept failing for train.storage_retry_s (EX_UNAVAILABLE).
EXIT_DISK_FULL = 74  # No space left where the run writes (EX_IOERR); free some and rerun.
EXIT_PREEMPTED = 75  # SIGTERM / SIGINT: saved; "temporary failure, resume me" (EX_TEMPFAIL).

# Set to 1 for the traceback of a bad-input or disk-full error (tools also take --verbose).
TRACEBACK_ENV = "DYPO_JAX_TRACEBACK"


def verbose() -> bool:
  """Whether tracebacks were asked for (`--verbose` sets TRACEBACK_ENV for the process)."""
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


class BadInput(ValueError):
  """A config key, flag or input file that cannot be used; the message names the culprit."""


class NothingToLearn(RuntimeError):
  """`train.max_empty_updates` updates in a row found nothing queued."""


class LockLost(RuntimeError):
  """This run's workdir lock now names another run, or its heartbeat failed for longer than the
  stale time: the run stops before its next write (`io.lock.WorkdirLock.check_held`)."""


class StorageError(OSError):
  """A read or write the store itself failed (I/O, permission, network, timeout): the bytes may
  be fine, so nothing is set aside; it is retried for `train.storage_retry_s`."""


class StorageUnavailable(RuntimeError):
  """Storage kept failing for `train.storage_retry_s`; the message names the path."""


class CheckpointsUnreadable(RuntimeError):
  """The workdir holds checkpoints and not one of them reads back (nothing was moved aside)."""


class SaveFailed(RuntimeError):
  """A checkpoint's background save did not finalise (its cause is chained)."""


class Preempted(RuntimeError):
  """SIGTERM or SIGINT arrived: the run saved a checkpoint at a step boundary and stopped early."""


def set_verbose(on: bool) -> None:
  """`--verbose`: tracebacks for this process and the ones it starts."""
  if on:
    os.environ[TRACEBACK_ENV] = "1"


def quiet_background_errors() -> None:
  """Drops Python's "Exception ignored in <coroutine>" reports, and asyncio's "exception was
  never retrieved", unless tracebacks were asked for.

  A restore of a damaged step fails in every pending Orbax read coroutine, and each was printed
  with its TensorStore dump (~990 lines for one bad step); the failure itself is reported once,
  as one line, by whoever asked for the read.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    noise = inspect.iscoroutine(unraisable.object) or (
        isinstance(unraisable.exc_value, RuntimeError)
        and "Event loop is closed" in str(unraisable.exc_value))
    if verbose() or not noise:
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_quiet_asyncio)


def _quiet_asyncio(record: logging.LogRecord) -> bool:
  """asyncio's "Future/Task exception was never retrieved" (the same failed reads, at exit)."""
  return verbose() or "exception was never retrieved" not in str(record.msg)


def disk_full(exc: BaseException) -> bool:
  """True when `exc` or an exception it came from says the device is full or over quota.

  Orbax and TensorStore report a failed write as their own exception types with the OS message
  inside, so the text is checked as well as `errno`.
  """
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(s in str(exc) for s in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT),
                                   "RESOURCE_EXHAUSTED: No space")):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


class _DiskFullLogs(logging.Filter):
  """A full disk (or, with `match`, a failing store) fails every pending write of a background
  save, and each logs its traceback: such a record keeps one short line (asyncio's "never
  retrieved" copies go); `main` says the rest once."""

  def __init__(self, match=disk_full):
    super().__init__()
    self._match = match

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or verbose() or not self._match(exc):
      return True
    if record.name == "asyncio":
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    record.msg, record.args = f"{str(record.getMessage())[:200]} ({_first_line(exc, 300)})", None
    return True


def shorten_disk_full_logs(match=None) -> None:
  """Adds `_DiskFullLogs` to the root logger's handlers (absl's included: call after app.run
  started); `match(exc)`: another kind of failure to shorten the same way."""
  for handler in logging.getLogger().handlers:
    kinds = [f for f in handler.filters if isinstance(f, _DiskFullLogs)]
    if not kinds:
      handler.addFilter(_DiskFullLogs())
    if match is not None and all(f._match is not match for f in kinds):  # pylint: disable=W0212
      handler.addFilter(_DiskFullLogs(match))


def _first_line(exc: BaseException, limit: int = 2000) -> str:
  text = str(exc)
  return text if len(text) <= limit else text[:limit] + " ..."


def exit_with(prefix: str, exc: BaseException, status: int, *, verbose: bool = False,
              now: bool = False) -> None:
  """Prints `prefix: message` (and the traceback when asked for) and exits with `status`.

  `now`: skip the interpreter's teardown, where the background threads of a failed save would
  print more tracebacks after the message.
  """
  if verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    traceback.print_exception(exc)
  message = f"{prefix}: {_first_line(exc)}"
  if now:
    sys.stdout.flush()
    sys.stderr.flush()
    # Silence the other threads (their tracebacks go through sys.stderr and logging), then write
    # the message to the file descriptor itself, so that it is the last line a user sees.
    logging.disable(logging.CRITICAL)
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    os.write(2, (message + "\n").encode())
    os._exit(status)  # pylint: disable=protected-access
  print(message, file=sys.stderr, flush=True)
  sys.exit(status)
