"""Continuous batching: a round's samples decoded on a fixed number of rows, refilled as they end.

Letters as in sampler.py: B prompts, K samples per prompt, N = B * K samples, R rows in flight,
P prompt slots, T = max_new_tokens, S cache slots per row (>= P + T), V vocab.

Sample n = b * K + k belongs to prompt b. A row holds one sample at a time: its prompt's P
prefilled slots (copied from the round's shared prompt cache, so each prompt is prefilled once
whatever K), then its response at slots P, P + 1, ... Each row has its own position (the cache
is per-row: `KVCache.per_row`), so a refilled row starts at its first token while the others go
on. Token i of sample n is drawn with uniforms[n, i], made from the sample's own key before the
loop: the tokens depend on (rng, b, k, i) only, never on the row, the time or R.

`run_segment` decodes (refilling free rows with pending samples every STEPS_PER_CHECK steps)
until no sample is pending and at most `exit_rows` rows are live; `compact` then moves the live
rows into a batch of `exit_rows` rows (finished rows leave the batch), and the host runs the next
segment at that size. Pure functions of (State, Round); the sampler jits them.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp

from dypo_jax.models import kv_cache

# Decode steps between two looks at the rows (refill, "may this segment end?"): each look reduces
# over the rows, a cross-device barrier on a sharded batch. A finished row idles at most this
# many steps minus one before it is refilled.
STEPS_PER_CHECK = 8


@flax.struct.dataclass
class Round:
  """What every row reads and nobody writes during one `Sampler.sample` call."""
  params: Any  # The model's Param state in the compute dtype.
  prompt_cache: kv_cache.KVCache  # [.., B, KV, P, H]: the prefilled prompts.
  logits: jax.Array  # [B, V] float32: next-token logits after each prompt.
  prompt_lengths: jax.Array  # [B] int32
  uniforms: jax.Array  # [N, T] float32: sample n's draw for its token i.
  stop_ids: jax.Array  # [MAX_STOP_IDS] int32, -1 for none.
  temperature: jax.Array
  top_p: jax.Array
  top_k: jax.Array
  num_samples: jax.Array  # [] int32: samples to run (those of real prompts: n < num_samples).


@flax.struct.dataclass
class State:
  """The loop carry: per-row fields [R], per-sample results [N, ...]."""
  sample: jax.Array  # [R] int32: the sample the row holds (N for none yet).
  step: jax.Array  # [R] int32: tokens the row's sample has generated.
  last: jax.Array  # [R] int32: its last token (fed next).
  live: jax.Array  # [R] bool: still generating.
  starts: jax.Array  # [R] int32: first real prompt slot of the row.
  cache: kv_cache.KVCache  # per-row [.., R, KV, S, H].
  next_sample: jax.Array  # [] int32: the first sample not yet given a row.
  tokens: jax.Array  # [N, T] int32, pad after the stop.
  logprobs: jax.Array  # [N, T] float32, 0 after the stop.
  lengths: jax.Array  # [N] int32
  stopped: jax.Array  # [N] bool: ended on a stop id.


def init_state(rows_cache: kv_cache.KVCache, *, num_samples: int, max_new_tokens: int,
               pad_id: int) -> State:
  """Every row free; nothing generated."""
  r, n, t = rows_cache.starts.shape[0], num_samples, max_new_tokens
  zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
  return State(sample=jnp.full((r,), n, jnp.int32), step=zeros(r), last=zeros(r),
               live=jnp.zeros((r,), jnp.bool_), starts=zeros(r), cache=rows_cache,
               next_sample=zeros(), tokens=jnp.full((n, t), pad_id, jnp.int32),
               logprobs=jnp.zeros((n, t), jnp.float32), lengths=zeros(n),
               stopped=jnp.zeros((n,), jnp.bool_))


def _record(state: State, rows: jax.Array, column: jax.Array, tok, lp, stop_ids) -> tuple:
  """Writes token `column` of the samples held by `rows` (a bool [R]); returns the new sample
  buffers and whether each row's token is a stop id."""
  n = state.tokens.shape[0]
  idx = jnp.where(rows, state.sample, n)  # Out of range: the write is dropped.
  is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
  return dict(tokens=state.tokens.at[idx, column].set(tok, mode="drop"),
              logprobs=state.logprobs.at[idx, column].set(lp, mode="drop"),
              lengths=state.lengths.at[idx].set(column + 1, mode="drop"),
              stopped=state.stopped.at[idx].set(is_stop, mode="drop")), is_stop


