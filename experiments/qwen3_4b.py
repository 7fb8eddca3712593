r"""DYPO on Qwen3-4B with the paper's method settings (METHOD.md §4), on a TPU v4-16 (v4:2x2x2).

  python -m dypo_jax.tools.aot --config=experiments/qwen3_4b.py          # Proves it fits, on any machine.
  python -m dypo_jax.main --config=experiments/qwen3_4b.py --workdir=... \
      --config.model.hf_path=/mnt/disks/ckpt/Qwen3-4B \
      --config.tokenizer.path=/mnt/disks/ckpt/Qwen3-4B \
      --config.data.train_path=/mnt/disks/data/train.parquet

Same method as experiments/tpu_v4.py (k = 8, 8,192-token responses, lr 1e-6, α = 0.5, β_GAL = 1,
γ = 1, β_KL = 0.001 k3, bfloat16 compute over float32 parameters); the model is Qwen3-4B (tied
embeddings, q/k norms, 8 KV heads) on 8 v4 chips.

Memory (per chip of 8, 30.75 GiB usable; `python -m dypo_jax.tools.aot` prints the compiler's numbers):
float32 parameters, Adam moments and the reference take 7.5 GiB a chip before any activation, so
the update needs one row of 9,215 tokens a chip: pure FSDP over the 8 chips (fsdp 8 x tensor 1),
32 micro-batches of one item (8 rows, one a chip), attention in 512-token blocks: 28.95 GiB
(94%). fsdp 4 x tensor 2 puts 2 rows on a chip (34.9 GiB, no fit), and 8 micro-batches 8 rows
(38.5 GiB of temporaries). Rollouts: 8 prompts x 8 samples a sampler call, 16.4 GiB (the KV cache
of 32 prompts needs 44.6 GiB).
"""
import os

from dypo_jax import config as config_lib

# The compile-only topology `python -m dypo_jax.tools.aot` uses for this config (--topology overrides).
TOPOLOGY = "v4:2x2x2"

# config.json of Qwen/Qwen3-4B (its model card).
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 9728, "vocab_size": 151936, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "attention_bias": False, "hidden_act": "silu", "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 36, "torch_dtype": "bfloat16",
}
HF_PATH = "/mnt/disks/ckpt/Qwen3-4B"  # Placeholder: --config.model.hf_path=...


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/qwen3_4b.py; allowed: ''")
  base = config_lib.load_module(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
  c = base.get_config()  # The method, data, sampler and optimizer settings.
  c.model.update(base.model_fields(QWEN3_4B,
                                   max_seq_len=base.PROMPT_BUCKETS[-1] + base.RESPONSE_LEN))
  c.model.update(dict(init="hf", hf_path=HF_PATH))
  c.model.update(dict(attention_chunk=512))
  c.mesh.update(dict(data=1, fsdp=8, tensor=1))
  c.tokenizer.update(dict(kind="hf", path=HF_PATH, template="qwen3_chat"))
  # Rollouts: 8 prompts x 8 samples a sampler call (32 prompts: 44.6 GiB a chip). The update:
  # micro-batches of one item, whose 8 rows are split one a chip over the 8 fsdp shards.
  c.train.update(dict(rollout_prompts=8, update_prompts=32, micro_batches=32))
  return c


VARIANTS = ("",)
