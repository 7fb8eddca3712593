"""The Hard (SFT) and Mid (RL) queues of DYPO, with exact, atomic persistence.

DYPO §1 step 4: graded prompts wait in two FIFO queues until they fill an update batch. The batch
takes the oldest items across both queues in the order they arrived, so it holds Hard and Mid items
in the proportion they arrived. Queued items survive restarts: `to_bytes` / `from_bytes` embed
them in checkpoints.

Letters: K samples per prompt (group), T response length (padded).

Serialised format (`to_bytes`): one zip archive (`np.savez_compressed`, CRC-checked) holding
  * `meta`: UTF-8 JSON as uint8 — format name and version, the arrival counter, and per item its
    arrival number, uid, step, teacher fields and the shape of every array field;
  * one flat array per (queue, field): the item arrays of that field, raveled and concatenated in
    queue order (ragged shapes are recovered from `meta`). No object arrays, no pickle.
Pure Python and numpy; no JAX.
"""
import collections
import dataclasses
import io
import json
import zipfile
import zlib

import numpy as np


_FORMAT = "dypo_jax.rl.queues"
_VERSION = 1


def _as_array(owner: str, name: str, value, dtype, ndim: int) -> np.ndarray:
  """`value` as a C-contiguous array of `dtype` and rank `ndim`; ValueError names the field."""
  arr = np.asarray(value)
  if arr.ndim != ndim:
    raise ValueError(f"{owner}.{name}: expected rank {ndim}, got shape {arr.shape}")
  want = np.dtype(dtype)
  if arr.dtype != want:
    if want.kind in "iu" and arr.size and arr.dtype.kind not in "iub":
      raise ValueError(f"{owner}.{name}: expected integer tokens, got dtype {arr.dtype}")
    if want.kind in "iu" and arr.size:
      info = np.iinfo(want)
      if arr.min() < info.min or arr.max() > info.max:
        raise ValueError(f"{owner}.{name}: values outside the {want} range")
    if want.kind == "f" and arr.dtype.kind not in "fiub":
      raise ValueError(f"{owner}.{name}: expected numbers, got dtype {arr.dtype}")
    arr = arr.astype(want)
  return np.ascontiguousarray(arr)


@dataclasses.dataclass(eq=False)
class HardItem:
  """A Hard prompt (no sample correct): trained by SFT on one teacher trace."""
  uid: str
  prompt_tokens: np.ndarray  # [P] int32
  teacher: str  # Name of the chosen teacher.
  teacher_index: int  # Index of the chosen trace among the prompt's teacher traces.
  response_tokens: np.ndarray  # [R] int32, the chosen trace, ends with eos.
  step: int  # Rollout step at which the item was queued.

  def __post_init__(self):
    owner = f"HardItem(uid={self.uid!r})"
    if not isinstance(self.uid, str):
      raise ValueError(f"{owner}.uid must be a str, got {type(self.uid).__name__}")
    if not isinstance(self.teacher, str):
      raise ValueError(f"{owner}.teacher must be a str, got {type(self.teacher).__name__}")
    self.prompt_tokens = _as_array(owner, "prompt_tokens", self.prompt_tokens, np.int32, 1)
    self.response_tokens = _as_array(owner, "response_tokens", self.response_tokens, np.int32, 1)
    self.teacher_index = int(self.teacher_index)
    self.step = int(self.step)


