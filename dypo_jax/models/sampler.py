"""Group sampler: k rollouts per prompt from one prefill, decoded in one jitted `lax.while_loop`.

Letters: B prompts (padded up to a multiple of the batch shards), K samples per prompt,
R = B * K rows, P prompt bucket length, T = max_new_tokens, S = P + T cache slots, V vocab.

Flow of one `Sampler.sample` call (one jitted program per (P, B, K, T, mode)):

  host: validate (errors before anything compiles), left-pad the prompts to the smallest bucket
        >= the longest one (capped so that P + T <= max_seq_len), pad B to the batch shards
  prefill: B rows once -> KVCache [B, S] and the last position's logits [B, V]
  repeat: the cache and the logits K times in place -> rows r = b * K + k
  step 0: sample from the prefill logits
  while step < T and not all rows done (checked every STEPS_PER_DONE_CHECK steps): feed the
        last token, sample the next one
  host: one device_get, drop padded rows

Static (retracing) arguments: P, B, K, T and the mode ("greedy" when temperature == 0,
"filter" when top-p < 1 or 0 < top-k < V, else "sample"). Temperature, top-p, top-k and the stop
ids (a fixed array of MAX_STOP_IDS) are traced values: eval at 0.6 and training at 1.0 share a
program, and new parameters of the same shapes never retrace.

Sampling rule (`sample_token`): inverse-CDF sampling with one uniform per row over the
temperature-scaled softmax; top-k / top-p (only in the `filter` mode) find exact thresholds by
bisection instead of sorting the vocabulary. Row r = b * K + k at step i uses
uniform(fold_in(fold_in(fold_in(rng, b), k), i)), all drawn before the loop: a sample depends
only on (rng, prompt index, sample index, step), not on the batch padding, the bucket, the stop
ids or how the batch is sharded.

Log-probs: `logprobs` is log-softmax(logits / temperature) of the sampled token over the whole
vocabulary (the filters are not renormalised into it); with temperature 0 it is the untempered
log-softmax.
"""
from collections.abc import Sequence
import dataclasses
import functools
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dypo_jax.models import continuous_batching
from dypo_jax.models import decode_attention
from dypo_jax.models import kv_cache
from dypo_jax.models import transformer
from dypo_jax.parallel import sharding as sharding_lib

STOP_TOKEN = 0  # The row sampled one of `stop_ids` (it is the last counted token).
STOP_LENGTH = 1  # The row reached max_new_tokens.
MAX_STOP_IDS = 8  # Stop ids travel as a fixed-size array so their number never retraces.
# Steps decoded between two "all rows done?" checks. The check reduces over every row, so on a
# sharded batch it is a cross-device all-reduce, and a barrier: on 2 CPU devices it cost a
# third of the decode time when made every step. Rows that finish early only idle (they record
# nothing), so at most STEPS_PER_DONE_CHECK - 1 steps are spent after the last row stops.
STEPS_PER_DONE_CHECK = continuous_batching.STEPS_PER_CHECK
# The smallest batch the finished rows are compacted down to (the ladder halves R until it).
MIN_ROWS = 4
DECODE_IMPLS = ("jnp", "pallas")
DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)

