"""A Hugging Face config.json and its `ModelConfig`, both ways (Qwen2 / Qwen2.5, Qwen3, Llama).

Keys config.json omits take the values transformers 5 assumes, so a checkpoint loads as it does
there; a config whose family cannot express it is refused on export, naming the field.
"""
from collections.abc import Mapping
import json
import math
import os
from typing import Any

from dypo_jax import errors
from dypo_jax.models.transformer import ARCHS
from dypo_jax.models.transformer import ModelConfig

CONFIG_FILE = "config.json"
# The ModelConfig fields a config.json decides; the others (dtypes, remat, scan_layers, chunks,
# max_seq_len, init_std) are the run's choices.
ARCH_FIELDS = ("arch", "vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "mlp_dim", "rope_theta", "rms_norm_eps", "tie_embeddings",
               "qkv_bias", "qk_norm")
_ARCHITECTURE = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "llama": "LlamaForCausalLM"}
# Values transformers 5 assumes when config.json omits a key (so loading matches it).
_DEFAULT_ROPE_THETA = 10000.0  # All three families (Qwen's real configs always give 1e6 or so).
_DEFAULT_MAX_POSITIONS = {"qwen2": 32768, "qwen3": 32768, "llama": 2048}
_DEFAULT_HEAD_DIM = {"qwen3": 128}  # Qwen3Config's default; the others use hidden / heads.


