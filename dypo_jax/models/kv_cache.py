"""The key/value cache of cached decoding: the model reads and extends it (`Transformer.forward`),
the sampler makes, repeats and pins it.

Letters as in transformer.py: L layers, B batch, KV key/value heads, S slots, H head dim.
"""
import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer; slots [0, end_index) hold written entries.

  Stacked [L, B, KV, S, H] for the scanned layers (`ModelConfig.scan_layers`), a tuple of L
  arrays [B, KV, S, H] for the loop over layers. Prompts are left-padded to a common length, so
  one write index serves the whole batch; which slots are real tokens is the caller's attention
  mask.

  Per-row positions (the sampler's continuous batching): `end_index` [B] is each row's write
  slot and `starts` [B] its first visible slot; a decode step (one token per row) then writes
  row b at slot end_index[b] and attends [starts[b], end_index[b]], reading only as many slots
  as the furthest row needs (`decode_attention.bounded_attention`, blocks of `decode_block`).
  """
  # Slots after the heads, so a decode step's attention reads a layer's cache as laid out (with
  # the slots before the heads, XLA:CPU copied the whole cache into this layout at every step).
  k: jax.Array | tuple[jax.Array, ...]  # [L, B, KV, S, H] or L x [B, KV, S, H]
  v: jax.Array | tuple[jax.Array, ...]
  end_index: jax.Array  # [] int32, or [B] int32 with per-row positions.
  starts: jax.Array | None = None  # [B] int32 with per-row positions, else None.
  decode_block: int = flax.struct.field(pytree_node=False, default=64)
  # "jnp" (the bounded `lax.switch`, any backend) or "pallas" (the per-row block loop kernel).
  decode_impl: str = flax.struct.field(pytree_node=False, default="jnp")

  @classmethod
  def zeros(cls, config, batch: int, length: int, dtype=None) -> "KVCache":
    """An empty cache for `config` (a transformer.ModelConfig) and `batch` rows of `length` slots."""
    dtype = jnp.dtype(dtype or config.dtype)
    layer_shape = (batch, config.num_kv_heads, length, config.head_dim)
    if config.scan_layers:
      make = lambda: jnp.zeros((config.num_layers,) + layer_shape, dtype)
    else:
      make = lambda: tuple(jnp.zeros(layer_shape, dtype) for _ in range(config.num_layers))
    return cls(k=make(), v=make(), end_index=jnp.zeros((), jnp.int32))

  @property
  def per_row(self) -> bool:
    return self.end_index.ndim == 1

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, tuple)

  @property
  def length(self) -> int:
    return self.k.shape[3] if self.stacked else self.k[0].shape[2]

  def map_layers(self, fn) -> "KVCache":
    """fn applied to each layer's k and v [B, KV, S, H] (with the stacked layout, to the whole
    [L, ...] arrays with fn vmapped over L)."""
    if self.stacked:
      fn = jax.vmap(fn)
      return self.replace(k=fn(self.k), v=fn(self.v))
    return self.replace(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)))

  def repeat(self, n: int) -> "KVCache":
    """Each batch row repeated n times in place ([B, ...] -> [B*n, ...]): k samples a prompt."""
    return self.map_layers(lambda x: jnp.repeat(x, n, axis=0))