Mode = Literal["greedy", "sample", "filter"]


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Host (numpy) result of one `Sampler.sample` call.

  Response (b, k) is `tokens[b, k, :lengths[b, k]]`; its prompt is
  `prompt_tokens[b, P - prompt_lengths[b]:]` (left-padded with pad_id).
  """
  tokens: np.ndarray  # [B, K, T] int32, pad_id after the stop.
  # [B, K, T] float32: log-softmax(logits / temperature)[token], over the unfiltered vocabulary
  # (the sampling policy before top-p/top-k). With temperature 0 (greedy) the untempered value.
  # 0 after the stop.
  logprobs: np.ndarray
  lengths: np.ndarray  # [B, K] int32: tokens generated, the stop token included.
  stop_reason: np.ndarray  # [B, K] int32: STOP_TOKEN or STOP_LENGTH.
  prompt_tokens: np.ndarray  # [B, P] int32, left-padded with pad_id to the bucket P.
  prompt_lengths: np.ndarray  # [B] int32.
  num_compiles: int  # The sampler's trace count after this call.



def sampling_mode(*, temperature: float, top_p: float, top_k: int, vocab_size: int) -> Mode:
  """The static sampling branch: greedy, plain temperature sampling, or top-p/top-k filtering."""
  if temperature == 0.0:
    return "greedy"
  if top_p < 1.0 or 0 < top_k < vocab_size:
    return "filter"
  return "sample"


def _inverse_cdf(weights: jax.Array, uniform: jax.Array) -> jax.Array:
  """Index i with probability weights[i] / sum(weights).

  weights [R, V] >= 0 with a positive sum; uniform [R] in [0, 1).
  """
  cdf = jnp.cumsum(weights, axis=-1)  # [R, V]
  total = cdf[:, -1]
  # With target < total (a guard: IEEE rounding already keeps u * total < total for u < 1), the
  # first index whose cdf exceeds the target has a positive weight; filtered (zero) ones never.
  target = jnp.minimum(uniform * total, jnp.nextafter(total, 0.0))  # [R]
  return jnp.sum(cdf <= target[:, None], axis=-1, dtype=jnp.int32)


# float32 bit patterns of non-negative numbers sort like the numbers: bisection on them finds an
# exact threshold in 31 fused compare-and-reduce passes over [R, V], without sorting the
# vocabulary (an XLA:CPU sort of [64, 512] per step cost ~4 ms, ten times the whole search).
_ONE_BITS = 0x3F800000  # float32 1.0, the largest weight.
_BISECT_STEPS = 31  # Halves [0, 1.0 bits + 1] down to adjacent integers.


def _largest_threshold(bits: jax.Array, enough) -> jax.Array:
  """[R] the largest int32 t with enough(bits >= t) true (enough is monotone, true at t = 0)."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = enough(bits >= mid[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.zeros(bits.shape[:-1], jnp.int32)
  hi = jnp.full(bits.shape[:-1], _ONE_BITS + 1, jnp.int32)
  return jax.lax.fori_loop(0, _BISECT_STEPS, halve, (lo, hi))[0]


