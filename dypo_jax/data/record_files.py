"""Record files: JSONL (gzip too) and Parquet in either layout of `records`, read with every bad
line or row named (or skipped and counted)."""
import gzip
import json
import os
from typing import Any, Iterable, Literal, Mapping

from dypo_jax.data.records import PromptRecord
from dypo_jax.data.records import record_from_dict
from dypo_jax.data.records import record_from_verl
from dypo_jax.data.records import RecordError
from dypo_jax.data.records import Where

OnError = Literal["raise", "skip"]
Layout = Literal["auto", "dypo", "verl"]

# How many error messages a reader keeps in its stats (the count is always exact).
MAX_ERRORS_KEPT = 20

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)


def _check_on_error(on_error: str) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


class Collector:
  """Gathers records of one file: duplicate uids, skip-or-raise, stats."""

  def __init__(self, path: str, on_error: str, unit: str):
    _check_on_error(on_error)
    self.path = path
    self.on_error = on_error
    self.unit = unit
    self.records: list[PromptRecord] = []
    self.first_seen: dict[str, int] = {}
    self.skipped = 0
    self.errors: list[str] = []

  def fail(self, err: RecordError) -> None:
    if self.on_error == "raise":
      raise err
    self.skipped += 1
    if len(self.errors) < MAX_ERRORS_KEPT:
      self.errors.append(str(err))

  def add(self, rec: PromptRecord, index: int) -> None:
    first = self.first_seen.get(rec.uid)
    if first is not None:
      self.fail(RecordError(
          Where(self.path, index, self.unit), "uid",
          f"duplicate uid {rec.uid!r}: first on {self.unit} {first}, again on {self.unit} {index}"))
      return
    self.first_seen[rec.uid] = index
    self.records.append(rec)

  def finish(self, positions: dict[str, int] | None
             ) -> tuple[list[PromptRecord], dict[str, Any]]:
    """The records and stats; `positions` (if given) gains each uid's line or row."""
    if positions is not None:
      positions.update(self.first_seen)
    stats = {"read": len(self.records), "skipped": self.skipped, "errors": list(self.errors)}
    return self.records, stats


def _from_layout(obj: Any, layout: str, where: Where) -> PromptRecord:
  if layout == "auto":
    layout = "verl" if isinstance(obj, Mapping) and "reward_model" in obj else "dypo"
  if layout == "verl":
    return record_from_verl(obj, where=where)
  return record_from_dict(obj, where=where)


def _check_layout(layout: str) -> None:
  if layout not in ("auto", "dypo", "verl"):
    raise ValueError(f"layout must be 'auto', 'dypo' or 'verl', got {layout!r}")


def read_jsonl(path: str | os.PathLike, *, layout: Layout = "auto", on_error: OnError = "raise",
               positions: dict[str, int] | None = None
               ) -> tuple[list[PromptRecord], dict[str, Any]]:
  """Reads a JSONL file (gzip when the name ends in .gz), one record per non-blank line.

  Args:
    path: the file.
    layout: "dypo", "verl", or "auto" (a line with a `reward_model` key is verl, else dypo).
    on_error: "raise" stops at the first bad line; "skip" skips it and counts it in the stats.
    positions: if given, filled with {uid: line number} of the records read.

  Returns:
    (records, stats) with stats = {"read": n, "skipped": m, "errors": [first messages]}.

  Raises:
    RecordError: (with on_error="raise") naming the file, the 1-based line and the field.
  """
  _check_layout(layout)
  path = os.fspath(path)
  col = Collector(path, on_error, "line")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    try:
      for lineno, raw in enumerate(f, start=1):
        where = Where(path, lineno, "line")
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          col.fail(RecordError(where, None, f"not valid UTF-8 ({e.reason})"))
          continue
        if not text.strip():
          continue  # Blank lines (e.g. a trailing newline) are not records.
        try:
          obj = json.loads(text)
        except json.JSONDecodeError as e:
          col.fail(RecordError(where, None, f"bad JSON: {e.msg} (column {e.colno})"))
          continue
        try:
          rec = _from_layout(obj, layout, where)
        except RecordError as e:
          col.fail(e)
          continue
        col.add(rec, lineno)
    except (OSError, EOFError) as e:  # Corrupt gzip stream.
      raise RecordError(path, None, f"cannot read: {e}") from e
  return col.finish(positions)


