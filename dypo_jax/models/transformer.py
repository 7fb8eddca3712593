"""One decoder-only transformer for the Qwen2 / Qwen2.5, Qwen3 and Llama families (Flax NNX).

Letters: B batch, T query length, S key length (cache slots), D embed, N query heads,
KV key/value heads, G = N // KV query heads per KV head, H head dim, F mlp, V vocab, L layers.

The model knows nothing of RL. The sampler talks to it through `forward` with a `KVCache`;
training calls it on whole sequences. Parameters carry logical axis names in their `axes`
metadata; `dypo_jax.parallel.sharding` maps them to mesh axes.
"""
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from dypo_jax.models import decode_attention
from dypo_jax.models.kv_cache import KVCache

ARCHS = ("qwen2", "qwen3", "llama")
# model.remat -> the `jax.checkpoint` policy of one scanned layer (None: no checkpoint at all).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and dtype policy. `arch` picks the Hugging Face family for export."""
  arch: str = "qwen2"
  vocab_size: int = 512
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = True  # Qwen2 / Qwen2.5.
  qk_norm: bool = False  # Qwen3.
  max_seq_len: int = 2048  # Context length: prompt + response must fit.
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype; logits are always float32.
  # What each layer keeps for the backward pass (REMAT_POLICIES): "none" keeps every
  # activation; "full" recomputes the layer; "dots" keeps matmul outputs, "dots_no_batch" those
  # without batch dimensions (the weight products), and recomputes the rest.
  remat: str = "none"
  # True: the layers run as one `lax.scan` over the stacked parameters, so the program (and its
  # compile time) does not grow with depth. False: a Python loop over the layers, with the KV
  # cache as one array per layer: the program grows with depth, but no layer's weights or cache
  # are sliced out of a stacked array at each decode step, which on a CPU at a few layers costs
  # ~25% of a rollout (BENCHMARKS.md). Same parameters, checkpoints and maths either way.
  scan_layers: bool = True
  # Attention over query blocks of this many tokens (0: all at once). Bounds the [T, S] logits
  # to [attention_chunk, S] per step, forward and backward; same result.
  attention_chunk: int = 0
  # The MLP over sequence blocks of this many tokens (0: all at once). Bounds its [B, T, F]
  # intermediates to [B, mlp_chunk, F], forward and backward; same result.
  mlp_chunk: int = 0
  init_std: float = 0.02

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"model.arch={self.arch!r}; allowed: {ARCHS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} must be a multiple of "
          f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r}; allowed: {tuple(REMAT_POLICIES)}")
    if self.attention_chunk < 0:
      raise ValueError(f"model.attention_chunk={self.attention_chunk} must be >= 0 (0: off)")
    if self.mlp_chunk < 0:
      raise ValueError(f"model.mlp_chunk={self.mlp_chunk} must be >= 0 (0: off)")

  @property
  def num_params(self) -> int:
    d, h, f, v = self.embed_dim, self.head_dim, self.mlp_dim, self.vocab_size
    attn = d * h * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * h * d
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    block = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * v
    return v * d + self.num_layers * block + d + head


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
  """RoPE positions [B, T]: each real token's index among the real tokens of its row."""
  return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(input_mask: jax.Array) -> jax.Array:
  """[B, T] validity -> [B, T, T] mask: causal, and padding keys hidden (left or right pad)."""
  t = input_mask.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  return causal[None] & input_mask.astype(jnp.bool_)[:, None, :]


def segment_mask(segments: jax.Array, prefix: jax.Array | None = None) -> jax.Array:
  """[B, T] segment ids -> [B, T, T] mask for rows that pack several sequences (block-diagonal
  causal): query t sees key s <= t of its own segment, and of the segment prefix[t] (a prompt that
  several packed responses share; 0: none). Segment 0 is padding: no query sees it."""
  seg_q, seg_k = segments[:, :, None], segments[:, None, :]
  t = segments.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None]
  same = seg_k == seg_q
  if prefix is not None:
    same = same | (seg_k == prefix[:, :, None])
  return causal & same & (seg_k > 0)