def _top_k_top_p_mask(weights: jax.Array, *, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """[R, V] bool: the tokens that survive top-k, then top-p on the renormalised top-k mass.

  weights [R, V] are unnormalised probabilities in [0, 1] (the row maximum is 1). Top-k keeps
  the tokens whose weight is >= the k-th largest; top-p then keeps the smallest set of the most
  likely survivors whose mass reaches top_p of the survivors' mass. Exact ties at a threshold are
  all kept (a sort would break them arbitrarily).
  """
  v = weights.shape[-1]
  bits = jax.lax.bitcast_convert_type(weights, jnp.int32)  # [R, V]
  k = jnp.where((top_k <= 0) | (top_k >= v), v, top_k)
  keep_all = lambda: jnp.zeros(bits.shape[:-1], jnp.int32)  # Threshold 0 keeps every token.
  t_k = jax.lax.cond(  # Each search runs only when its filter is on (the values are dynamic).
      k >= v, keep_all,
      lambda: _largest_threshold(bits, lambda sel: jnp.sum(sel, axis=-1, dtype=jnp.int32) >= k))
  kept = jnp.where(bits >= t_k[:, None], weights, 0.0)
  need = top_p * jnp.sum(kept, axis=-1)  # [R]
  t_p = jax.lax.cond(
      top_p >= 1.0, keep_all,
      lambda: _largest_threshold(
          bits, lambda sel: jnp.sum(jnp.where(sel, kept, 0.0), axis=-1) >= need))
  return (bits >= t_k[:, None]) & (bits >= t_p[:, None])


def sample_token(*, logits: jax.Array, uniform: jax.Array, temperature: jax.Array,
                 top_p: jax.Array, top_k: jax.Array,
                 mode: Mode) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The sampling rule for one step (pure).

  Args:
    logits: [R, V] float32 next-token logits.
    uniform: [R] uniforms in [0, 1), one per row (ignored when greedy).
    temperature: [] > 0 (ignored when greedy).
    top_p: [] in (0, 1]: keep the most likely tokens until their mass reaches top_p (`filter`).
    top_k: [] int: keep the top_k most likely tokens, 0 for all (`filter`).
    mode: "greedy" (argmax), "sample" (softmax(logits / temperature), no filtering) or "filter"
      (the same distribution restricted by top-k, then by top-p on the renormalised top-k mass,
      then renormalised; thresholds by bisection, no sort).

  Returns:
    (tokens [R] int32,
     logprobs [R]: log-softmax(logits / temperature) of the token over the unfiltered vocabulary;
       the untempered log-softmax when greedy).
  """
  logits = logits.astype(jnp.float32)
  take = lambda x, idx: jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
  if mode == "greedy":
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, take(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)

  scaled = logits / temperature  # [R, V]
  peak = jnp.max(scaled, axis=-1, keepdims=True)  # [R, 1]
  weights = jnp.exp(scaled - peak)  # [R, V] unnormalised probabilities, max 1.
  if mode == "sample":
    tokens = _inverse_cdf(weights, uniform)
    total = jnp.sum(weights, axis=-1)
  elif mode == "filter":
    keep = _top_k_top_p_mask(weights, top_k=top_k, top_p=top_p)
    tokens = _inverse_cdf(jnp.where(keep, weights, 0.0), uniform)
    total = jnp.sum(weights, axis=-1)
  else:
    raise ValueError(f"sampling mode {mode!r}; allowed: greedy, sample, filter")
  tokens = tokens.astype(jnp.int32)
  return tokens, take(scaled, tokens) - peak[:, 0] - jnp.log(total)


class Sampler:
  """Samples groups of K responses per prompt; build once, call every step with new params.

  `params` is the Param state of the model: `graphdef, params = nnx.split(model, nnx.Param)` (the
  Transformer holds nothing but Params, so this split is exhaustive). Only `graphdef` is baked
  into the compiled programs; new parameter values of the same shapes never retrace.
  """

  def __init__(self, graphdef: nnx.GraphDef, *, model_config: transformer.ModelConfig,
               pad_id: int, prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
               mesh: jax.sharding.Mesh | None = None,
               rules: sharding_lib.Rules | None = None, cache_dtype: Any = None,
               rows: int = 0, decode_block: int = decode_attention.DEFAULT_BLOCK,
               decode_impl: str = "jnp", prefill_chunk: int = 512):
    if not prompt_buckets or any(int(b) < 1 for b in prompt_buckets):
      raise ValueError(f"prompt_buckets={tuple(prompt_buckets)} must be positive lengths")
    if not 0 <= pad_id < model_config.vocab_size:
      raise ValueError(f"pad_id={pad_id} outside the vocabulary [0, {model_config.vocab_size})")
    self._graphdef = graphdef
    self.config = model_config
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(sorted({int(b) for b in prompt_buckets}))
    self.mesh = mesh
    self.rules = tuple(rules if rules is not None else sharding_lib.DEFAULT_RULES)
    self.cache_dtype = jnp.dtype(cache_dtype or model_config.dtype)
    self.trace_count = 0  # Incremented each time `_start` (prefill) is traced (= compiled).
    self._param_shardings = None
    self.batch_shards = 1 if mesh is None else sharding_lib.batch_shards(mesh, self.rules)
    if rows < 0:
      raise ValueError(f"sampler.rows={rows} must be >= 0 (0: every sample of a round at once)")
    if decode_block < 1 or prefill_chunk < 0:
      raise ValueError(f"decode_block={decode_block} must be >= 1 and prefill_chunk="
                       f"{prefill_chunk} >= 0")
    if decode_impl not in DECODE_IMPLS:
      raise ValueError(f"decode_impl={decode_impl!r}; allowed: {DECODE_IMPLS}")
    self.rows = int(rows)
    self.decode_block, self.decode_impl = int(decode_block), decode_impl
    self.prefill_chunk = int(prefill_chunk)
    self.segment_trace_count = 0  # Traces of the decode segments (one per row count and mode).
    self._start_jit = jax.jit(
        self._start, static_argnames=("num_samples", "max_new_tokens", "mode", "rows"))
    self._segment_jit = jax.jit(self._segment, static_argnames=("exit_rows", "mode"),
                                donate_argnums=0)
    self._compact_jit = jax.jit(self._compact, static_argnames="rows")
    self._finish_jit = jax.jit(self._finish, static_argnames="num_samples")
    # A whole round in one program at one row count (no compaction): what `dypo_jax.tools.aot`
    # compiles to size a round's memory (the first segment is the largest).
    self._generate_jit = jax.jit(
        self._generate, static_argnames=("num_samples", "max_new_tokens", "mode", "rows"))

  # ---------------------------------------------------------------------------------- host side

  def bucket_for(self, longest_prompt: int, max_new_tokens: int) -> int:
    """The padded prompt length P: the smallest bucket >= the longest prompt, capped so that the
    cache (P + max_new_tokens slots) never exceeds the model's context."""
    bucket = next((b for b in self.prompt_buckets if b >= longest_prompt), None)
    if bucket is None:
      raise ValueError(
          f"longest prompt has {longest_prompt} tokens, above the largest prompt bucket "
          f"{self.prompt_buckets[-1]} (prompt_buckets={self.prompt_buckets})")
    return min(bucket, self.config.max_seq_len - max_new_tokens)

  def _validate(self, prompts, num_samples, max_new_tokens, temperature, top_p, top_k,
                stop_ids) -> list[np.ndarray]:
    if len(prompts) == 0:
      raise ValueError("prompts is empty: need at least one prompt")
    if num_samples < 1:
      raise ValueError(f"num_samples={num_samples} must be >= 1")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not temperature >= 0.0:
      raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k < 0:
      raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if len(stop_ids) > MAX_STOP_IDS:
      raise ValueError(f"stop_ids={tuple(stop_ids)}: at most {MAX_STOP_IDS} stop ids")
    vocab, context = self.config.vocab_size, self.config.max_seq_len
    for s in stop_ids:
      if not 0 <= int(s) < vocab:
        raise ValueError(f"stop id {s} outside the vocabulary [0, {vocab})")
    out = []
    for i, p in enumerate(prompts):
      arr = np.asarray(p)
      if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompt {i}: expected a 1-D sequence of token ids, got {arr.dtype} "
                         f"shape {arr.shape}")
      if arr.size == 0:
        raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
      if arr.size > context:
        raise ValueError(f"prompt {i} has {arr.size} tokens, longer than the model's context "
                         f"max_seq_len={context}")
      if arr.size + max_new_tokens > context:
        raise ValueError(
            f"prompt {i} ({arr.size} tokens) + max_new_tokens={max_new_tokens} = "
            f"{arr.size + max_new_tokens} does not fit the model's context max_seq_len={context}")
      if arr.min() < 0 or arr.max() >= vocab:
        raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
      out.append(arr.astype(np.int32))
    return out

  def sample(self, params: nnx.State, prompts: Sequence[Sequence[int] | np.ndarray], *,
             num_samples: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
             top_k: int = 0, stop_ids: Sequence[int] = (), rng: jax.Array) -> SampleOutput:
    """Samples `num_samples` responses for each prompt (see the module docstring).

    Args:
      params: the model's Param state (`nnx.split(model, nnx.Param)[1]`).
      prompts: B prompts of token ids, any lengths >= 1.
      num_samples: K, responses per prompt (the group).
      max_new_tokens: T, the most tokens generated per response.
      temperature: 0 for greedy; else the softmax temperature (eval 0.6, training 1.0, ...).
      top_p: nucleus filter, 1.0 for off.
      top_k: keep the k most likely tokens, 0 for off.
      stop_ids: token ids that end a response (the stop token is counted and returned).
      rng: a JAX PRNG key (typed or raw uint32[2]).

    Returns:
      A SampleOutput of host numpy arrays.
    """
    arrays = self._validate(prompts, num_samples, max_new_tokens, temperature, top_p, top_k,
                            stop_ids)
    b = len(arrays)
    lengths = np.array([a.size for a in arrays], np.int32)
    p = self.bucket_for(int(lengths.max()), max_new_tokens)
    b_pad = -(-b // self.batch_shards) * self.batch_shards
    prompt_tokens = np.full((b_pad, p), self.pad_id, np.int32)
    for i, a in enumerate(arrays):
      prompt_tokens[i, p - a.size:] = a
    prompt_lengths = np.ones((b_pad,), np.int32)  # Padded rows: a 1-token dummy prompt.
    prompt_lengths[:b] = lengths
    stops = np.full((MAX_STOP_IDS,), -1, np.int32)
    stops[:len(stop_ids)] = np.asarray(stop_ids, np.int32)
    mode = sampling_mode(temperature=temperature, top_p=top_p, top_k=top_k,
                         vocab_size=self.config.vocab_size)
    if not jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)  # Raw uint32 keys -> typed: one program for both.
    scalars = (np.float32(temperature if temperature > 0 else 1.0), np.float32(top_p),
               np.int32(top_k))
    if self.mesh is not None:
      params = jax.device_put(params, self._shardings_for(params))
      batch = lambda nd: sharding_lib.batch_sharding(self.mesh, self.rules, nd)
      prompt_dev = jax.device_put(prompt_tokens, batch(2))
      lengths_dev = jax.device_put(prompt_lengths, batch(1))
    else:
      prompt_dev, lengths_dev = prompt_tokens, prompt_lengths
    rows = self.rows_in_flight(b_pad * num_samples)
    state, rnd = self._start_jit(params, prompt_dev, lengths_dev, np.int32(b), rng, *scalars,
                                 stops, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 mode=mode, rows=rows)
    while True:  # Segments at fewer and fewer rows once no sample is pending.
      exit_rows = self._smaller_rows(rows)
      state = self._segment_jit(state, rnd, exit_rows=exit_rows, mode=mode)
      if exit_rows == 0:
        break
      live = int(jax.device_get(jnp.sum(state.live)))
      if live == 0:
        break
      # One rung down, never skipping one: the sizes a round visits (and compiles) then do not
      # depend on its lengths, so warm rounds never compile (a segment whose rows already fit
      # the next rung ends at its first check).
      rows = exit_rows
      state = self._compact_jit(state, rows=rows)
    out = self._finish_jit(state, num_samples=num_samples)
    tokens, logprobs, out_lengths, done = jax.device_get(out)
    return SampleOutput(
        tokens=tokens[:b], logprobs=logprobs[:b], lengths=out_lengths[:b],
        stop_reason=np.where(done[:b], STOP_TOKEN, STOP_LENGTH).astype(np.int32),
        prompt_tokens=prompt_tokens[:b], prompt_lengths=lengths,
        num_compiles=self.trace_count)

  def rows_in_flight(self, num_samples: int) -> int:
    """R: the configured rows (0: all), at most the round's samples, a multiple of the shards."""
    r = min(self.rows or num_samples, num_samples)
    return -(-r // self.batch_shards) * self.batch_shards

  def _smaller_rows(self, rows: int) -> int:
    """The next row count of the compaction ladder below `rows` (half, rounded up to the shards,
    at least MIN_ROWS), or 0 when `rows` is already the smallest."""
    smaller = max(-(-(rows // 2) // self.batch_shards) * self.batch_shards, MIN_ROWS)
    return smaller if smaller < rows else 0

  def _shardings_for(self, params: nnx.State):
    if self._param_shardings is None:
      self._param_shardings = sharding_lib.param_shardings(params, self.mesh, self.rules)
    return self._param_shardings

  def _constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pins x to its logical axes on the mesh (a no-op without a mesh)."""
    if self.mesh is None:
      return x
    spec = sharding_lib.logical_to_spec(axes, self.rules, shape=x.shape, mesh=self.mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

  # -------------------------------------------------------------------------------- device side

  def _row_keys(self, rng: jax.Array, b: int, k: int) -> jax.Array:
    """[N] keys: sample b * K + k gets fold_in(fold_in(rng, b), k)."""
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b))  # [B]
    per_row = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))(
        per_prompt, jnp.arange(k))  # [B, K]
    return per_row.reshape(b * k)

  def _prefill(self, model, prompt_tokens, prompt_lengths):
    """The B prompts once -> (their cache of P slots, the next-token logits [B, V]).

    A prompt bucket longer than `prefill_chunk` (and a multiple of it) runs in chunks of that
    many tokens, each attending to the slots written before it: the attention logits are
    [B, KV, G, chunk, P] at a time instead of [.., P, P].
    """
    b, p = prompt_tokens.shape
    slots = jnp.arange(p, dtype=jnp.int32)
    real = slots[None, :] >= (p - prompt_lengths)[:, None]  # [B, P]
    positions = transformer.positions_from_mask(real)
    cache = kv_cache.KVCache.zeros(self.config, b, p, self.cache_dtype)
    c = self.prefill_chunk
    if c and p > c and p % c == 0:
      def chunk(cache, i):
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
        queries = i * c + jnp.arange(c, dtype=jnp.int32)
        mask = (slots[None, None, :] <= queries[None, :, None]) & real[:, None, :]  # [B, C, P]
        hidden, cache = model.forward(take(prompt_tokens), positions=take(positions),
                                      attention_mask=mask, cache=cache, return_hidden=True)
        return cache, hidden[:, -1, :]
      cache, last = jax.lax.scan(chunk, cache, jnp.arange(p // c))
      last = last[-1][:, None, :]
    else:
      hidden, cache = model.forward(prompt_tokens, positions=positions,
                                    attention_mask=transformer.causal_mask(real), cache=cache,
                                    return_hidden=True)
      last = hidden[:, -1:, :]
    logits = model.logits_from_hidden(last)[:, 0, :]  # [B, V]
    return cache, logits

  def _start(self, params, prompt_tokens, prompt_lengths, num_real, rng, temperature, top_p,
             top_k, stop_ids, *, num_samples: int, max_new_tokens: int, mode: Mode, rows: int):
    """Prefill, the round's draws and the first decode state of `rows` free rows.

    prompt_tokens [B, P] left-padded; prompt_lengths [B]; the samples of prompts >= num_real
    (they only pad the batch to the shards) are never run.
    """
    self.trace_count += 1  # Python side effect: runs once per trace.
    # The weights in the compute dtype, cast once per call (a rollout round) and read by every
    # decode step: each step would otherwise read the float32 master weights and cast them again.
    # The same values the model's own casts give, so the samples do not change.
    compute = jnp.dtype(self.config.dtype)
    params = jax.tree.map(
        lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    model = nnx.merge(self._graphdef, params)
    b, p = prompt_tokens.shape
    k, t = num_samples, max_new_tokens
    prompt_cache, logits = self._prefill(model, prompt_tokens, prompt_lengths)
    # Sampling reduces over the vocabulary many times: gather it once.
    logits = self._constrain(logits, (None, None))
    if mode == "greedy":
      uniforms = jnp.zeros((b * k, t), jnp.float32)
    else:
      # All the randomness up front ([N, T], one batch of threefry): sample n's token i draws
      # uniform(fold_in(key[n], i)), whichever row runs it and whenever.
      keys = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))(
          self._row_keys(rng, b, k), jnp.arange(t))  # [N, T]
      uniforms = jax.vmap(jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32)))(keys)
    block = self.decode_block
    s = -(-(p + t) // block) * block  # Whole blocks (the Pallas kernel's loop needs them).
    rows_cache = kv_cache.KVCache.zeros(self.config, rows, s, self.cache_dtype)
    rows_cache = rows_cache.map_layers(lambda x: self._constrain(x, self._CACHE_AXES)).replace(
        end_index=jnp.zeros((rows,), jnp.int32), starts=jnp.zeros((rows,), jnp.int32),
        decode_block=block, decode_impl=self.decode_impl)
    state = continuous_batching.init_state(rows_cache, num_samples=b * k, max_new_tokens=t,
                                           pad_id=self.pad_id)
    rnd = continuous_batching.Round(
        params=params, prompt_cache=prompt_cache, logits=logits, prompt_lengths=prompt_lengths,
        uniforms=uniforms, stop_ids=stop_ids, temperature=temperature, top_p=top_p, top_k=top_k,
        num_samples=(num_real * k).astype(jnp.int32))
    return state, rnd

  _CACHE_AXES = ("batch", "kv_heads", None, "head_dim")  # One layer's cache [R, KV, S, H].

  def _segment(self, state, rnd, *, exit_rows: int, mode: Mode):
    """continuous_batching.run_segment with this sampler's model and sampling rule."""
    self.segment_trace_count += 1
    model = nnx.merge(self._graphdef, rnd.params)
    pick = lambda logits, uniform: sample_token(
        logits=logits, uniform=uniform, temperature=rnd.temperature, top_p=rnd.top_p,
        top_k=rnd.top_k, mode=mode)
    return continuous_batching.run_segment(
        state, rnd, exit_rows=exit_rows, model=model, pick=pick,
        constrain_logits=lambda x: self._constrain(x, ("batch", None)))

  def _compact(self, state, *, rows: int):
    state = continuous_batching.compact(state, rows)
    return state.replace(cache=state.cache.map_layers(
        lambda x: self._constrain(x, self._CACHE_AXES)))

  def _generate(self, *args, num_samples: int, max_new_tokens: int, mode: Mode, rows: int):
    state, rnd = self._start(*args, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             mode=mode, rows=rows)
    state = self._segment(state, rnd, exit_rows=0, mode=mode)
    return self._finish(state, num_samples=num_samples)

  def _finish(self, state, *, num_samples: int):
    # The results are small: replicate them, so that every process can fetch them (multi-host).
    shape = lambda x: self._constrain(x.reshape(-1, num_samples, *x.shape[1:]),
                                      (None,) * (x.ndim + 1))
    return (shape(state.tokens), shape(state.logprobs), shape(state.lengths),
            shape(state.stopped))


@functools.lru_cache(maxsize=8)
def _cached_sampler(graphdef, model_config, pad_id, prompt_buckets) -> Sampler:
  return Sampler(graphdef, model_config=model_config, pad_id=pad_id, prompt_buckets=prompt_buckets)


def sample(model: transformer.Transformer, prompts: Sequence[Sequence[int] | np.ndarray], *,
           pad_id: int, prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
           **kwargs) -> SampleOutput:
  """Convenience: `Sampler.sample` for an unsharded model (the Sampler is cached per graphdef)."""
  graphdef, params = nnx.split(model, nnx.Param)
  sampler = _cached_sampler(graphdef, model.config, int(pad_id), tuple(prompt_buckets))
  return sampler.sample(params, prompts, **kwargs)