def refill(state: State, rnd: Round, *, num_samples_per_prompt: int, pick) -> State:
  """Free rows take the next pending samples: their prompt's slots and first token."""
  r, t = state.sample.shape[0], state.tokens.shape[1]
  n = state.tokens.shape[0]
  free = ~state.live
  candidate = state.next_sample + jnp.cumsum(free.astype(jnp.int32)) - 1
  fill = free & (candidate < rnd.num_samples)
  count = jnp.sum(fill.astype(jnp.int32))

  def fill_rows(state: State) -> State:
    sample = jnp.where(fill, candidate, state.sample)
    prompt = jnp.minimum(sample, n - 1) // num_samples_per_prompt
    p = rnd.prompt_cache.length
    dest = jnp.where(fill, jnp.arange(r), r)  # Rows not filled: dropped.

    def copy(rows, prompts):  # rows [R, KV, S, H], prompts [B, KV, P, H] (one layer).
      return rows.at[dest, :, :p].set(prompts[prompt].astype(rows.dtype), mode="drop")

    cache = state.cache
    if cache.stacked:
      cache = cache.replace(k=jax.vmap(copy)(cache.k, rnd.prompt_cache.k),
                            v=jax.vmap(copy)(cache.v, rnd.prompt_cache.v))
    else:
      cache = cache.replace(k=tuple(map(copy, cache.k, rnd.prompt_cache.k)),
                            v=tuple(map(copy, cache.v, rnd.prompt_cache.v)))
    uniform = rnd.uniforms[jnp.minimum(sample, n - 1), 0]
    tok, lp = pick(rnd.logits[prompt], uniform)
    state = state.replace(sample=sample, cache=cache)
    buffers, is_stop = _record(state, fill, jnp.zeros((r,), jnp.int32), tok, lp, rnd.stop_ids)
    return state.replace(
        step=jnp.where(fill, 1, state.step), last=jnp.where(fill, tok, state.last),
        live=jnp.where(fill, ~is_stop & (t > 1), state.live),
        starts=jnp.where(fill, p - rnd.prompt_lengths[prompt], state.starts),
        next_sample=state.next_sample + count, **buffers)

  return jax.lax.cond(count > 0, fill_rows, lambda s: s, state)


def decode_step(state: State, rnd: Round, *, model, pick, constrain_logits) -> State:
  """Every live row feeds its last token at its own slot and samples its next one."""
  n, t = state.tokens.shape
  p = rnd.prompt_cache.length
  prompt_len = rnd.prompt_lengths[jnp.minimum(state.sample, n - 1) // _k_of(rnd, n)]
  # Finished rows write slot 0 and see [0, 1): they never widen the slots a step reads (their
  # output is dropped; a refill rewrites their prompt slots).
  cache = state.cache.replace(end_index=jnp.where(state.live, p + state.step - 1, 0),
                              starts=jnp.where(state.live, state.starts, 0))
  positions = (prompt_len + state.step - 1)[:, None]
  logits, cache = model.forward(state.last[:, None], positions=positions, attention_mask=None,
                                cache=cache)
  column = jnp.minimum(state.step, t - 1)
  uniform = rnd.uniforms[jnp.minimum(state.sample, n - 1), column]
  tok, lp = pick(constrain_logits(logits[:, 0, :]), uniform)
  buffers, is_stop = _record(state, state.live, column, tok, lp, rnd.stop_ids)
  step = jnp.where(state.live, state.step + 1, state.step)
  return state.replace(step=step, last=tok, live=state.live & ~is_stop & (step < t), cache=cache,
                       **buffers)


def _k_of(rnd: Round, n: int) -> int:
  """K, from the shapes: N samples over B prompts."""
  return n // rnd.prompt_lengths.shape[0]


def run_segment(state: State, rnd: Round, *, exit_rows: int, model, pick,
                constrain_logits) -> State:
  """Decodes until every sample has a row and at most `exit_rows` rows are live (0: all done)."""
  n, t = state.tokens.shape
  k = _k_of(rnd, n)

  def keep_going(st: State):
    pending = st.next_sample < rnd.num_samples
    return pending | (jnp.sum(st.live.astype(jnp.int32)) > exit_rows)

  def steps(st: State) -> State:
    st = refill(st, rnd, num_samples_per_prompt=k, pick=pick)
    # At most STEPS_PER_CHECK steps, fewer when every live row ends sooner by length.
    left = jnp.max(jnp.where(st.live, t - st.step, 0))
    todo = jnp.minimum(left, STEPS_PER_CHECK)
    step = lambda _, s: decode_step(s, rnd, model=model, pick=pick,
                                    constrain_logits=constrain_logits)
    return jax.lax.fori_loop(0, todo, step, st)

  return jax.lax.while_loop(keep_going, steps, state)


def compact(state: State, rows: int) -> State:
  """The live rows (at most `rows` of them) moved into a batch of `rows` rows."""
  order = jnp.argsort(~state.live, stable=True)[:rows]
  take = lambda x: x[order]
  cache = state.cache.map_layers(take).replace(end_index=take(state.cache.end_index),
                                               starts=take(state.cache.starts))
  return state.replace(sample=take(state.sample), step=take(state.step), last=take(state.last),
                       live=take(state.live), starts=take(state.starts), cache=cache)