def _param(rngs, shape, axes, dtype, std):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)), axes=axes)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as Hugging Face does, cast before the scale)."""

  def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype: str):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), axes=(axis_name,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale.value.astype(x.dtype) * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the 'rotate half' layout of Hugging Face. x [B, T, *, H], positions [B, T]."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _attention(q, k, v, mask):
  """softmax(q k^T / sqrt(H)) v. q [B, T, KV, G, H], k/v [B, KV, S, H], mask [B, T, S]."""
  logits = jnp.einsum("BTKGH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  if q.shape[1] > 1:
    return jnp.einsum("BKGTS,BKSH->BTKGH", probs, v)  # [B, T, KV, G, H]
  # A decode step: asked for [B, T, KV, G, H] directly, XLA:CPU contracted the cache as a
  # transposed operand (a slow dot); as [G, S] x [S, H] per (B, KV) it is a plain product.
  out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v)
  return jnp.transpose(out, (0, 3, 1, 2, 4))


def _chunked_attention(q, k, v, mask, chunk: int):
  """`_attention` one block of C queries at a time: at most [B, KV, G, C, S] logits live.

  Each block sees the full key range, so its softmax is exact. The block is rematerialised
  (`jax.checkpoint`), so the backward pass keeps only the query blocks, never the probabilities.
  Queries are padded to a multiple of C (padded rows attend nothing and are dropped).
  """
  b, t = q.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  qs = jnp.moveaxis(q.reshape((b, n, chunk) + q.shape[2:]), 1, 0)  # [n, B, C, KV, G, H]
  ms = jnp.moveaxis(mask.reshape(b, n, chunk, mask.shape[-1]), 1, 0)  # [n, B, C, S]
  block = jax.checkpoint(lambda qc, mc: _attention(qc, k, v, mc))
  out = jax.lax.map(lambda xs: block(*xs), (qs, ms))  # [n, B, C, KV, G, H]
  out = jnp.moveaxis(out, 0, 1).reshape((b, n * chunk) + out.shape[3:])
  return out[:, :t]


def _windowed_attention(q, k, v, mask, block: int):
  """`_attention` for sparse masks (packed rows: block-diagonal causal), at the cost of the keys
  each query block sees rather than all S.

  Row by row and block of C queries by block (`lax.map`, real loops), each block attends a
  window of the keys from its first visible key to its last: the smallest of the widths C, 2C,
  4C, ... (and S) that holds it, picked by `lax.switch`, so a block of short packed sequences
  reads ~C keys. The softmax is over the same visible keys as `_attention`'s, so the result is
  the same. Each block is rematerialised (`jax.checkpoint`) like `_chunked_attention`'s.
  q [B, T, KV, G, H], k/v [B, KV, S, H], mask [B, T, S].
  """
  b, t = q.shape[:2]
  s = k.shape[2]
  n = -(-t // block)
  pad = n * block - t
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  widths = []
  while not widths or widths[-1] < s:
    widths.append(min(s, block * 2 ** len(widths)))

  def one_block(qc, mc, kr, vr):  # qc [C, KV, G, H], mc [C, S], kr/vr [KV, S, H].
    seen = mc.any(axis=0)  # [S]
    first = jnp.argmax(seen)
    last = s - 1 - jnp.argmax(seen[::-1])
    need = jnp.where(seen.any(), last - first + 1, 1)
    which = jnp.searchsorted(jnp.array(widths), need)
    # A window that would run past S starts earlier (dynamic_slice clamps): still holds them.
    def attend(width):
      def run(qc, mc, kr, vr):
        start = jnp.minimum(first, s - width)
        kw = jax.lax.dynamic_slice_in_dim(kr, start, width, axis=1)
        vw = jax.lax.dynamic_slice_in_dim(vr, start, width, axis=1)
        mw = jax.lax.dynamic_slice_in_dim(mc, start, width, axis=1)
        return _attention(qc[None], kw[None], vw[None], mw[None])[0]
      return run
    return jax.lax.switch(which, [attend(w) for w in widths], qc, mc, kr, vr)

  one_block = jax.checkpoint(one_block)

  def one_row(xs):
    qr, mr, kr, vr = xs  # [n * C, KV, G, H], [n * C, S], [KV, S, H].
    qs = qr.reshape((n, block) + qr.shape[1:])
    ms = mr.reshape(n, block, s)
    out = jax.lax.map(lambda ys: one_block(ys[0], ys[1], kr, vr), (qs, ms))
    return out.reshape((n * block,) + out.shape[2:])

  out = jax.lax.map(one_row, (q, mask, k, v))  # [B, n * C, KV, G, H]
  return out[:, :t]


class Attention(nnx.Module):
  """Grouped-query attention with RoPE, optional q/k/v biases (Qwen2) and q/k norms (Qwen3)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    std, pd = c.init_std, c.param_dtype
    self.q_proj = _param(rngs, (c.embed_dim, c.num_heads, c.head_dim),
                         ("embed", "heads", "head_dim"), pd, std)
    self.k_proj = _param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                         ("embed", "kv_heads", "head_dim"), pd, std)
    self.v_proj = _param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                         ("embed", "kv_heads", "head_dim"), pd, std)
    self.o_proj = _param(rngs, (c.num_heads, c.head_dim, c.embed_dim),
                         ("heads", "head_dim", "embed"), pd, std)
    if c.qkv_bias:
      zeros = lambda *s: jnp.zeros(s, jnp.dtype(pd))
      self.q_bias = nnx.Param(zeros(c.num_heads, c.head_dim), axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(zeros(c.num_kv_heads, c.head_dim), axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(zeros(c.num_kv_heads, c.head_dim), axes=("kv_heads", "head_dim"))
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, axis_name="head_dim", param_dtype=pd)
      self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, axis_name="head_dim", param_dtype=pd)

  def __call__(self, x, *, positions, attention_mask, layer_cache, end_index,
               attention_windows: int = 0):
    """x [B, T, D]; attention_mask [B, T, S]; layer_cache None, or (k, v, layer): the whole
    stacked cache k, v [L, B, KV, S, H] and this layer's index, or this layer's own k, v
    [B, KV, S, H] and None. The new keys are written into it in place and it is returned.
    attention_windows > 0: `_windowed_attention` in query blocks of that many tokens."""
    c = self.config
    dt = x.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj.value.astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj.value.astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj.value.astype(dt))
    if c.qkv_bias:
      q = q + self.q_bias.value.astype(dt)
      k = k + self.k_bias.value.astype(dt)
      v = v + self.v_bias.value.astype(dt)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, c.rope_theta)
    k = apply_rope(k, positions, c.rope_theta)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, H], the cache's layout.

    if layer_cache is not None and len(layer_cache) > 3:
      return self._decode_per_row(q, k, v, layer_cache, end_index)
    if layer_cache is not None:
      # Written into the cache (a loop carry: updated in place), then this layer's slots read
      # back whole.
      cache_k, cache_v, layer = layer_cache
      if layer is None:
        start = (0, 0, end_index, 0)
        k = cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
        v = cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
      else:
        start = (layer, 0, 0, end_index, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
        k, v = cache_k[layer], cache_v[layer]
      new_cache = (cache_k, cache_v)
    else:
      new_cache = None

    b, t = q.shape[:2]
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    k, v = k.astype(dt), v.astype(dt)
    if attention_windows and layer_cache is None:
      out = _windowed_attention(q, k, v, attention_mask, attention_windows)
    elif c.attention_chunk and t > c.attention_chunk:
      out = _chunked_attention(q, k, v, attention_mask, c.attention_chunk)
    else:
      out = _attention(q, k, v, attention_mask)
    out = out.reshape(b, t, c.num_heads, c.head_dim)
    return jnp.einsum("BTNH,NHD->BTD", out, self.o_proj.value.astype(dt)), new_cache


  def _decode_per_row(self, q, k, v, layer_cache, end_index):
    """One decode token per row at per-row slots (KVCache.per_row): row b writes its key at slot
    end_index[b] and attends [starts[b], end_index[b]], reading only the slots the furthest row
    needs (decode_attention). q [B, 1, N, H]; k, v [B, KV, 1, H]."""
    c = self.config
    cache_k, cache_v, layer, (starts, block, impl) = layer_cache
    b, t = q.shape[:2]
    if t != 1:
      raise ValueError(f"a per-row KVCache decodes one token per row, got {t}")
    rows = jnp.arange(b)
    def put(cache, x):  # A scatter of B slots (in place in the decode loop's carry).
      at = cache.at[rows, :, end_index, :] if layer is None else cache.at[layer, rows, :, end_index]
      return at.set(x[:, :, 0].astype(cache.dtype))
    cache_k, cache_v = put(cache_k, k), put(cache_v, v)
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(b, c.num_kv_heads, groups, c.head_dim)
    ends = end_index + 1
    if impl == "pallas":
      from dypo_jax.kernels import decode_attention as kernel  # pylint: disable=g-import-not-at-top
      lk, lv = (cache_k, cache_v) if layer is None else (cache_k[layer], cache_v[layer])
      out = kernel.decode_attention(q, lk.astype(q.dtype), lv.astype(q.dtype), starts, ends,
                                    block=block)
    else:
      out = decode_attention.bounded_attention(q, cache_k, cache_v, starts, ends, layer=layer,
                                               block=block)
    out = out.reshape(b, t, c.num_heads, c.head_dim)
    return (jnp.einsum("BTNH,NHD->BTD", out, self.o_proj.value.astype(q.dtype)),
            (cache_k, cache_v))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.gate_proj = _param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c.param_dtype,
                            c.init_std)
    self.up_proj = _param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c.param_dtype,
                          c.init_std)
    self.down_proj = _param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c.param_dtype,
                            c.init_std)
    self.chunk = c.mlp_chunk

  def __call__(self, x):
    if self.chunk and x.shape[1] > self.chunk:
      dt = x.dtype
      weights = tuple(w.value.astype(dt) for w in (self.gate_proj, self.up_proj, self.down_proj))
      return _sequence_chunked(lambda h: _swiglu(h, *weights), x, self.chunk)
    return self._dense(x)

  def _dense(self, x):
    """x [B, T, D] -> [B, T, D], computed on the flattened tokens M = B·T.

    Same maths as the [B, T, D] einsums; on XLA:CPU their backward transposed the [B, T, F]
    gradients inside the SiLU's elementwise fusions, which made the MLP backward ~2.4x slower
    and the whole W1 update ~1.6x slower (benchmarks/profile_step.py).
    """
    dt = x.dtype
    return _swiglu(x, self.gate_proj.value.astype(dt), self.up_proj.value.astype(dt),
                   self.down_proj.value.astype(dt))


