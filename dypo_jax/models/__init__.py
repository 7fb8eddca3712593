"""Models: the NNX transformer and its one builder, Hugging Face import/export, LM-head log-probs,
the sampler."""
from dypo_jax.models.hf import from_pretrained
from dypo_jax.models.hf import load_pretrained
from dypo_jax.models.hf_config import model_config_from_hf
from dypo_jax.models.hf import save_pretrained
from dypo_jax.models.kv_cache import KVCache
from dypo_jax.models.transformer import ARCHS
from dypo_jax.models.transformer import causal_mask
from dypo_jax.models.transformer import model_config_from_dict
from dypo_jax.models.transformer import ModelConfig
from dypo_jax.models.transformer import param_count
from dypo_jax.models.transformer import positions_from_mask
from dypo_jax.models.transformer import segment_mask
from dypo_jax.models.transformer import Transformer
