"""Storage failures: telling damaged bytes from a store that failed, and retrying the latter.

A read that fails is certain damage (`CheckpointCorrupt`: a checksum mismatch, a truncated or
missing file, undecodable JSON), a failure of the store (`errors.StorageError`: an I/O,
permission or network error, a timeout), which may pass, or neither (`CheckpointUnreadable`: e.g.
arrays of other shapes than asked for). Only damage may be set aside; a store's failure is
retried for a bounded time (`retrying`) before the run stops with `errors.StorageUnavailable`.
"""
import json
import re
import sys
import time
import traceback
from typing import Callable, TypeVar

from dypo_jax import errors

T = TypeVar("T")


class CheckpointUnreadable(ValueError):
  """A saved step could not be read, and neither damage nor the store is shown to be why."""


class CheckpointCorrupt(CheckpointUnreadable):
  """A saved step cannot be read back as it was written (truncated, missing or altered data)."""


# TensorStore / gRPC status words (they lead its messages) and HTTP statuses that say the store
# refused or could not answer, not that the bytes are bad.
_STORAGE_WORDS = re.compile(
    r"\b(PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|UNAUTHENTICATED|RESOURCE_EXHAUSTED|"
    r"CANCELLED|ABORTED|Connection (refused|reset|aborted)|timed out|Timeout|"
    r"HTTP (403|408|429|5\d\d)|status(_code)?[ =:]+(403|408|429|5\d\d))\b")
# What damaged bytes look like when read: a short or missing file, a bad encoding.
_DAMAGE_WORDS = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|"
                           r"FAILED_PRECONDITION)\b|Error opening|Error reading|No such file")


def _chain(exc: BaseException | None) -> list[BaseException]:
  out, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def store_failed(exc: BaseException) -> bool:
  """True when `exc` (or an exception it came from) points at the store: an OSError other than
  a missing file, a timeout, a permission, network or server status."""
  for e in _chain(exc):
    if isinstance(e, errors.StorageError):
      return True
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, NotADirectoryError,
                                                     IsADirectoryError)):
      return True
    if isinstance(e, (TimeoutError, ConnectionError)) or _STORAGE_WORDS.search(str(e)):
      return True
  return False


def damage_is_certain(exc: BaseException) -> bool:
  """True when `exc` (or an exception it came from) shows the saved bytes themselves are bad,
  and nothing in it points at the store (`store_failed`)."""
  if store_failed(exc):
    return False
  chain = _chain(exc)
  return any(isinstance(e, (CheckpointCorrupt, FileNotFoundError, json.JSONDecodeError,
                            UnicodeDecodeError)) or _DAMAGE_WORDS.search(str(e)) for e in chain)


def first_line(exc: BaseException, limit: int = 300) -> str:
  """The innermost cause's first non-empty line (TensorStore's status, not Orbax's dump)."""
  root = _chain(exc)[-1]
  text = next((line for line in str(root).splitlines() if line.strip()), "")
  return f"{type(root).__name__}: {text[:limit]}" if text else type(root).__name__


def read_failure(where: str, exc: BaseException) -> Exception:
  """The one-line error to raise for a failed read of `where`: CheckpointCorrupt when the damage
  is certain (`damage_is_certain`), errors.StorageError when the store failed, else
  CheckpointUnreadable."""
  if damage_is_certain(exc):
    return CheckpointCorrupt(f"{where} is corrupt: {first_line(exc)}")
  if store_failed(exc):
    return errors.StorageError(f"{where} could not be read: {first_line(exc)}")
  return CheckpointUnreadable(f"{where} could not be read: {first_line(exc)}")


def retrying(fn: Callable[[], T], *, what: str, retry_s: float, prefix: str = "storage") -> T:
  """`fn()`, called again while it raises errors.StorageError, for at most `retry_s` seconds in
  all (backoff 0.5 s doubling to 30 s; one warning line per retry); then
  errors.StorageUnavailable naming `what`."""
  deadline = time.monotonic() + retry_s
  delay, attempt = 0.5, 0
  while True:
    try:
      return fn()
    except errors.StorageError as e:
      attempt += 1
      left = deadline - time.monotonic()
      if errors.verbose():
        traceback.print_exception(e)
      if left <= 0:
        raise errors.StorageUnavailable(
            f"{what}: the storage kept failing for {retry_s:g} s (train.storage_retry_s); "
            f"the last error: {e}") from e
      wait = min(delay, left)
      print(f"{prefix}: WARNING {e}; retry {attempt} in {wait:.1f} s", file=sys.stderr,
            flush=True)
      time.sleep(wait)
      delay = min(delay * 2, 30.0)


def close_after(failing: BaseException | None, *closers) -> None:
  """Calls each closer (None: skipped). While `failing` propagates, a closer's store failure is
  one warning line, so that it does not replace the error that stopped the run."""
  for close in closers:
    if close is None:
      continue
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if failing is None or not store_failed(e):
        raise
      print(f"storage: WARNING closing after the error: {first_line(e)}", file=sys.stderr,
            flush=True)


def _tensorstore_retries(retry_s: float) -> dict[str, object]:
  """TensorStore's `gcs_request_retries` whose backoff delays sum to at most `retry_s`."""
  initial = min(1.0, max(retry_s / 8, 0.05))
  cap = min(32.0, max(retry_s / 2, initial))
  total, delay, count = 0.0, initial, 0
  while count < 32 and total + delay <= retry_s:
    total, count, delay = total + delay, count + 1, min(delay * 2, cap)
  return {"max_retries": max(count, 1), "initial_delay": f"{initial:g}s",
          "max_delay": f"{cap:g}s"}


class _CappedSleep:
  """gcsfs' `asyncio`, with each retry's sleep capped (gcsfs sleeps 1, 2, 4, 8, 16 s: ~33 s a
  call, not configurable)."""

  def __init__(self, real, cap: float):
    self._real, self._cap = real, cap

  def __getattr__(self, name):
    return getattr(self._real, name)

  async def sleep(self, delay, *args, **kwargs):
    return await self._real.sleep(min(delay, self._cap), *args, **kwargs)


def bound_client_retries(retry_s: float, *, tensorstore: bool = True) -> None:
  """Bounds the retries of the storage clients to about `retry_s` a call: gcsfs' backoff (five
  sleeps, each capped at retry_s / 5; its per-retry tracebacks only with `--verbose`) and, with
  `tensorstore`, TensorStore's GCS request retries in every Orbax read and write (Orbax builds
  its TensorStore contexts from module defaults, which get `gcs_request_retries`)."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("gcsfs") is not None:
    from gcsfs import retry as gcsfs_retry  # pylint: disable=g-import-not-at-top
    real = getattr(gcsfs_retry.asyncio, "_real", asyncio)
    gcsfs_retry.asyncio = _CappedSleep(real, max(retry_s / 5, 0.01))
    if not errors.verbose():
      logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  if tensorstore:
    # pylint: disable-next=g-import-not-at-top
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    # pylint: disable-next=protected-access
    for context in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
      context["gcs_request_retries"] = _tensorstore_retries(retry_s)
