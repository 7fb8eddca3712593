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

Packed (`pack`, train.pack_updates): the model runs instead on R rows of L tokens that each hold
several sequences (first-fit decreasing by length), so its cost follows the real tokens, not
U * K * L. The [U, K, ...] arrays above stay as they are (the losses read them); the packed ones
say what the model runs and where each response token's prediction lands:

  pack_tokens    [R, L] int32   input tokens, several segments a row
  pack_targets   [R, L] int32   the token each position predicts (0 where none)
  pack_positions [R, L] int32   RoPE positions, restarting at each sequence
  pack_segments  [R, L] int32   segment id within the row (0: padding)
  pack_prefix    [R, L] int32   the segment a response's queries see besides their own: its shared
                                prompt (0: none); `models.segment_mask`
  pack_row       [R, L] int32   the micro-batch's row (u_local * K + k) a position predicts for,
                                -1 where none
  pack_index     [U, K, T] int32  where response token t of row (u, k) is predicted: an index into
                                its micro-batch's flattened [R / M * L] positions

Packed row r of micro-batch j is row r * M + j, so the step's strided split of the leading axis
gives each micro-batch its own rows, as it does for U. A slot whose rows share their prompt packs
it once per packed row as its own segment, and each response as the prompt's last token and the
response (the shared-prompt trick, per slot); other rows pack whole.
"""
from collections.abc import Sequence
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

ROW_PAD, ROW_ROLLOUT, ROW_TEACHER_SFT, ROW_TEACHER_OFFPOLICY = 0, 1, 2, 3
TERMS = ("sft", "grpo", "gal")  # The order of `weights` and of the step's loss terms.
# A packed batch's [R, L] arrays (`pack`); with them comes pack_index [U, K, T].
PACKED_ROW_ARRAYS = ("pack_tokens", "pack_targets", "pack_positions", "pack_segments",
                     "pack_prefix", "pack_row")


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


def spec_shapes(*, items: int, k: int, prompt_len: int, max_len: int,
                pack_rows: int | None = None) -> dict[str, tuple]:
  """{name: (shape, dtype)} of an update batch (for abstract compilation and for padding).

  `pack_rows`: the packed rows of the whole batch (micro-batches * rows of one, see `pack`), or
  None for a batch without the packed arrays.
  """
  l = prompt_len + max_len
  shapes = {
      "tokens": ((items, k, l), jnp.int32), "input_mask": ((items, k, l), jnp.bool_),
      "resp_mask": ((items, k, max_len), jnp.float32),
      "old_logp": ((items, k, max_len), jnp.float32), "rewards": ((items, k), jnp.float32),
      "adv_rewards": ((items, k), jnp.float32), "row_kind": ((items, k), jnp.int32),
      "teacher_id": ((items, k), jnp.int32), "weights": ((len(TERMS),), jnp.float32),
  }
  if pack_rows is not None:
    shapes.update({name: ((pack_rows, l), jnp.int32) for name in PACKED_ROW_ARRAYS})
    shapes["pack_index"] = ((items, k, max_len), jnp.int32)
  return shapes


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


def pack_row_buckets(*, rows: int, quantum: int) -> list[int]:
  """The packed row counts of one micro-batch, up to its `rows` unpacked rows: multiples of the
  quantum (the batch shards the rows split over), each at most ~1/8 above the one before, so a
  batch pads at most ~12% of its rows. A batch takes the smallest that holds it; a run compiles
  a bucket's programs when it first meets it (a long-tailed run meets a few neighbours)."""
  up = lambda x: -(-x // quantum) * quantum
  top, buckets = up(rows), [quantum]
  while buckets[-1] < top:
    buckets.append(min(top, buckets[-1] + up(-(-buckets[-1] // 8))))
  return buckets


def pack(batch: dict[str, np.ndarray], *, micro_batches: int, prompt_len: int,
         row_buckets: Sequence[int], share_prompts: bool) -> dict[str, np.ndarray]:
  """The batch with its packed arrays added (see the module docstring); the inputs unchanged.

  Each micro-batch (items j, j + M, ...) packs its rows into bins of L tokens, first-fit
  decreasing by length: a row costs its prompt and response less the last token (which predicts
  nothing), a response of a slot whose prompt a bin already holds costs its response alone. Every
  micro-batch gets the rows of the smallest of `row_buckets` that holds its fullest.
  """
  tokens, input_mask, resp_mask = batch["tokens"], batch["input_mask"], batch["resp_mask"]
  u_all, k_all, l = tokens.shape
  p_all, m = prompt_len, micro_batches
  if u_all % m:
    raise ValueError(f"update batch of {u_all} items does not split into {m} micro-batches")
  lengths = resp_mask.sum(-1).astype(np.int64)  # [U, K]
  prompt_lens = input_mask[:, :, :p_all].sum(-1).astype(np.int64)

  def prompt_of(u, k):
    return tokens[u, k, p_all - prompt_lens[u, k]:p_all]

  bins_of = []  # Per micro-batch: bins, each a list of segments (kind, u, k, u_local).
  for j in range(m):
    pieces = []
    for ul, u in enumerate(range(j, u_all, m)):
      active = [k for k in range(k_all) if lengths[u, k] > 0]
      shared = share_prompts and len(active) > 1 and all(
          prompt_lens[u, k] == prompt_lens[u, active[0]]
          and np.array_equal(prompt_of(u, k), prompt_of(u, active[0])) for k in active)
      for k in active:
        pieces.append((int(prompt_lens[u, k] + lengths[u, k] - 1), shared, u, k, ul))
    pieces.sort(key=lambda x: -x[0])  # Stable: ties keep the batch's order.
    free, bins, prompts_in = [], [], []  # prompts_in[b]: slots whose prompt bin b holds.
    for cost, shared, u, k, ul in pieces:
      n = int(lengths[u, k])
      where = None
      if shared:
        where = next((b for b in range(len(bins)) if u in prompts_in[b] and free[b] >= n), None)
      if where is None:
        where = next((b for b in range(len(bins)) if free[b] >= cost), None)
        if where is None:
          free.append(l)
          bins.append([])
          prompts_in.append(set())
          where = len(bins) - 1
        if shared:
          bins[where].append(("prompt", u, k, ul))
          prompts_in[where].add(u)
          free[where] -= cost - n
      bins[where].append(("response" if shared else "row", u, k, ul))
      free[where] -= n if shared else cost
    bins_of.append(bins)

  fullest = max(len(bins) for bins in bins_of)
  fits = [b for b in row_buckets if b >= fullest]
  if not fits:
    raise ValueError(f"a micro-batch packs into {fullest} rows, more than the largest bucket "
                     f"{max(row_buckets)}")
  rows = fits[0]
  out = {name: np.zeros((m * rows, l), np.int32) for name in PACKED_ROW_ARRAYS}
  out["pack_row"][:] = -1
  index = np.zeros(resp_mask.shape, np.int32)
  for j, bins in enumerate(bins_of):
    for r, segments in enumerate(bins):
      g = r * m + j  # Packed row r of micro-batch j (the step's strided split).
      at, prompt_segment = 0, {}
      for s, (kind, u, k, ul) in enumerate(segments, start=1):
        prompt, n = prompt_of(u, k), int(lengths[u, k])
        p = len(prompt)
        response = tokens[u, k, p_all:p_all + n]
        if kind == "prompt":
          seq, first_pos, first_pred = prompt[:-1], 0, None
          prompt_segment[u] = s
        elif kind == "response":
          seq, first_pos, first_pred = np.concatenate([prompt[-1:], response[:-1]]), p - 1, 0
          out["pack_prefix"][g, at:at + len(seq)] = prompt_segment[u]
        else:
          seq, first_pos, first_pred = np.concatenate([prompt, response[:-1]]), 0, p - 1
        span = slice(at, at + len(seq))
        out["pack_tokens"][g, span] = seq
        out["pack_positions"][g, span] = first_pos + np.arange(len(seq))
        out["pack_segments"][g, span] = s
        if first_pred is not None:
          pred = slice(at + first_pred, at + first_pred + n)
          out["pack_targets"][g, pred] = response
          out["pack_row"][g, pred] = ul * k_all + k
          index[u, k, :n] = r * l + at + first_pred + np.arange(n)
        at += len(seq)
  out["pack_index"] = index
  return {**batch, **out}