def _swiglu(x, w_gate, w_up, w_down):
  """down(silu(gate(x)) * up(x)) on x [B, T, D] (see MLP._dense on the flattened layout)."""
  b, t, d = x.shape
  x = x.reshape(b * t, d)
  gate = jnp.einsum("MD,DF->MF", x, w_gate)
  up = jnp.einsum("MD,DF->MF", x, w_up)
  out = jnp.einsum("MF,FD->MD", jax.nn.silu(gate) * up, w_down)
  return out.reshape(b, t, d)


def _sequence_chunked(fn, x, chunk: int):
  """fn over sequence blocks of x [B, T, D] (a token-wise fn), one rematerialised block at a time.

  Blocks run one after another (`lax.map`) and are `jax.checkpoint`ed, so neither pass holds more
  than one block's intermediates. Chunks split T, not B, so each keeps x's batch sharding.
  """
  b, t, d = x.shape
  n = -(-t // chunk)
  xs = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0)))
  xs = jnp.moveaxis(xs.reshape(b, n, chunk, d), 1, 0)  # [n, B, C, D]
  out = jax.lax.map(jax.checkpoint(fn), xs)  # [n, B, C, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, d)[:, :t]


class Block(nnx.Module):
  """Pre-norm residual block: attention then MLP."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.input_norm = RMSNorm(c.embed_dim, eps=c.rms_norm_eps, axis_name="embed",
                              param_dtype=c.param_dtype)
    self.attn = Attention(c, rngs=rngs)
    self.post_attn_norm = RMSNorm(c.embed_dim, eps=c.rms_norm_eps, axis_name="embed",
                                  param_dtype=c.param_dtype)
    self.mlp = MLP(c, rngs=rngs)

  def __call__(self, x, *, positions, attention_mask, layer_cache, end_index,
               attention_windows: int = 0):
    attn_out, new_cache = self.attn(
        self.input_norm(x), positions=positions, attention_mask=attention_mask,
        layer_cache=layer_cache, end_index=end_index, attention_windows=attention_windows)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return x, new_cache


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
  """The L layers as one Block whose every parameter has a leading layer axis [L, ...] (logical
  axis "layers"), which `Transformer.forward` scans over.

  Made by vmapping one layer's initialisation over L keys: the program holds one layer's random
  draws whatever the depth, so it compiles in the same time at 2 layers as at 28.
  """
  keys = jax.random.split(rngs.params(), config.num_layers)
  graphdef = nnx.split(nnx.eval_shape(lambda: Block(config, rngs=nnx.Rngs(0))))[0]
  state = jax.vmap(lambda key: nnx.split(Block(config, rngs=nnx.Rngs(params=key)))[1])(keys)
  state = jax.tree.map(lambda var: var.replace(axes=("layers",) + var.get_metadata()["axes"]),
                       state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


class Transformer(nnx.Module):
  """Decoder-only LM. `model(tokens)` gives float32 logits [B, T, V]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embedding = _param(rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"),
                            c.param_dtype, c.init_std)
    self.blocks = _stacked_blocks(c, rngs)  # Every parameter [L, ...].
    self.final_norm = RMSNorm(c.embed_dim, eps=c.rms_norm_eps, axis_name="embed",
                              param_dtype=c.param_dtype)
    if not c.tie_embeddings:
      self.lm_head = _param(rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"),
                            c.param_dtype, c.init_std)
    # Sharding of the residual stream [B, T, D] between blocks (None: XLA chooses). The builder
    # that places the model on a mesh sets it (`models.builder.build`, from its options'
    # activation axes); without it XLA may shard activations like the FSDP parameters (on D) and
    # hold every row on every chip.
    self.activation_sharding = None

  def lm_head_kernel(self) -> jax.Array:
    """The output projection [D, V] (the transposed embedding when tied)."""
    if self.config.tie_embeddings:
      return self.embedding.value.T
    return self.lm_head.value

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> float32 logits [B, T, V]."""
    kernel = self.lm_head_kernel().astype(hidden.dtype)
    return jnp.einsum("BTD,DV->BTV", hidden, kernel, preferred_element_type=jnp.float32)

  def forward(self, tokens: jax.Array, *, positions: jax.Array, attention_mask: jax.Array,
              cache: KVCache | None = None, return_hidden: bool = False,
              attention_windows: int = 0) -> tuple[jax.Array, KVCache | None]:
    """The general forward.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] RoPE positions.
      attention_mask: [B, T, S] bool, True where query t may attend key s. S = T without a cache,
        S = cache.length with one (the new keys land in slots [end_index, end_index + T)).
        None with a per-row cache (`KVCache.per_row`: T = 1, each row's span is in the cache).
      cache: a KVCache to read and extend, or None.
      return_hidden: return the final-norm hidden states [B, T, D] instead of logits, so a caller
        can apply the LM head in vocabulary chunks (`lm_head_kernel`).
      attention_windows: without a cache, > 0 runs attention in query blocks of this many tokens,
        each over only the keys its mask shows it (`_windowed_attention`): for sparse masks
        (`segment_mask` of packed rows), whose cost then follows the sequences, not the row.

    Returns:
      (logits [B, T, V] float32 or hidden [B, T, D], the updated cache or None).
    """
    c = self.config
    pin = lambda h: h
    if self.activation_sharding is not None:
      pin = lambda h: jax.lax.with_sharding_constraint(h, self.activation_sharding)
      # The inputs' rows (and sequence) are split like the residual stream's, so no chip builds
      # the [B, T, S] mask or positions of rows it does not compute. A row count that the mesh
      # axes do not divide (a small evaluation batch) is left to XLA.
      sharding = self.activation_sharding
      rows, seq = sharding.spec[0], sharding.spec[1]
      split = lambda x, spec: jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))
      tokens = split(tokens, (rows, seq))
      positions = split(positions, (rows, seq))
      if attention_mask is not None:  # None with a per-row cache (its rows say what they see).
        attention_mask = split(attention_mask, (rows, seq, None))
    x = pin(self.embedding.value.astype(c.dtype)[tokens])  # [B, T, D]
    # The layers are one scanned program: compile time and program size do not grow with depth.
    graphdef, layers = nnx.split(self.blocks)
    end_index = cache.end_index if cache is not None else None
    # With per-row positions every layer's cache tuple carries (starts, block, impl).
    per_row = ((cache.starts, cache.decode_block, cache.decode_impl),) if (
        cache is not None and cache.per_row) else ()

    def apply_layer(h, layer, layer_cache):
      return nnx.merge(graphdef, layer)(h, positions=positions, attention_mask=attention_mask,
                                        layer_cache=layer_cache, end_index=end_index,
                                        attention_windows=attention_windows)

    if cache is not None and cache.stacked != c.scan_layers:
      raise ValueError(f"a {'stacked' if cache.stacked else 'per-layer'} KVCache for "
                       f"scan_layers={c.scan_layers}: make it with KVCache.zeros(model.config, ...)")
    if not c.scan_layers:
      # Each layer's weights sliced from the stack (loop-invariant in a decode loop), the cache
      # one array per layer: no cache slice is read out of a stacked array at each step.
      per_layer = [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(c.num_layers)]

    if cache is None:
      def layer_step(h, layer):
        return pin(apply_layer(h, layer, None)[0]), None
      policy = REMAT_POLICIES[c.remat]
      if c.remat != "none":
        layer_step = jax.checkpoint(layer_step, policy=policy, prevent_cse=False)
      if c.scan_layers:
        x, _ = jax.lax.scan(layer_step, x, layers)
      else:
        for layer in per_layer:
          x, _ = layer_step(x, layer)
    elif not c.scan_layers:
      new_k, new_v = [], []
      for layer, k, v in zip(per_layer, cache.k, cache.v):
        x, (k, v) = apply_layer(x, layer, (k, v, None) + per_row)
        x = pin(x)
        new_k.append(k)
        new_v.append(v)
      new_k, new_v = tuple(new_k), tuple(new_v)
    else:
      # The stacked cache is carried through the layers, so each layer writes its slots in place.
      def cached_layer_step(carry, layer_and_index):
        h, k, v = carry
        layer, i = layer_and_index
        h, (k, v) = apply_layer(h, layer, (k, v, i) + per_row)
        return (pin(h), k, v), None
      (x, new_k, new_v), _ = jax.lax.scan(
          cached_layer_step, (x, cache.k, cache.v),
          (layers, jnp.arange(c.num_layers, dtype=jnp.int32)))
    x = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = cache.replace(k=new_k, v=new_v, end_index=cache.end_index + tokens.shape[1])
    out = x if return_hidden else self.logits_from_hidden(x)
    return out, new_cache

  def __call__(self, tokens: jax.Array, *, input_mask: jax.Array | None = None) -> jax.Array:
    """Full forward of (possibly padded) sequences: tokens [B, T] -> logits [B, T, V] float32.

    input_mask [B, T] marks real tokens (left or right padding both work); default all real.
    """
    if input_mask is None:
      input_mask = jnp.ones(tokens.shape, jnp.bool_)
    logits, _ = self.forward(tokens, positions=positions_from_mask(input_mask),
                             attention_mask=causal_mask(input_mask))
    return logits


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
  """A ModelConfig from a plain dict (e.g. the `model` ConfigDict), ignoring non-architecture keys."""
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in d.items() if k in names})
