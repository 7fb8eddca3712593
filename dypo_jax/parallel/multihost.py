"""Host-side collectives for the multi-process loop: every process calls them in the same order.

With one process each is the identity (no collective runs), so single-host code pays nothing.
"""
import json
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Every process's `x` (the same shape on each) concatenated along axis 0, in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  stacked = np.asarray(multihost_utils.process_allgather(x, tiled=False))  # [processes, ...]
  return stacked.reshape((-1,) + x.shape[1:])


def gather_json(value: Any) -> list[Any]:
  """The JSON-serialisable `value` of every process, in process order."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), np.uint8)
  sizes = gather_rows(np.array([data.size], np.int32))
  padded = np.zeros((1, int(sizes.max())), np.uint8)
  padded[0, :data.size] = data
  rows = gather_rows(padded)
  return [json.loads(rows[i, :sizes[i]].tobytes().decode("utf-8")) for i in range(len(sizes))]


def any_process(flag: bool) -> bool:
  """True when `flag` is true on any process, so that every process takes the same branch."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(gather_rows(np.array([int(bool(flag))], np.int32)).any())
