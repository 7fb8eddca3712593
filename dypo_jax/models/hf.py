"""Hugging Face checkpoints (config.json + safetensors) into and out of `Transformer`.

Families: Qwen2 / Qwen2.5 (`qwen2`), Qwen3 (`qwen3`), Llama (`llama`), with default RoPE only.

Layouts. A torch `Linear` stores its weight as [out, in]; ours put the input first and split the
heads out: q_proj [N*H, D] -> [D, N, H], k/v_proj [KV*H, D] -> [D, KV, H], o_proj [D, N*H] ->
[N, H, D], gate/up_proj [F, D] -> [D, F], down_proj [D, F] -> [F, D], lm_head [V, D] -> [D, V].
Embeddings [V, D], norm scales and biases (reshaped to [N, H] / [KV, H]) keep their values.

Tensors are read with the numpy API of `safetensors`; importing `ml_dtypes` registers bfloat16
with numpy, so bf16 checkpoints read and write without torch. Nothing here imports torch.
"""
from collections.abc import Mapping
import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_dtypes  # pylint: disable=unused-import  # Registers bfloat16 with numpy.
import numpy as np
from safetensors import safe_open
import safetensors.numpy

from dypo_jax import errors
from dypo_jax.io import fileio
from dypo_jax.models import builder
from dypo_jax.models import hf_config
from dypo_jax.models.transformer import ModelConfig
from dypo_jax.models.transformer import Transformer
from dypo_jax.parallel import sharding

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some exporters write that carry no parameters.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_QKV_BIAS = re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias")
# safetensors dtype tags that hold floating-point parameters we can load.
_FLOAT_TAGS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