@dataclasses.dataclass(eq=False)
class MidItem:
  """A Mid prompt (some, not all, samples correct): its sampled group, trained by GRPO + GAL."""
  uid: str
  prompt_tokens: np.ndarray  # [P] int32
  response_tokens: np.ndarray  # [K, T] int32
  response_lengths: np.ndarray  # [K] int32
  rewards: np.ndarray  # [K] float32, binary correctness.
  shaped_rewards: np.ndarray  # [K] float32, reward + format penalty (for the advantage).
  logprobs: np.ndarray  # [K, T] float32, the sampling policy's per-token log-probs.
  step: int  # Rollout step at which the item was queued.
  teacher_tokens: np.ndarray | None = None  # [R] int32, LUFFY-style off-policy group member.
  teacher: str | None = None

  def __post_init__(self):
    owner = f"MidItem(uid={self.uid!r})"
    if not isinstance(self.uid, str):
      raise ValueError(f"{owner}.uid must be a str, got {type(self.uid).__name__}")
    if self.teacher is not None and not isinstance(self.teacher, str):
      raise ValueError(f"{owner}.teacher must be a str or None, got {type(self.teacher).__name__}")
    self.prompt_tokens = _as_array(owner, "prompt_tokens", self.prompt_tokens, np.int32, 1)
    self.response_tokens = _as_array(owner, "response_tokens", self.response_tokens, np.int32, 2)
    k, t = self.response_tokens.shape
    self.response_lengths = _as_array(
        owner, "response_lengths", self.response_lengths, np.int32, 1)
    self.rewards = _as_array(owner, "rewards", self.rewards, np.float32, 1)
    self.shaped_rewards = _as_array(owner, "shaped_rewards", self.shaped_rewards, np.float32, 1)
    self.logprobs = _as_array(owner, "logprobs", self.logprobs, np.float32, 2)
    for name in ("response_lengths", "rewards", "shaped_rewards"):
      if getattr(self, name).shape != (k,):
        raise ValueError(f"{owner}.{name}: shape {getattr(self, name).shape}, expected ({k},) "
                         f"to match response_tokens {self.response_tokens.shape}")
    if self.logprobs.shape != (k, t):
      raise ValueError(f"{owner}.logprobs: shape {self.logprobs.shape}, expected ({k}, {t})")
    if k and (self.response_lengths.min() < 0 or self.response_lengths.max() > t):
      raise ValueError(
          f"{owner}.response_lengths={self.response_lengths.tolist()} outside [0, {t}]")
    if self.teacher_tokens is not None:
      self.teacher_tokens = _as_array(owner, "teacher_tokens", self.teacher_tokens, np.int32, 1)
    self.step = int(self.step)


# Array fields persisted per queue, with their dtypes.
_HARD_ARRAYS = (("prompt_tokens", np.int32), ("response_tokens", np.int32))
_MID_ARRAYS = (("prompt_tokens", np.int32), ("response_tokens", np.int32),
               ("response_lengths", np.int32), ("rewards", np.float32),
               ("shaped_rewards", np.float32), ("logprobs", np.float32),
               ("teacher_tokens", np.int32))