def read_parquet(path: str | os.PathLike, *, layout: Layout = "auto", on_error: OnError = "raise",
                 positions: dict[str, int] | None = None
                 ) -> tuple[list[PromptRecord], dict[str, Any]]:
  """Reads a Parquet file, one record per row (rows numbered from 1).

  Args:
    path: the file.
    layout: "dypo", "verl", or "auto" (verl when the file has a `reward_model` column).
    on_error: "raise" stops at the first bad row; "skip" skips it and counts it in the stats.
      A file that is not Parquet, or lacks a required column, always raises.
    positions: if given, filled with {uid: row number} of the records read.

  Returns:
    (records, stats) as for `read_jsonl`.

  Raises:
    RecordError: naming the file, the 1-based row and the field.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  _check_layout(layout)
  path = os.fspath(path)
  col = Collector(path, on_error, "row")
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except; pyarrow raises several types.
    raise RecordError(path, None, f"cannot read as Parquet: {e}") from e
  columns = set(pf.schema_arrow.names)
  if layout == "auto":
    layout = "verl" if "reward_model" in columns else "dypo"
  required = (("prompt", "reward_model", "data_source") if layout == "verl"
              else ("prompt", "answer", "source"))
  for name in required:
    if name not in columns:
      raise RecordError(path, name, f"column is missing (layout {layout!r})")
  rowno = 0
  for batch in pf.iter_batches(batch_size=4096):
    for row in batch.to_pylist():
      rowno += 1
      where = Where(path, rowno, "row")
      try:
        rec = _from_layout(row, layout, where)
      except RecordError as e:
        col.fail(e)
        continue
      col.add(rec, rowno)
  return col.finish(positions)


def read_records(path: str | os.PathLike, *, layout: Layout = "auto", on_error: OnError = "raise",
                 positions: dict[str, int] | None = None
                 ) -> tuple[list[PromptRecord], dict[str, Any]]:
  """Reads records from .jsonl / .jsonl.gz / .json.gz / .parquet, chosen by the file name."""
  name = os.fspath(path)
  lower = name.lower()
  if lower.endswith(_JSONL_SUFFIXES):
    return read_jsonl(name, layout=layout, on_error=on_error, positions=positions)
  if lower.endswith(_PARQUET_SUFFIXES):
    return read_parquet(name, layout=layout, on_error=on_error, positions=positions)
  raise RecordError(name, None, "unknown file extension; expected one of "
                    + ", ".join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES))


def read_named_sets(paths: Iterable[str], *, what: str = "--data") -> dict[str, list[PromptRecord]]:
  """{name: records} of several files: each file's name, or its path where two share a name.

  Raises RecordError naming `what` and the file for a missing or empty file.
  """
  paths = list(paths)
  names = [os.path.basename(p) for p in paths]
  sets = {}
  for path, name in zip(paths, names):
    if not os.path.isfile(path):
      raise RecordError(path, None, f"{what}: there is no such file")
    records, stats = read_records(path, on_error="raise")
    if not records:
      raise RecordError(path, None, f"{what}: the file holds no records ({stats['read']} read)")
    sets[name if names.count(name) == 1 else path] = records
  return sets


def where_is(path: str | os.PathLike, uid: str) -> str:
  """"<path> line|row <n>" of the record `uid` in `path` (re-reads the file: for error messages)."""
  positions: dict[str, int] = {}
  read_records(path, on_error="skip", positions=positions)
  unit = "row" if os.fspath(path).lower().endswith(_PARQUET_SUFFIXES) else "line"
  return str(Where(os.fspath(path), positions.get(uid), unit))