# ------------------------------------------------------------------------------------------------
# Tensor names and layouts


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One HF tensor and the parameter it becomes.

  `linear`: a torch Linear weight, transposed then reshaped (ours = w.T.reshape(shape)); otherwise
  only reshaped (biases, norms, embeddings).
  """
  hf_name: str
  path: tuple[str | int, ...]  # Our state path, e.g. ("blocks", "attn", "q_proj").
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]  # One layer's, for a layer tensor (ours stacks them: [L, *shape]).
  linear: bool
  layer: int | None = None  # Which row of the stacked parameter; None outside the layers.

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return (w.T if self.linear else w).reshape(self.shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.linear:
      return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T)
    return np.ascontiguousarray(x.reshape(self.hf_shape))


def _specs(c: ModelConfig) -> list[_Spec]:
  """Every tensor of the HF checkpoint for config `c`, in checkpoint order."""
  d, n, kv, h, f, v = (c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim,
                       c.vocab_size)
  specs = [_Spec("model.embed_tokens.weight", ("embedding",), (v, d), (v, d), False)]
  for i in range(c.num_layers):
    p, b = f"model.layers.{i}.", ("blocks",)
    attn, mlp = b + ("attn",), b + ("mlp",)

    def layer(*args, i=i):  # A tensor of layer i: one row of a stacked parameter.
      specs.append(_Spec(*args, layer=i))

    layer(p + "input_layernorm.weight", b + ("input_norm", "scale"), (d,), (d,), False)
    for name, heads in (("q", n), ("k", kv), ("v", kv)):
      layer(p + f"self_attn.{name}_proj.weight", attn + (f"{name}_proj",), (heads * h, d),
            (d, heads, h), True)
      if c.qkv_bias:
        layer(p + f"self_attn.{name}_proj.bias", attn + (f"{name}_bias",), (heads * h,),
              (heads, h), False)
    layer(p + "self_attn.o_proj.weight", attn + ("o_proj",), (d, n * h), (n, h, d), True)
    if c.qk_norm:
      for name in ("q_norm", "k_norm"):
        layer(p + f"self_attn.{name}.weight", attn + (name, "scale"), (h,), (h,), False)
    layer(p + "post_attention_layernorm.weight", b + ("post_attn_norm", "scale"), (d,), (d,),
          False)
    layer(p + "mlp.gate_proj.weight", mlp + ("gate_proj",), (f, d), (d, f), True)
    layer(p + "mlp.up_proj.weight", mlp + ("up_proj",), (f, d), (d, f), True)
    layer(p + "mlp.down_proj.weight", mlp + ("down_proj",), (d, f), (f, d), True)
  specs.append(_Spec("model.norm.weight", ("final_norm", "scale"), (d,), (d,), False))
  if not c.tie_embeddings:
    specs.append(_Spec("lm_head.weight", ("lm_head",), (v, d), (d, v), True))
  return specs


def _specs_by_path(specs: list[_Spec]) -> dict[tuple, list[_Spec]]:
  """Our parameter path -> its HF tensors (one, or one per layer in layer order)."""
  groups: dict[tuple, list[_Spec]] = {}
  for spec in specs:
    groups.setdefault(spec.path, []).append(spec)
  return groups


def _stacked_shape(group: list[_Spec]) -> tuple[int, ...]:
  """Our parameter's shape: [L, *one layer's] for layer tensors."""
  return group[0].shape if group[0].layer is None else (len(group),) + group[0].shape


def _path_key(path) -> tuple[str | int, ...]:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


# ------------------------------------------------------------------------------------------------
# Tensor sources: a dict in memory, or safetensors files read lazily.


class _DictSource:
  """Tensors held in a mapping name -> array."""

  def __init__(self, tensors: Mapping[str, Any]):
    self._tensors = tensors
    self.description = "the tensors given"

  def names(self) -> set[str]:
    return set(self._tensors)

  def where(self, name: str) -> str:
    del name
    return ""

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(np.shape(self._tensors[name]))

  def is_float(self, name: str) -> tuple[bool, str]:
    dt = np.asarray(self._tensors[name]).dtype
    return jnp.issubdtype(dt, jnp.floating), str(dt)

  def read(self, name: str) -> np.ndarray:
    return np.asarray(self._tensors[name])


class _FileSource:
  """A checkpoint directory: model.safetensors, or shards listed by model.safetensors.index.json."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    self.description = f"checkpoint {path}"
    self._handles = {}
    if os.path.exists(index):
      with open(index) as fh:
        try:
          weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
      files = {os.path.join(path, f) for f in weight_map.values()}
      self._file_of = {name: os.path.join(path, f) for name, f in weight_map.items()}
    elif os.path.exists(single):
      files = {single}
      self._file_of = None
    else:
      raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    for file in sorted(files):
      if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: listed in {index} but missing")
      try:
        self._handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
      except Exception as e:  # pylint: disable=broad-except  # SafetensorError is not exported.
        raise errors.BadInput(f"{file}: not a complete safetensors file ({e}); a partial copy or "
                              "an interrupted download?") from None
    if self._file_of is None:
      self._file_of = {name: single for name in self._handles[single].keys()}
    for name, file in self._file_of.items():
      if name not in self._handles[file].keys():
        raise ValueError(f"tensor {name!r}: {index} places it in {file}, which lacks it")

  def names(self) -> set[str]:
    return set(self._file_of)

  def where(self, name: str) -> str:
    return f" in file {self._file_of[name]}"

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

  def is_float(self, name: str) -> tuple[bool, str]:
    tag = self._handles[self._file_of[name]].get_slice(name).get_dtype()
    return tag in _FLOAT_TAGS, tag

  def read(self, name: str) -> np.ndarray:
    return self._handles[self._file_of[name]].get_tensor(name)


# ------------------------------------------------------------------------------------------------
# Loading


def _zero_bias_names(config: ModelConfig, source, names: list[str]) -> list[str]:
  """The q/k/v biases among `names` that a qwen2 model without biases may drop: `hf_state_dict`
  writes zeros for them (Qwen2 always has them). A non-zero one is an error."""
  if config.arch != "qwen2" or config.qkv_bias:
    return []
  biases = [n for n in names if _QKV_BIAS.fullmatch(n)]
  for name in biases:
    if np.any(source.read(name)):
      raise ValueError(f"tensor {name!r}{source.where(name)} is not zero, but the model to load "
                       "it into has qkv_bias=False")
  return biases