class QueueSet:
  """Two FIFO queues (`hard`, `mid`) sharing one arrival counter.

  `pop_batch(n)` takes the n oldest items across both queues, in arrival order.
  """

  def __init__(self):
    self._hard: collections.deque[tuple[int, HardItem]] = collections.deque()
    self._mid: collections.deque[tuple[int, MidItem]] = collections.deque()
    self._counter = 0  # Arrival number of the next pushed item.

  # --- Queue operations. ---

  def push_hard(self, item: HardItem) -> None:
    if not isinstance(item, HardItem):
      raise ValueError(f"push_hard expects a HardItem, got {type(item).__name__}")
    self._hard.append((self._counter, item))
    self._counter += 1

  def push_mid(self, item: MidItem) -> None:
    if not isinstance(item, MidItem):
      raise ValueError(f"push_mid expects a MidItem, got {type(item).__name__}")
    self._mid.append((self._counter, item))
    self._counter += 1

  def __len__(self) -> int:
    return len(self._hard) + len(self._mid)

  def depths(self) -> dict[str, int]:
    return {"hard": len(self._hard), "mid": len(self._mid)}

  def ready(self, n: int) -> bool:
    """Whether `pop_batch(n)` can fill a batch of n items."""
    return len(self) >= n

  @property
  def hard(self) -> list[HardItem]:
    """The Hard items, oldest first (a copy; the queue is unchanged)."""
    return [item for _, item in self._hard]

  @property
  def mid(self) -> list[MidItem]:
    """The Mid items, oldest first (a copy; the queue is unchanged)."""
    return [item for _, item in self._mid]

  @property
  def counter(self) -> int:
    """Total items ever pushed (the arrival number of the next push)."""
    return self._counter

  def pop_batch(self, n: int) -> tuple[list[HardItem], list[MidItem], list[str]]:
    """Removes the n oldest items across both queues.

    Returns:
      `(hard_items, mid_items, arrival_order)`: each list oldest first; `arrival_order[i]` is
      "hard" or "mid", the queue of the i-th oldest popped item (the j-th "hard" in it is
      `hard_items[j]`).
    """
    if n <= 0:
      raise ValueError(f"pop_batch(n={n}): n must be positive")
    if n > len(self):
      raise ValueError(f"pop_batch(n={n}) but only {len(self)} items are queued ({self.depths()})")
    hard, mid, order = [], [], []
    for _ in range(n):
      if self._hard and (not self._mid or self._hard[0][0] < self._mid[0][0]):
        hard.append(self._hard.popleft()[1])
        order.append("hard")
      else:
        mid.append(self._mid.popleft()[1])
        order.append("mid")
    return hard, mid, order

  # --- Serialisation. ---

  def to_bytes(self) -> bytes:
    """The whole queue state (both queues, arrival numbers, counter) as bytes."""
    meta = {"format": _FORMAT, "version": _VERSION, "counter": self._counter, "hard": [], "mid": []}
    arrays = {}
    for qname, queue, fields in (("hard", self._hard, _HARD_ARRAYS),
                                 ("mid", self._mid, _MID_ARRAYS)):
      chunks = {f: [] for f, _ in fields}
      for seq, item in queue:
        rec = {"seq": seq, "uid": item.uid, "step": item.step, "shapes": {}}
        if qname == "hard":
          rec.update(teacher=item.teacher, teacher_index=item.teacher_index)
        else:
          rec.update(teacher=item.teacher)
        for f, _ in fields:
          value = getattr(item, f)
          rec["shapes"][f] = None if value is None else list(value.shape)
          if value is not None:
            chunks[f].append(value.ravel())
        meta[qname].append(rec)
      for f, dtype in fields:
        arrays[f"{qname}/{f}"] = (np.concatenate(chunks[f]).astype(dtype, copy=False)
                                  if chunks[f] else np.zeros((0,), dtype))
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()

  @classmethod
  def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> "QueueSet":
    """Inverse of `to_bytes`. Malformed data raises ValueError naming `source`."""
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
      meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError, ValueError,
            UnicodeDecodeError) as e:
      raise ValueError(f"{source}: not a readable queue file ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
      raise ValueError(f"{source}: format is not {_FORMAT!r}")
    if meta.get("version") != _VERSION:
      raise ValueError(f"{source}: queue format version {meta.get('version')!r}, "
                       f"this code reads version {_VERSION}")
    qs = cls()
    try:
      qs._counter = int(meta["counter"])
      for qname, fields in (("hard", _HARD_ARRAYS), ("mid", _MID_ARRAYS)):
        offsets = {f: 0 for f, _ in fields}
        queue = qs._hard if qname == "hard" else qs._mid
        for rec in meta[qname]:
          values = {}
          for f, _ in fields:
            shape = rec["shapes"][f]
            if shape is None:
              values[f] = None
              continue
            flat = arrays[f"{qname}/{f}"]
            size = int(np.prod(shape, dtype=np.int64))
            if offsets[f] + size > flat.shape[0]:
              raise ValueError(f"array {qname}/{f} too short for item uid={rec['uid']!r}")
            values[f] = flat[offsets[f]:offsets[f] + size].reshape(shape).copy()
            offsets[f] += size
          if qname == "hard":
            item = HardItem(uid=rec["uid"], teacher=rec["teacher"],
                            teacher_index=rec["teacher_index"], step=rec["step"], **values)
          else:
            item = MidItem(uid=rec["uid"], teacher=rec["teacher"], step=rec["step"], **values)
          queue.append((int(rec["seq"]), item))
        for f, _ in fields:
          if offsets[f] != arrays[f"{qname}/{f}"].shape[0]:
            raise ValueError(f"array {qname}/{f} has {arrays[f'{qname}/{f}'].shape[0]} values, "
                             f"items use {offsets[f]}")
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{source}: inconsistent queue file ({type(e).__name__}: {e})") from e
    seqs = [s for s, _ in qs._hard] + [s for s, _ in qs._mid]
    if len(set(seqs)) != len(seqs) or any(s >= qs._counter for s in seqs):
      raise ValueError(f"{source}: arrival numbers are duplicated or not below the counter")
    return qs
