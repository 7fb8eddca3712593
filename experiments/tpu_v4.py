r"""DYPO on Qwen2.5-Math-7B, the paper's setting (METHOD.md §4), on a TPU v4-64 pod slice (v4:2x4x4).

  python -m dypo_jax.tools.aot --config=experiments/tpu_v4.py          # Proves it fits, on any machine.
  python -m dypo_jax.main --config=experiments/tpu_v4.py --workdir=... \
      --config.model.hf_path=/mnt/disks/ckpt/Qwen2.5-Math-7B \
      --config.data.train_path=/mnt/disks/data/train.parquet

Method: k = 8 rollouts at temperature 1, responses up to 8,192 tokens, lr 1e-6, α = 0.5,
β_GAL = 1, γ = 1, β_KL = 0.001 with k3, bfloat16 compute. Parameters and Adam moments stay float32
(mixed precision, as verl's FSDP does): a 1e-6 step is below bfloat16's resolution for most
weights, so bfloat16 master weights would silently not train.

Memory (per chip of 32, 30.75 GiB usable; `python -m dypo_jax.tools.aot` prints the compiler's numbers):
fsdp 8 x tensor 4, every block rematerialised, attention and MLP in 1,024-token blocks, the
residual stream pinned to the batch sharding (`build.build_model` sets it as the AOT check
does). The update runs 32 micro-batches of 2 items = 16 rows, split by row over the 8 fsdp
shards: 2 rows of 9,215 tokens a chip, 21.5 GiB in all. (8 micro-batches of 8 items put 8 rows on
each chip: 35 GiB of temporaries, no fit; 64 micro-batches of one item: 14.6 GiB.) Both programs
fit; see BUILD_NOTES.md. Placeholder paths are set on the command line.
"""
from dypo_jax import config as config_lib
from dypo_jax.models import hf_config as hf_config_lib

# The compile-only topology `python -m dypo_jax.tools.aot` uses for this config (--topology overrides).
TOPOLOGY = "v4:2x4x4"

# config.json of Qwen/Qwen2.5-Math-7B (its model card). The checkpoint's own config.json is what
# a run reads (model.init = "hf"); this copy gives the schema's architecture fields the same
# values, so that `dypo_jax.tools.aot` compiles the real shapes without the weights.
QWEN25_MATH_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "intermediate_size": 18944, "vocab_size": 152064, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": 28, "torch_dtype": "bfloat16",
}
HF_PATH = "/mnt/disks/ckpt/Qwen2.5-Math-7B"  # Placeholder: --config.model.hf_path=...
RESPONSE_LEN = 8192  # Paper: max response length.
PROMPT_BUCKETS = (256, 512, 1024)  # The largest bucket bounds the compiled update length.


def model_fields(hf_config: dict, *, max_seq_len: int) -> dict:
  """The schema's architecture fields for a Hugging Face config.json dict (dtype policy included)."""
  mc = hf_config_lib.model_config_from_hf(hf_config, dtype="bfloat16", param_dtype="float32",
                                          max_seq_len=max_seq_len)
  return dict(
      arch=mc.arch, vocab_size=mc.vocab_size, embed_dim=mc.embed_dim, num_layers=mc.num_layers,
      num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
      mlp_dim=mc.mlp_dim, rope_theta=mc.rope_theta, rms_norm_eps=mc.rms_norm_eps,
      tie_embeddings=mc.tie_embeddings, qkv_bias=mc.qkv_bias, qk_norm=mc.qk_norm,
      max_seq_len=mc.max_seq_len, param_dtype=mc.param_dtype, dtype=mc.dtype)


def get_config(variant: str = ""):
  if variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/tpu_v4.py; allowed: ''")
  c = config_lib.base_config()
  c.model.update(model_fields(QWEN25_MATH_7B, max_seq_len=PROMPT_BUCKETS[-1] + RESPONSE_LEN))
  c.model.update(dict(init="hf", hf_path=HF_PATH, remat="full", logprob_impl="chunked",
                      vocab_chunk=4096, attention_chunk=1024, mlp_chunk=1024))
  c.mesh.update(dict(data=1, fsdp=8, tensor=4))
  c.tokenizer.update(dict(kind="hf", path=HF_PATH, template="qwen_chat"))
  c.data.update(dict(source="files", train_path="/mnt/disks/data/train.parquet",
                     reward="math_verify"))
  c.sampler.update(dict(max_new_tokens=RESPONSE_LEN, temperature=1.0, top_p=1.0, top_k=0,
                        prompt_buckets=PROMPT_BUCKETS))
  c.rl.update(dict(method="dypo", num_samples=8, alpha=0.5, beta_gal=1.0, sft_loss_coef=1.0,
                   kl_coef=0.001, kl_estimator="k3"))
  c.optim.update(dict(learning_rate=1e-6, schedule="constant", grad_clip=1.0))
  c.train.update(dict(num_steps=500, rollout_prompts=64, update_prompts=64, micro_batches=32,
                      per_term_grad_norms=False, shared_prompt=False,  # Remat needs the row path.
                      log_every=1, checkpoint_every=20,
                      eval_every=50))
  c.eval.update(dict(num_samples=8, temperature=0.6, max_new_tokens=RESPONSE_LEN, pass_ks=(1, 8),
                     max_prompts=500))
  return c


VARIANTS = ("",)