def _check_tensors(config: ModelConfig, source, specs: list[_Spec]) -> None:
  """Every tensor of `source` against `config`: names, shapes, dtypes (ValueError naming one)."""
  available = source.names()
  expected = {s.hf_name for s in specs}
  extra = sorted(n for n in available - expected if not n.endswith(_IGNORABLE_SUFFIXES))
  tied_copy = config.tie_embeddings and "lm_head.weight" in extra
  if tied_copy:  # Some tied checkpoints also store the head; accepted if it equals the embedding.
    extra.remove("lm_head.weight")
  for name in _zero_bias_names(config, source, extra):
    extra.remove(name)
  if extra:
    raise ValueError(
        f"unexpected tensor {extra[0]!r}{source.where(extra[0])} ({len(extra)} unexpected in "
        f"all): not part of a {config.arch} model with this config")
  missing = [s.hf_name for s in specs if s.hf_name not in available]
  if missing:
    raise ValueError(f"tensor {missing[0]!r} missing from {source.description} "
                     f"({len(missing)} missing in all, e.g. {missing[:3]})")
  for s in specs:
    shape = source.shape(s.hf_name)
    if shape != s.hf_shape:
      raise ValueError(f"tensor {s.hf_name!r}{source.where(s.hf_name)} has shape {shape}, "
                       f"expected {s.hf_shape} for this config")
    ok, dt = source.is_float(s.hf_name)
    if not ok:
      raise ValueError(f"tensor {s.hf_name!r}{source.where(s.hf_name)} has dtype {dt}; "
                       "expected a floating-point dtype")
  if tied_copy:
    head, emb = source.read("lm_head.weight"), source.read("model.embed_tokens.weight")
    if head.shape != emb.shape or not np.array_equal(head, emb):
      raise ValueError(f"tensor 'lm_head.weight'{source.where('lm_head.weight')} differs from "
                       "model.embed_tokens.weight although tie_word_embeddings is true")


def _load(options: builder.ModelOptions, mesh: jax.sharding.Mesh, source) -> Transformer:
  """Validates every tensor of `source`, then fills the model `options` describe on `mesh`
  (`builder.build(..., abstract=True)`: its graph, shapes and shardings) with them. Each
  parameter is read, stacked over the layers on the host and placed, one at a time; each device
  receives only its shard."""
  config = options.config
  specs = _specs(config)
  _check_tensors(config, source, specs)
  graphdef, abstract_state = nnx.split(builder.build(options, mesh, abstract=True))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state, is_leaf=_is_variable)
  by_path = _specs_by_path(specs)
  paths = [_path_key(p) for p, _ in leaves]
  if set(paths) != set(by_path):  # The Transformer grew or lost a parameter: fix _specs.
    raise RuntimeError(f"hf.py has no mapping for parameters {sorted(set(paths) - set(by_path))} "
                       f"or maps absent ones {sorted(set(by_path) - set(paths))}")
  new_leaves = []
  for path, (_, var) in zip(paths, leaves):
    group, target = by_path[path], var.get_value()  # A ShapeDtypeStruct with its sharding.
    if target.shape != _stacked_shape(group):
      raise RuntimeError(f"parameter {path} has shape {target.shape}; hf.py expects "
                         f"{_stacked_shape(group)}")
    host = np.stack([spec.to_ours(source.read(spec.hf_name)).astype(target.dtype)
                     for spec in group])
    if group[0].layer is None:
      host = host[0]
    value = jax.make_array_from_callback(host.shape, target.sharding, lambda idx, a=host: a[idx])
    new_leaves.append(var.replace(value=value))
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new_leaves))


