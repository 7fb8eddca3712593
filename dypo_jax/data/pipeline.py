"""Grain pipelines over the training pool: seeded epochs, per-process shards, exact resumption.

Every pipeline here is a `grain.MapDataset` chain, read in the calling process (no worker
processes, which would need absl flags parsed and buy nothing for index streams):

    range(num_records) | source(records)     the pool, random access
      [process_index::process_count]         this process's shard (disjoint; the union is the pool)
      .shuffle(seed=mixed seed)              a new permutation each epoch (grain: seed + epoch)
      .repeat(num_epochs)                    None: endless
      .to_iter_dataset()                     an iterator with get_state() / set_state()

The shuffle seed is derived from (seed, process_index, process_count) by a hash, so that:
  * the processes do not apply the same permutation to their shards (which would put records
    i and i+1 of the pool in the same global step whenever the pool is sorted, e.g. by task);
  * seed s, epoch e + 1 is not the order of seed s + 1, epoch e (grain adds the epoch to the seed).

The grain iterator state is a small JSON-serialisable dict ({"next_index": k}); a restored
iterator yields exactly what an uninterrupted one would have yielded next.
"""
import hashlib
from typing import Any, Callable, Mapping, Sequence, TypeVar

import grain
import jax

from dypo_jax.data import records as records_lib

T = TypeVar("T")

__all__ = [
    "IndexStream", "STATE_VERSION", "arrange", "index_dataset", "mixed_seed", "record_pipeline",
    "records_source",
]

# Bumped when the meaning of IndexStream.state() changes.
STATE_VERSION = 1

# In-memory sources: reading threads only add GIL contention (grain's own advice).
_IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def mixed_seed(seed: int, process_index: int, process_count: int) -> int:
  """The 32-bit shuffle seed of one process's shard, a hash of the three integers."""
  digest = hashlib.sha256(f"dypo-stream/{int(seed)}/{int(process_index)}/{int(process_count)}"
                          .encode("ascii")).digest()
  return int.from_bytes(digest[:4], "little")  # grain needs 0 <= seed < 2**32.


def _check_shard(num_records: int, process_index: int, process_count: int, what: str) -> None:
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"{what}: process_count must be an int >= 1, got {process_count!r}")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"{what}: process_index must be an int in [0, {process_count}), "
                     f"got {process_index!r}")
  if num_records <= process_index:
    raise ValueError(f"{what}: the pool ({num_records} records) has none for process "
                     f"{process_index} of {process_count}")


def arrange(ds: grain.MapDataset, *, seed: int, shuffle: bool = True, process_index: int = 0,
            process_count: int = 1, num_epochs: int | None = None,
            what: str = "pipeline") -> grain.MapDataset:
  """Shards, shuffles per epoch and repeats a finite MapDataset (see the module docstring).

  Args:
    ds: the pool, finite.
    seed: the run's seed.
    shuffle: False keeps the shard's order in every epoch.
    process_index: this process (e.g. `jax.process_index()`).
    process_count: number of processes (e.g. `jax.process_count()`).
    num_epochs: epochs to yield; None repeats forever.
    what: a name for error messages.

  Returns:
    The arranged MapDataset: element j is item j of the concatenated epochs of this shard.

  Raises:
    ValueError: when the shard is empty or an argument is out of range (naming it).
  """
  _check_shard(len(ds), process_index, process_count, what)
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
    raise ValueError(f"{what}: num_epochs must be None or an int >= 1, got {num_epochs!r}")
  ds = ds[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=mixed_seed(seed, process_index, process_count))
  return ds.repeat(num_epochs)


