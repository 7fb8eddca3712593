"""Workload W1 (see benchmarks/README.md): the tiny random Qwen2 and its prompts.

Shared by the sampler, GRPO and DYPO benchmarks so that all of them, and the peers, see the same
model shape and the same prompt token ids.

- Model: Qwen2, hidden 128, 2 layers, 4 heads / 2 KV heads (head dim 32), MLP 512, vocab 512,
  untied, float32, random weights (about 0.62 M parameters).
- Prompts: exactly 32 tokens, BOS + 31 words of the peers' word-level tokenizer
  (`benchmarks/peers/tiny_tok.py`, next to this file; seed 123 for the sampler case). Without
  `tokenizers`/`transformers` (or with DYPO_PEERS_DIR pointing at a folder without tiny_tok.py)
  the same shape is drawn from a fixed numpy seed instead, and `prompt_source` says so.
"""
import os
import sys

from flax import nnx
import numpy as np

from dypo_jax.models import ModelConfig
from dypo_jax.models import Transformer

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # tiny_tok's specials.
VOCAB = 512
PROMPT_WORDS = 31  # + BOS = 32 prompt tokens.
NUM_PROMPTS, NUM_SAMPLES, NEW_TOKENS = 8, 8, 32
TEMPERATURE, TOP_P = 0.9, 1.0
PEERS_DIR = os.environ.get(
    "DYPO_PEERS_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))


def model_config(*, hidden: int = 128, layers: int = 2, max_seq_len: int = 256) -> ModelConfig:
  """The W1 Qwen2 config (hidden/layers overridable for the larger variant in the README)."""
  return ModelConfig(
      arch="qwen2", vocab_size=VOCAB, embed_dim=hidden, num_layers=layers, num_heads=4,
      num_kv_heads=2, head_dim=hidden // 4, mlp_dim=4 * hidden, rope_theta=10_000.0,
      rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True, max_seq_len=max_seq_len,
      param_dtype="float32", dtype="float32")


def make_model(config: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(config, rngs=nnx.Rngs(params=seed))


def make_prompts(n: int, *, seed: int = 123) -> tuple[list[np.ndarray], str]:
  """n prompts of BOS + 31 token ids, and where they came from ("tiny_tok" or "numpy")."""
  try:
    sys.path.insert(0, os.path.abspath(PEERS_DIR))
    import tiny_tok  # pylint: disable=g-import-not-at-top
    tok = tiny_tok.build_tokenizer()
    texts = tiny_tok.make_prompts(n, PROMPT_WORDS, seed=seed)
    prompts = [np.array([BOS_ID] + tok.encode(t, add_special_tokens=False), np.int32)
               for t in texts]
    source = "tiny_tok"
  except ImportError:
    rng = np.random.default_rng(seed)
    prompts = [np.concatenate([[BOS_ID], rng.integers(3, VOCAB, PROMPT_WORDS)]).astype(np.int32)
               for _ in range(n)]
    source = "numpy"
  finally:
    if sys.path and sys.path[0] == os.path.abspath(PEERS_DIR):
      sys.path.pop(0)
  assert all(len(p) == PROMPT_WORDS + 1 for p in prompts), [len(p) for p in prompts]
  return prompts, source