def load_state_dict(model_config: ModelConfig, tensors: Mapping[str, Any]) -> Transformer:
  """A Transformer on the default device from HF-named tensors
  (`model.layers.0.self_attn.q_proj.weight`, ...).

  Raises ValueError naming a missing, unexpected, misshapen or non-float tensor.
  """
  return _load(builder.ModelOptions(model_config), builder.one_device_mesh(),
               _DictSource(tensors))


def from_pretrained(path: str, *, dtype: str = "float32", param_dtype: str | None = None,
                    max_seq_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules=None, compute_options: dict | None = None) -> Transformer:
  """Loads a local Hugging Face checkpoint directory (config.json + safetensors) as the model its
  config.json describes (a run loads into its own options instead: `load_pretrained`).

  Args:
    path: directory with config.json and model.safetensors or model.safetensors.index.json.
    dtype, param_dtype, max_seq_len: as in `hf_config.model_config_from_hf` (stored tensors are cast to
      param_dtype, which defaults to dtype).
    mesh: place each parameter sharded over this mesh (each device receives only its shard);
      default: the default device alone.
    rules: logical-axis rules for `mesh` (`dypo_jax.parallel.sharding`); default its DEFAULT_RULES.
    compute_options: ModelConfig fields that a checkpoint does not hold and the run chooses
      (`remat`, `scan_layers`, `attention_chunk`, `mlp_chunk`); anything else is an error.

  Returns:
    The Transformer (residual stream not pinned), never randomly initialised: shapes come from
    `nnx.eval_shape` (`builder.build(..., abstract=True)`).
  """
  if rules is not None and mesh is None:
    raise ValueError("from_pretrained: rules given without a mesh")
  config = hf_config.model_config_from_dir(path, dtype=dtype, param_dtype=param_dtype,
                                           max_seq_len=max_seq_len)
  options = dict(compute_options or {})
  unknown = set(options) - {"remat", "scan_layers", "attention_chunk", "mlp_chunk"}
  if unknown:
    raise ValueError(f"from_pretrained: compute_options {sorted(unknown)} are not run-time "
                     "choices (allowed: remat, scan_layers, attention_chunk, mlp_chunk)")
  model_options = builder.ModelOptions(dataclasses.replace(config, **options),
                                       rules=sharding.DEFAULT_RULES if rules is None else rules)
  with contextlib.ExitStack() as stack:
    return _load(model_options, mesh if mesh is not None else builder.one_device_mesh(),
                 _FileSource(path, stack))


def load_pretrained(path: str, options: builder.ModelOptions,
                    mesh: jax.sharding.Mesh) -> Transformer:
  """Loads a Hugging Face checkpoint directory into exactly the model `options` describe (the
  run's: its scan_layers, remat, chunks, dtypes, shardings and residual-stream pin), after
  checking that its config.json has the same architecture (BadInput naming the field)."""
  c = options.config
  found = hf_config.model_config_from_dir(path, dtype=c.dtype, param_dtype=c.param_dtype,
                                          max_seq_len=c.max_seq_len)
  for name in hf_config.ARCH_FIELDS:
    ours, theirs = getattr(c, name), getattr(found, name)
    # A qwen2 model without biases is exported with zero ones (checked by _check_tensors).
    exported_zero_bias = name == "qkv_bias" and c.arch == "qwen2" and not ours
    if ours != theirs and not exported_zero_bias:
      raise errors.BadInput(f"{os.path.join(path, hf_config.CONFIG_FILE)}: {name}={theirs!r}, "
                            f"but the model to load it into has {name}={ours!r}")
  with contextlib.ExitStack() as stack:
    return _load(options, mesh, _FileSource(path, stack))


