"""The update batch: one fixed layout for any mix of Hard and Mid items, so a run compiles a known,
small number of update programs.

U items (slots), K rows each, L = P + T tokens per row (prompt left-padded to P, response
right-padded to T):

  tokens      [U, K, L] int32   input_mask [U, K, L] bool   resp_mask [U, K, T] f32
  old_logp    [U, K, T] f32     sampling-policy log-probs of the response tokens (rollout rows)
  rewards     [U, K] f32        binary correctness (GAL pairs)
  adv_rewards [U, K] f32        the reward the GRPO advantage is computed from (shaped)
  row_kind    [U, K] int32      ROW_PAD, ROW_ROLLOUT, ROW_TEACHER_SFT, ROW_TEACHER_OFFPOLICY
  teacher_id  [U, K] int32      index of an SFT row's teacher, -1 elsewhere
  weights     [3] f32           (w_sft, w_grpo, w_gal), `routing.loss_weights` of the batch

Hard items are packed K to a slot, one teacher trace per row; a Mid item holds its K rollouts;
LUFFY-style mixing holds K-1 rollouts and the teacher trace as an off-policy row. U comes in a few
buckets (the smallest that holds the batch is used), so an all-Hard batch does not pay for the
rows an all-Mid batch needs. A batch of groups alone (no packed Hard slot: `slots_share_prompts`)
can run each slot's prompt once (`train_step.StepConfig.shared_prompt`).
"""
from collections.abc import Sequence
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

ROW_PAD, ROW_ROLLOUT, ROW_TEACHER_SFT, ROW_TEACHER_OFFPOLICY = 0, 1, 2, 3
TERMS = ("sft", "grpo", "gal")  # The order of `weights` and of the step's loss terms.


def micro_batch_error(*, items: int, micro_batches: int, k: int, batch_shards: int) -> str | None:
  """Why an update batch of `items` slots cannot be split as asked on the mesh, or None.

  The batch [items, K, L] is placed with its items over the batch shards, and each of the
  `micro_batches` micro-batches runs on its items * K rows split over the same shards.
  """
  if items % micro_batches:
    return (f"train.update_prompts={items} must be a multiple of "
            f"train.micro_batches={micro_batches}")
  if items % batch_shards:
    return (f"train.update_prompts={items} must be a multiple of the {batch_shards} batch "
            f"shards of the mesh (the update batch's items are split over them)")
  rows = items // micro_batches * k
  if rows % batch_shards:
    return (f"a micro-batch holds train.update_prompts / train.micro_batches * K = {items} / "
            f"{micro_batches} * {k} = {rows} rows, which must be a multiple of the "
            f"{batch_shards} batch shards of the mesh")
  return None


def slot_buckets(*, update_prompts: int, micro_batches: int, k: int,
                 batch_shards: int) -> list[int]:
  """The update batch's slot counts: a quarter, half or all of update_prompts, rounded up.

  Each is the smallest multiple of the quantum that micro-batches and batch shards allow (see
  `micro_batch_error`), so packed Hard items need not fill a batch sized for Mid groups.
  """
  # A bucket is micro_batches * j slots, with j * K rows and micro_batches * j slots both
  # dividing over the batch shards.
  j = math.lcm(batch_shards // math.gcd(batch_shards, k),
               batch_shards // math.gcd(batch_shards, micro_batches))
  quantum = micro_batches * j
  return sorted({-(-max(update_prompts * f // 4, 1) // quantum) * quantum for f in (1, 2, 4)})


def spec_shapes(*, items: int, k: int, prompt_len: int, max_len: int) -> dict[str, tuple]:
  """{name: (shape, dtype)} of an update batch (for abstract compilation and for padding)."""
  l = prompt_len + max_len
  return {
      "tokens": ((items, k, l), jnp.int32), "input_mask": ((items, k, l), jnp.bool_),
      "resp_mask": ((items, k, max_len), jnp.float32),
      "old_logp": ((items, k, max_len), jnp.float32), "rewards": ((items, k), jnp.float32),
      "adv_rewards": ((items, k), jnp.float32), "row_kind": ((items, k), jnp.int32),
      "teacher_id": ((items, k), jnp.int32), "weights": ((len(TERMS),), jnp.float32),
  }


def layout(hard: Sequence[Any], mid: Sequence[Any], *,
           slot_buckets: Sequence[int],  # pylint: disable=redefined-outer-name
           k: int, prompt_len: int, max_len: int, pad_id: int,
           teacher_index: dict[str, int]) -> tuple[dict[str, np.ndarray], int]:
  """Lays queued Hard and Mid items (`queues.HardItem`, `MidItem`) out as a host update batch.

  Hard items are packed K to a slot (one teacher trace a row), then one slot per Mid item (its
  rollouts, and a LUFFY-style teacher row last when it carries one); U is the smallest of
  `slot_buckets` that holds them. `weights` is left zero for the caller. Returns (batch, the
  number of Mid items with an off-policy teacher row).
  """
  p, t = prompt_len, max_len
  hard_slots = -(-len(hard) // k)
  u = next(b for b in slot_buckets if b >= hard_slots + len(mid))
  shapes = spec_shapes(items=u, k=k, prompt_len=p, max_len=t)
  batch = {name: np.zeros(shape, np.dtype(dtype)) for name, (shape, dtype) in shapes.items()}
  batch["tokens"][:] = pad_id
  batch["teacher_id"][:] = -1

  def put_row(slot, row, prompt, response, kind, old_logp=None):
    batch["tokens"][slot, row, p - len(prompt):p] = prompt  # Left-padded prompt.
    batch["tokens"][slot, row, p:p + len(response)] = response
    batch["input_mask"][slot, row, p - len(prompt):p + len(response)] = True
    batch["resp_mask"][slot, row, :len(response)] = 1.0
    batch["row_kind"][slot, row] = kind
    if old_logp is not None:
      batch["old_logp"][slot, row, :len(response)] = old_logp[:len(response)]

  for i, item in enumerate(hard):
    put_row(i // k, i % k, item.prompt_tokens, item.response_tokens, ROW_TEACHER_SFT)
    batch["teacher_id"][i // k, i % k] = teacher_index[item.teacher]
  slot, offline = hard_slots, 0
  for item in mid:
    rollouts = len(item.response_lengths)  # K, or K - 1 in LUFFY-style groups.
    for j in range(rollouts):
      n = int(item.response_lengths[j])
      put_row(slot, j, item.prompt_tokens, item.response_tokens[j, :n], ROW_ROLLOUT,
              item.logprobs[j])
    batch["rewards"][slot, :rollouts] = item.rewards[:rollouts]
    batch["adv_rewards"][slot, :rollouts] = item.shaped_rewards[:rollouts]
    if item.teacher_tokens is not None:
      put_row(slot, k - 1, item.prompt_tokens, item.teacher_tokens, ROW_TEACHER_OFFPOLICY)
      batch["rewards"][slot, k - 1] = 1.0
      batch["adv_rewards"][slot, k - 1] = 1.0
      offline += 1
    slot += 1
  return batch, offline


def slots_share_prompts(batch: dict[str, np.ndarray], prompt_len: int) -> bool:
  """Whether every slot's K rows hold one prompt (true unless a packed Hard slot is there)."""
  prompts = batch["tokens"][:, :, :prompt_len]
  masks = batch["input_mask"][:, :, :prompt_len]
  return bool((prompts == prompts[:, :1]).all() and (masks == masks[:, :1]).all())