def index_dataset(num_records: int, *, seed: int, shuffle: bool = True, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
  """Indices into a pool of `num_records` records, arranged by `arrange`.

  Raises:
    ValueError: when `num_records` is not a positive int or this process's shard is empty.
  """
  if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
    raise ValueError(f"index_dataset: num_records must be an int >= 1, got {num_records!r}")
  return arrange(grain.MapDataset.range(num_records), seed=seed, shuffle=shuffle,
                 process_index=process_index, process_count=process_count,
                 num_epochs=num_epochs, what="index_dataset")


def records_source(records: Sequence[records_lib.PromptRecord]) -> grain.MapDataset:
  """A random-access grain source over in-memory records (validated, uids unique).

  Raises:
    RecordError: naming the (0-based) position and field of the first bad or duplicate record.
  """
  records = list(records)
  first_seen: dict[str, int] = {}
  for i, rec in enumerate(records):
    where = f"records_source record {i}"
    records_lib.validate_record(rec, where=where)
    if rec.uid in first_seen:
      raise records_lib.RecordError(
          where, "uid", f"duplicate uid {rec.uid!r}: first as record {first_seen[rec.uid]}")
    first_seen[rec.uid] = i
  return grain.MapDataset.source(records)


def record_pipeline(source: grain.MapDataset | Sequence[T], *, seed: int, shuffle: bool = True,
                    process_index: int = 0, process_count: int = 1,
                    num_epochs: int | None = None, decode: Callable[[Any], Any] | None = None,
                    read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Records (or anything random-access) in the order of the matching `index_dataset`.

  With the same seed, shuffle flag and shard, the k-th element is `source[i_k]` where i_k is the
  k-th index of `index_dataset(len(source), ...)`.

  Args:
    source: a MapDataset (e.g. `records_source(...)`), a list, or a TFDS / grain data source
      (anything with `__len__` and `__getitem__`).
    seed, shuffle, process_index, process_count, num_epochs: as for `arrange`.
    decode: applied to every element read (e.g. a TFDS example -> PromptRecord); None: none.
    read_options: grain's reading threads; default none (in-memory); give threads for files.

  Returns:
    An IterDataset; `iter(...)` gives an iterator with JSON-serialisable get_state() / set_state().
  """
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  ds = arrange(ds, seed=seed, shuffle=shuffle, process_index=process_index,
               process_count=process_count, num_epochs=num_epochs, what="record_pipeline")
  if decode is not None:
    ds = ds.map(decode)
  return ds.to_iter_dataset(read_options=read_options or _IN_MEMORY)


class IndexStream:
  """Endless seeded epochs over this process's shard of the pool, as record indices.

  `take(n)` returns the next n indices (crossing epoch boundaries as needed); `state()` is a
  JSON-serialisable dict and `restore(state)` continues exactly where that state was taken.
  The trainer's stream of training prompts.
  """

  def __init__(self, num_records: int, *, seed: int, shuffle: bool,
               process_index: int | None = None, process_count: int | None = None):
    self.num_records = num_records
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    ds = index_dataset(num_records, seed=self.seed, shuffle=self.shuffle,
                       process_index=self.process_index, process_count=self.process_count)
    # Records in this process's shard: ceil((num_records - process_index) / process_count).
    self.shard_size = len(range(self.process_index, num_records, self.process_count))
    self._iter = ds.to_iter_dataset(read_options=_IN_MEMORY).__iter__()

  def __iter__(self) -> "IndexStream":
    return self

  def __next__(self) -> int:
    return int(next(self._iter))

  def take(self, n: int) -> list[int]:
    """The next `n` indices into the training pool."""
    if not isinstance(n, int) or n < 0:
      raise ValueError(f"IndexStream.take: n must be an int >= 0, got {n!r}")
    return [int(next(self._iter)) for _ in range(n)]

  @property
  def consumed(self) -> int:
    """Indices yielded so far, over all epochs."""
    return int(self._iter.get_state()["next_index"])

  @property
  def epoch(self) -> int:
    """The epoch the next index belongs to (0-based)."""
    return self.consumed // self.shard_size

  def _identity(self) -> dict[str, Any]:
    return {"num_records": self.num_records, "seed": self.seed, "shuffle": self.shuffle,
            "process_index": self.process_index, "process_count": self.process_count}

  def state(self) -> dict[str, Any]:
    """JSON-serialisable: the stream's settings and grain's iterator state."""
    return {"version": STATE_VERSION, **self._identity(),
            "iterator": {k: int(v) for k, v in self._iter.get_state().items()}}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `state()` of a stream with the same settings).

    A state of the earlier two-integer form {"epoch", "pos"} is accepted: it resumes at the same
    epoch and position (the order within epochs is this pipeline's).

    Raises:
      ValueError: when `state` is malformed or was taken with other settings (naming the key).
    """
    if not isinstance(state, Mapping):
      raise ValueError(f"IndexStream.restore: state must be a dict, got {type(state).__name__}")
    if "iterator" not in state and {"epoch", "pos"} <= set(state):
      epoch, pos = int(state["epoch"]), int(state["pos"])
      if epoch < 0 or not 0 <= pos < self.shard_size:
        raise ValueError(f"IndexStream.restore: legacy state {dict(state)!r} is out of range for "
                         f"a shard of {self.shard_size} records")
      self._iter.set_state({"next_index": epoch * self.shard_size + pos})
      return
    for key in ("version", "iterator", *self._identity()):
      if key not in state:
        raise ValueError(f"IndexStream.restore: state key {key!r} is missing "
                         f"(keys: {sorted(state)})")
    if state["version"] != STATE_VERSION:
      raise ValueError(f"IndexStream.restore: state key 'version' is {state['version']!r}; "
                       f"this code reads version {STATE_VERSION}")
    for key, want in self._identity().items():
      if state[key] != want:
        raise ValueError(f"IndexStream.restore: state key {key!r} is {state[key]!r} but this "
                         f"stream has {want!r}; a stream resumes only with the same settings")
    it_state = state["iterator"]
    if (not isinstance(it_state, Mapping) or not isinstance(it_state.get("next_index"), int)
        or it_state["next_index"] < 0):
      raise ValueError(f"IndexStream.restore: state key 'iterator' must be "
                       f"{{'next_index': int >= 0}}, got {it_state!r}")
    self._iter.set_state(dict(it_state))