# ------------------------------------------------------------------------------------------------
# Saving


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def hf_state_dict(model: Transformer, *, dtype: str | None = None) -> dict[str, np.ndarray]:
  """The model's parameters as HF-named numpy arrays in HF layouts (checkpoint order).

  dtype: cast to this dtype (default: keep the parameter dtype). A qwen2 model without q/k/v
  biases gets zero biases (Qwen2 always has them). In a multi-process run every process must call
  this (arrays spread over processes are gathered).
  """
  c = model.config
  hf_config.check_exportable(c)
  state = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
  params = {_path_key(p): var.get_value() for p, var in flat}
  out = {}
  for path, group in _specs_by_path(_specs(c)).items():
    x = _to_host(params[path])  # Gathered once: [L, ...] for a layer parameter.
    if dtype is not None:
      x = x.astype(jnp.dtype(dtype))
    for spec in group:
      out[spec.hf_name] = spec.to_hf(x if spec.layer is None else x[spec.layer])
  out = {spec.hf_name: out[spec.hf_name] for spec in _specs(c)}  # Checkpoint order.
  if c.arch == "qwen2" and not c.qkv_bias:
    bias_dtype = jnp.dtype(dtype or c.param_dtype)
    for i in range(c.num_layers):
      for name, heads in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
        out[f"model.layers.{i}.self_attn.{name}_proj.bias"] = np.zeros(
            (heads * c.head_dim,), bias_dtype)
  return out


def _shard(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[dict]:
  """Greedy split in order; a tensor bigger than the limit gets a shard of its own."""
  if max_shard_bytes is None:
    return [tensors]
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
  shards.append(current)
  return shards


def _is_model_file(name: str) -> bool:
  return name in (hf_config.CONFIG_FILE, INDEX_FILE) or name.endswith(".safetensors")


def _write_json(file: str, obj) -> None:
  with open(file, "w") as fh:
    json.dump(obj, fh, indent=2, sort_keys=True)
    fh.write("\n")


def _fsync(file: str) -> None:
  with open(file, "rb") as fh:
    os.fsync(fh.fileno())


def save_pretrained(model: Transformer, path: str, *, dtype: str | None = None,
                    max_shard_bytes: int | None = None) -> None:
  """Writes a checkpoint directory that `transformers.AutoModelForCausalLM` loads.

  Args:
    model: the Transformer (arch qwen2, qwen3 or llama).
    path: the directory. Files are written into a temporary sibling directory which then replaces
      `path`, so a crash leaves the old checkpoint (or none), never half of one. Files already in
      `path` other than config.json / *.safetensors / the index (e.g. tokenizer files) are kept.
    dtype: dtype of the stored tensors (default: the parameter dtype), e.g. "bfloat16".
    max_shard_bytes: split the weights into shards of at most this size (a bigger single tensor
      gets its own shard) with model.safetensors.index.json; None writes one model.safetensors.

  In a multi-process run every process must call this; only process 0 writes.
  """
  dtype_name = jnp.dtype(dtype or model.config.param_dtype).name
  config_json = hf_config.hf_config_from_model_config(model.config, dtype=dtype_name)
  tensors = hf_state_dict(model, dtype=dtype_name)
  shards = _shard(tensors, max_shard_bytes)
  if jax.process_index() != 0:
    return
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"save_pretrained: {path} exists and is not a directory")
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    os.chmod(tmp, fileio.created_mode(directory=True))  # mkdtemp's 0700 would stay owner-only.
    names = []
    if len(shards) == 1:
      names.append(SINGLE_FILE)
    else:
      names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
      _write_json(os.path.join(tmp, INDEX_FILE), {
          "metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
          "weight_map": {k: f for f, shard in zip(names, shards) for k in shard}})
    for name, shard in zip(names, shards):
      safetensors.numpy.save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
    _write_json(os.path.join(tmp, hf_config.CONFIG_FILE), config_json)
    for name in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name), fileio.created_mode())  # safetensors writes 0600.
      _fsync(os.path.join(tmp, name))
    if os.path.isdir(path):
      for name in os.listdir(path):
        if not _is_model_file(name):
          src, dst = os.path.join(path, name), os.path.join(tmp, name)
          (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rename(path, os.path.join(old, base))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