def read_hf_config(path: str) -> dict[str, Any]:
  """The parsed config.json of a checkpoint directory."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} not found (not a Hugging Face checkpoint directory?)")
  with open(file) as fh:
    try:
      return json.load(fh)
    except json.JSONDecodeError as e:
      raise errors.BadInput(f"{file}: not valid JSON ({e})") from e


def _positive(hf_config: Mapping[str, Any], key: str, kind: type) -> int | float:
  """hf_config[key] as a positive int or float (a bool, a string, zero or less: named)."""
  value = _require(hf_config, key)
  ok = (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
  if not ok or isinstance(value, bool) or not value > 0 or value != value:  # value != value: NaN.
    raise errors.BadInput(f"config.json {key}={value!r} must be a positive "
                          f"{'integer' if kind is int else 'number'} (model_type="
                          f"{hf_config.get('model_type')!r})")
  return kind(value)


def _require(hf_config: Mapping[str, Any], key: str) -> Any:
  if hf_config.get(key) is None:
    raise errors.BadInput(f"config.json lacks required key {key!r} (model_type="
                          f"{hf_config.get('model_type')!r})")
  return hf_config[key]


def _rope_theta(hf_config: Mapping[str, Any], arch: str) -> float:
  """The RoPE base; raises on any RoPE scaling (only the default rotation is implemented)."""
  for key in ("rope_parameters", "rope_scaling"):
    params = hf_config.get(key)
    if params is None:
      continue
    if not isinstance(params, Mapping):
      raise errors.BadInput(f"config.json {key}={params!r} is unsupported: expected a dict")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
      raise errors.BadInput(
          f"config.json {key}.rope_type={rope_type!r} is unsupported (model_type={arch!r}): "
          f"only default RoPE is implemented ({key}={dict(params)!r})")
  top = _theta(hf_config.get("rope_theta"), "rope_theta", arch)
  nested = _theta((hf_config.get("rope_parameters") or {}).get("rope_theta"),
                  "rope_parameters.rope_theta", arch)
  if top is not None and nested is not None and top != nested:
    raise errors.BadInput(f"config.json rope_theta={top!r} disagrees with "
                          f"rope_parameters.rope_theta={nested!r}")
  theta = top if top is not None else nested
  return theta if theta is not None else _DEFAULT_ROPE_THETA


def _theta(value: Any, key: str, arch: str) -> float | None:
  """A RoPE base as a float (None when absent); a string, bool or non-positive value is named."""
  if value is None:
    return None
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or value <= 0):
    raise errors.BadInput(f"config.json {key}={value!r} must be a positive number "
                          f"(model_type={arch!r})")
  return float(value)


def model_config_from_dir(path: str, **kwargs) -> ModelConfig:
  """`model_config_from_hf` of the config.json in `path` (kwargs as there); errors name the file."""
  file = os.path.join(path, CONFIG_FILE)
  try:
    return model_config_from_hf(read_hf_config(path), **kwargs)
  except errors.BadInput as e:
    message = str(e).removeprefix("config.json ")
    raise errors.BadInput(message if file in message else f"{file}: {message}") from None


def model_config_from_hf(hf_config: Mapping[str, Any], *, dtype: str = "float32",
                         param_dtype: str | None = None,
                         max_seq_len: int | None = None) -> ModelConfig:
  """A ModelConfig from a Hugging Face `config.json` dict (qwen2, qwen3 or llama).

  Args:
    hf_config: the parsed config.json.
    dtype: compute dtype of the model.
    param_dtype: parameter dtype; None means `dtype`.
    max_seq_len: context length; None means the config's `max_position_embeddings`.

  Keys config.json omits take transformers' defaults: rope_theta 10000, num_key_value_heads =
  num_attention_heads, head_dim = hidden_size / num_attention_heads (128 for qwen3),
  rms_norm_eps 1e-6, tie_word_embeddings False.

  Raises:
    ValueError naming the key and value of anything the Transformer does not implement: another
    model_type, RoPE scaling, sliding-window attention, an activation other than silu, an o_proj
    or MLP bias (`attention_bias` on llama/qwen3, `mlp_bias`), quantised weights.
  """
  if not isinstance(hf_config, Mapping):
    raise errors.BadInput(f"config.json must hold a JSON object of settings, got a "
                          f"{type(hf_config).__name__}")
  arch = hf_config.get("model_type")
  if arch not in ARCHS:
    raise errors.BadInput(f"config.json model_type={arch!r} is unsupported; supported: {ARCHS}")
  archs = hf_config.get("architectures")
  if archs is not None and list(archs) != [_ARCHITECTURE[arch]]:
    raise errors.BadInput(f"config.json architectures={archs!r} is unsupported for model_type="
                          f"{arch!r}; expected [{_ARCHITECTURE[arch]!r}]")
  unsupported = [
      ("hidden_act", hf_config.get("hidden_act", "silu") != "silu"),
      ("use_sliding_window", bool(hf_config.get("use_sliding_window", False))),
      ("layer_types", any(t != "full_attention" for t in hf_config.get("layer_types") or ())),
      ("attention_bias", arch != "qwen2" and bool(hf_config.get("attention_bias", False))),
      ("mlp_bias", bool(hf_config.get("mlp_bias", False))),
      ("quantization_config", hf_config.get("quantization_config") is not None),
  ]
  for key, bad in unsupported:
    if bad:
      why = " (it adds an o_proj bias, which Transformer lacks)" if key == "attention_bias" else ""
      raise errors.BadInput(f"config.json {key}={hf_config[key]!r} is unsupported "
                            f"(model_type={arch!r}){why}")
  theta = _rope_theta(hf_config, arch)
  hidden = _positive(hf_config, "hidden_size", int)
  heads = _positive(hf_config, "num_attention_heads", int)
  head_dim = (_positive(hf_config, "head_dim", int) if hf_config.get("head_dim") is not None
              else _DEFAULT_HEAD_DIM.get(arch))
  if head_dim is None:
    if hidden % heads:
      raise errors.BadInput(f"config.json hidden_size={hidden} is not a multiple of "
                            f"num_attention_heads={heads}, and head_dim is not given")
    head_dim = hidden // heads
  if max_seq_len is None:
    max_seq_len = (_positive(hf_config, "max_position_embeddings", int)
                   if "max_position_embeddings" in hf_config else _DEFAULT_MAX_POSITIONS[arch])
  return ModelConfig(
      arch=arch,
      vocab_size=_positive(hf_config, "vocab_size", int),
      embed_dim=hidden,
      num_layers=_positive(hf_config, "num_hidden_layers", int),
      num_heads=heads,
      num_kv_heads=(_positive(hf_config, "num_key_value_heads", int)
                    if hf_config.get("num_key_value_heads") is not None else heads),
      head_dim=int(head_dim),
      mlp_dim=_positive(hf_config, "intermediate_size", int),
      rope_theta=theta,
      rms_norm_eps=(_positive(hf_config, "rms_norm_eps", float) if "rms_norm_eps" in hf_config
                    else 1e-6),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      qkv_bias=arch == "qwen2",
      qk_norm=arch == "qwen3",
      max_seq_len=int(max_seq_len),
      param_dtype=param_dtype or dtype,
      dtype=dtype,
  )


def check_exportable(c: ModelConfig) -> None:
  """Each family has fixed attention features; refuse a config its HF class cannot express."""
  if c.arch == "qwen3" and not c.qk_norm:
    raise ValueError("model.qk_norm=False cannot be exported as model.arch='qwen3' (always on)")
  if c.arch != "qwen3" and c.qk_norm:
    raise ValueError(f"model.qk_norm=True cannot be exported as model.arch={c.arch!r}")
  if c.arch != "qwen2" and c.qkv_bias:
    raise ValueError(f"model.qkv_bias=True cannot be exported as model.arch={c.arch!r} "
                     "(its attention_bias also adds an o_proj bias)")


def hf_config_from_model_config(c: ModelConfig, *, dtype: str) -> dict[str, Any]:
  """The config.json dict transformers (4.x and 5.x) reads back as the same architecture."""
  check_exportable(c)
  rope = {"rope_type": "default", "rope_theta": float(c.rope_theta)}
  out = {
      "architectures": [_ARCHITECTURE[c.arch]],
      "model_type": c.arch,
      "vocab_size": c.vocab_size,
      "hidden_size": c.embed_dim,
      "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": c.rms_norm_eps,
      "tie_word_embeddings": c.tie_embeddings,
      "rope_theta": float(c.rope_theta),  # transformers 4.x.
      "rope_parameters": rope,  # transformers 5.x.
      "attention_dropout": 0.0,
      "initializer_range": c.init_std,
      "use_cache": True,
      "dtype": dtype,  # transformers 5.x.
      "torch_dtype": dtype,  # transformers 4.x.
  }
  if c.arch in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
  if c.arch in ("qwen3", "llama"):
    out["attention_bias"] = False
  if c.arch == "llama":
    out["mlp_bias"] = False
  return out


