"""`RunState`: everything a run changes from one update to the next, as one object.

The Trainer holds its plan (config-derived values, the sampler, the compiled programs) and one
`RunState`; a checkpoint (`run_checkpoint`) saves and restores a `RunState` whole, so what a
restart continues from is exactly this dataclass.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dypo_jax.data import pipeline as pipeline_lib
from dypo_jax.rl import queues as queues_lib


@dataclasses.dataclass
class RunState:
  """What a run's next update depends on, besides its config."""
  train: Any  # train_step.TrainState: policy params, optimizer state, step, skip counter.
  ref_params: Any  # The frozen reference policy (never donated, never updated).
  queues: queues_lib.QueueSet  # Hard and Mid items waiting for an update.
  stream: pipeline_lib.IndexStream  # This process's position in its shard of the pool.
  rng: jax.Array  # The run's root key; every draw derives from it and a counter.
  teacher_counts: np.ndarray  # [teachers] int64: traces drawn per teacher so far.
  step: int = 0  # Updates so far: the host's copy of train.step.
  rollout_round: int = 0
  empty_updates_in_a_row: int = 0
  eval_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  @classmethod
  def initial(cls, *, train: Any, params: Any, pool_size: int, seed: int, shuffle: bool,
              num_teachers: int) -> "RunState":
    """A run's state before its first update: the reference is a copy of `params`."""
    return cls(train=train, ref_params=jax.tree.map(jnp.copy, params),
               queues=queues_lib.QueueSet(),
               stream=pipeline_lib.IndexStream(pool_size, seed=seed, shuffle=shuffle),
               rng=jax.random.key(seed),
               teacher_counts=np.zeros((max(num_teachers, 1),), np.int64))

  def arrays(self) -> dict[str, Any]:
    """The device arrays a checkpoint saves (the rest is JSON or bytes)."""
    return {"train": self.train, "ref": self.ref_params}
