"""The config schema: every key declared once with its default, and validated before anything runs.

Experiment files (`experiments/*.py`) start from `base_config()` and override values; they cannot
add keys. Each set of allowed values is declared once, by the module that owns it (methods by
`rl.routing`, aggregation modes by `rl.losses`, rewards by `evaluation.rewards`, ...).
`validate(config)` checks that the key set equals the schema's, that every value has the declared
type, is finite when it is a number, and lies in its allowed set or range; each failure names the
key and what is allowed. Compute code never reads a config: the trainer reads it once and passes
plain values.
"""
from collections.abc import Callable
import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from absl import flags
import ml_collections

from dypo_jax import errors
from dypo_jax.evaluation import rewards
from dypo_jax.models import logprobs
from dypo_jax.models import transformer
from dypo_jax.parallel import sharding
from dypo_jax.rl import losses
from dypo_jax.rl import routing
from dypo_jax.rl import train_step

class ConfigError(errors.BadInput):
  """A config key is unknown, missing, of the wrong type or out of range."""


def base_config() -> ml_collections.ConfigDict:
  """Every key dypo_jax reads, with the paper's defaults (METHOD.md §4) where it gives them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # Set by --workdir; empty means ./workdir.

  c.model = ml_collections.ConfigDict(dict(
      arch="qwen2", vocab_size=512, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=32, mlp_dim=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=False,
      qkv_bias=True, qk_norm=False, max_seq_len=512, param_dtype="float32", dtype="float32",
      remat="none", init_std=0.02,
      # True: the layers are one lax.scan (compile time flat in depth: use it at depth). False:
      # a loop over layers, faster on a CPU at a few layers (models.ModelConfig.scan_layers).
      scan_layers=True,
      # Attention in blocks of this many queries (0: off): bounds the [T, S] attention logits,
      # which at 8k-token rows do not fit a TPU's HBM (see dypo_jax.tools.aot). Same result.
      attention_chunk=0,
      # The MLP in sequence blocks of this many tokens (0: off): bounds its [B, T, F]
      # intermediates in the same way. Same result.
      mlp_chunk=0,
      # "random": fresh weights from the fields above; "hf": a Hugging Face directory (hf_path),
      # whose config.json then overrides the architecture fields.
      init="random", hf_path="",
      # How per-token log-probs are computed from the last hidden state (never chosen silently):
      # "chunked" jnp scan over vocab chunks (CPU default), "pallas" fused kernel (Mosaic on
      # TPU, Triton on GPU; pallas_interpret=True runs it interpreted, e.g. on CPU),
      # "full" materialises [B, T, V] (tests, tiny vocabularies).
      logprob_impl="chunked", vocab_chunk=4096, pallas_interpret=False,
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, tensor=1,  # -1: all remaining devices.
      rules=sharding.DEFAULT_RULES,
      # CPU only: split the host into this many XLA devices (0 = XLA's one). XLA:CPU spreads a
      # small op over cores poorly; N devices on the data axis run N streams of rows at once.
      host_devices=0,
      # 0: the sampler runs on the training mesh. N > 0: on its own mesh of the first N devices,
      # all on the data axis, with the parameters copied there (replicated) before each rollout
      # round; for models that fit one device. The training mesh may then name fewer devices
      # than there are (the first ones). With host_devices on CPU, the update keeps one device's
      # multi-threaded matmuls while rollouts run one stream of rows per device.
      rollout_data=0,
      # CPU only: run each XLA program on the calling thread (no async dispatch) and let glibc
      # keep freed memory (large blocks from the heap, never trimmed), so a step's XLA
      # temporaries (~100 MB at W1) reuse resident pages instead of faulting in fresh zeroed
      # ones: W1 took 27k page faults a step without it (host.configure_host, BUILD_NOTES).
      # Temporaries past 2 GB cannot be kept (glibc trims them): set False for such programs.
      host_reuse_memory=True,
  ))
  c.compile_cache = ml_collections.ConfigDict(dict(
      # JAX's persistent compilation cache: a restarted or resumed run loads its programs instead
      # of compiling them again. "workdir": <workdir>/compile_cache (with a gs:// workdir, in the
      # bucket, which every host of a pod reads); "off"; or any folder or URL (one shared by all
      # runs of a project). An environment that sets JAX_COMPILATION_CACHE_DIR wins.
      dir="workdir",
      min_compile_time_s=1.0,  # Programs that compile faster get no cache entry.
  ))
  c.distributed = ml_collections.ConfigDict(dict(
      # "auto": initialise when the environment says so (a TPU pod, or the JAX_COORDINATOR_*
      # variables); "always" / "never" force it.
      initialize="auto", coordinator_address="", num_processes=0, process_id=-1,
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="sentencepiece",  # or "hf" (a tokenizer.json, as Qwen ships).
      path="",  # Empty with sentencepiece: train one in the workdir from the training prompts.
      train_vocab_size=256,
      template="plain",  # See dypo_jax.data.templates.TEMPLATES.
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="procedural",  # or "files", or "tfds".
      train_path="", eval_id_paths=(), eval_ood_paths=(),  # For source="files".
      # For source="tfds": a dataset built by dypo_jax.data.tfds_builder, read through grain; an
      # empty eval split means no such pool.
      tfds_data_dir="", tfds_name="", tfds_train_split="train", tfds_eval_id_split="eval_id",
      tfds_eval_ood_split="eval_ood",
      on_error="raise",  # A malformed record stops the run ("skip": skipped and counted).
      num_train=2000, num_eval_id=200, num_eval_ood=200,  # For source="procedural".
      # Names in dypo_jax.data.tasks.ID_TASKS / OOD_TASKS; teachers keep their built-in quirks.
      id_tasks=("add", "mul", "gcd", "lineq"),
      ood_tasks=("add_long", "add_3digit", "mul_3x1", "gcd_large", "lineq_large", "sub_chain",
                 "addsub_chain"),
      reward="exact_match",
      shuffle=True,
  ))

  # The math-verify process pool (data.reward="math_verify"): an item unscored after item_timeout_s,
  # or still unscored batch_timeout_s into its batch, scores 0 and counts as a timeout.
  c.verifier = ml_collections.ConfigDict(dict(
      workers=0,  # 0: this host's cores minus one, at least one.
      item_timeout_s=10.0, batch_timeout_s=600.0,
  ))

  c.sampler = ml_collections.ConfigDict(dict(
      max_new_tokens=96, temperature=1.0, top_p=1.0, top_k=0,
      prompt_buckets=(32, 64, 128, 256, 512, 1024, 2048, 4096),
      rows=0,  # Rows in flight (continuous batching); 0: every sample of a round at once.
  ))

  c.rl = ml_collections.ConfigDict(dict(
      method="dypo",
      num_samples=8,  # k, rollouts per prompt.
      alpha=0.5,  # Weight of GRPO against GAL on Mid prompts.
      beta_gal=1.0,
      sft_loss_coef=1.0,  # γ.
      kl_coef=0.001, kl_estimator="k3",  # β_KL (decision, METHOD.md §4).
      clip_low=0.2, clip_high=0.2,
      agg_mode="token-mean",
      scale_adv_by_std=True, adv_eps=1e-6,
      gal_length_norm="sum",
      switch_gate=0,  # Step from which routing is on; before it, plain GRPO.
      offline_loss_type="sft",  # "rl": teacher trace as an off-policy group member (LUFFY).
      offpolicy_shaping=0.1,
      format_penalty_coef=0.0,
      sft_then_rl_switch=0,  # For method="sft_then_rl": SFT steps before GRPO.
      # One scale for SFT, GRPO and GAL (METHOD.md §2): "token" (verl: token means, GAL's loss
      # over the batch's mean rollout length), "sequence" (the paper's per-trajectory sums over
      # sampler.max_new_tokens; needs agg_mode="seq-mean-token-sum-norm"), "legacy" (GAL
      # unnormalised, ~mean length x GRPO's scale: the figures made before this key).
      loss_scale="token",
      srft_sft_coef=0.5, srft_positive_coef=0.1,  # method="srft" (METHOD.md §5).
      chord_mu_start=0.9, chord_mu_end=0.05, chord_mu_steps=100,  # method="chord": μ schedule.
  ))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-6, schedule="constant", warmup_steps=0, min_lr_ratio=0.1,
      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=100,  # Optimizer updates.
      rollout_prompts=8,  # Prompts sampled per rollout round.
      update_prompts=8,  # Prompts per update batch: its queued items (twice that for SFT+RL
      # methods, which queue a teacher trace and a group per prompt: routing.update_items).
      micro_batches=1,  # Gradient accumulation: update_prompts must divide by it.
      max_rollouts_per_update=8,  # Rollout rounds before an update fires with what is queued.
      # Updates in a row that find nothing queued (every prompt Easy, or Hard without a teacher
      # trace) before the run stops: nothing is left to learn at this difficulty (exit status 3).
      max_empty_updates=5,
      # A workdir's lock (workdir/run.lock) whose holder has not renewed it for this long, or whose
      # process on this host is gone, is taken over; a live one makes a second run refuse. A
      # heartbeat ahead of this host's clock counts as gone once unchanged for this long; a run
      # whose own heartbeat failed this long stops (exit status 7). May change on resume.
      workdir_lock_stale_s=600.0,
      # How long a failing store (I/O, permission, network errors; not damaged bytes) is retried
      # in all before the run stops with exit status 69, naming the path.
      storage_retry_s=180.0,
      log_every=1, checkpoint_every=50, keep_checkpoints=3, eval_every=0,
      max_nonfinite_updates=10,
      # One backward per loss term for the per-term gradient norms of METHOD.md §6, on logged
      # updates only (3x the backward cost there; off for large models).
      per_term_grad_norms=True,
      # A batch of groups only (no packed Hard slot) runs each prompt once and its K responses
      # against copies of its KV cache: the prompt's share of the update costs 1/K. The cached
      # forward is not rematerialised, so this needs model.remat="none".
      shared_prompt=True,
      # Pack several responses into each row of the update's model passes (policy and
      # reference; `update_batch.pack`): their cost follows the real tokens, not U * K * (P + T).
      # Same loss, gradients and metrics (tests/rl/test_packing.py). With it, shared_prompt shares
      # each group's prompt within a packed row (no KV cache: remat is free). Off by default: a
      # packed row count first met mid-run compiles then (minutes for a large TPU program), and
      # a batch of full-length rows has nothing to pack; on long-tailed lengths it is ~4-5x the
      # unpacked update's tokens/s (BENCHMARKS.md, Long-tail).
      pack_updates=False,
      # Packed rows' attention in query blocks of this many tokens, each over only the keys it
      # sees (`transformer._windowed_attention`: row-by-row loops, for CPU and long rows of
      # short sequences); 0: one dense masked attention over each packed row. Off by default:
      # at 512 new tokens (W1 model, CPU) block 64 cut the packed forward ~1.9x but not its
      # backward, and at 2048 its update ran out of memory on CPU (BENCHMARKS.md, Long-tail).
      pack_attention_block=0,
  ))

  c.pretrain = ml_collections.ConfigDict(dict(
      # Small experiments start from a partly capable base: teacher SFT from scratch, stopped
      # when a greedy held-out ID accuracy crosses target_accuracy (METHOD.md §8), saved to
      # workdir/base_model and reused. max_minutes is only a guard, reported when it fires.
      enabled=False, target_accuracy=0.35, max_steps=3000, eval_every=50, eval_prompts=64,
      learning_rate=1e-3, update_prompts=32, max_minutes=8.0,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=4, temperature=0.6, top_p=1.0, max_new_tokens=96, pass_ks=(1,),
      max_prompts=200,
  ))
  return c


# --------------------------------------------------------------------------------------------
# Validation.


@dataclasses.dataclass(frozen=True)
class _Rule:
  check: Callable[[Any], bool]
  allowed: str


def _choice(*options) -> _Rule:
  return _Rule(lambda v: v in options, f"one of {options}")


def _range(lo=None, hi=None, *, lo_open=False, hi_open=False) -> _Rule:
  def check(v):
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))
  lb = "(" if lo_open else "["
  rb = ")" if hi_open else "]"
  return _Rule(check, f"a value in {lb}{lo if lo is not None else '-inf'}, "
                      f"{hi if hi is not None else 'inf'}{rb}")


_POSITIVE = _range(0, lo_open=True)
_NON_NEGATIVE = _range(0)
_DTYPES = _choice("float32", "bfloat16", "float16")

_RULES: dict[str, _Rule] = {
    "model.arch": _choice(*transformer.ARCHS), "model.remat": _choice(*transformer.REMAT_POLICIES),
    "model.vocab_size": _POSITIVE, "model.embed_dim": _POSITIVE, "model.num_layers": _POSITIVE,
    "model.num_heads": _POSITIVE, "model.num_kv_heads": _POSITIVE, "model.head_dim": _POSITIVE,
    "model.mlp_dim": _POSITIVE, "model.rope_theta": _POSITIVE, "model.rms_norm_eps": _POSITIVE,
    "mesh.host_devices": _NON_NEGATIVE, "mesh.rollout_data": _NON_NEGATIVE,
    "model.max_seq_len": _POSITIVE, "model.param_dtype": _DTYPES, "model.dtype": _DTYPES,
    "model.init_std": _POSITIVE, "model.init": _choice("random", "hf"),
    "model.attention_chunk": _NON_NEGATIVE, "model.mlp_chunk": _NON_NEGATIVE,
    "model.logprob_impl": _choice(*logprobs.IMPLS), "model.vocab_chunk": _POSITIVE,
    "distributed.initialize": _choice("auto", "always", "never"),
    "tokenizer.kind": _choice("sentencepiece", "hf"),
    "tokenizer.train_vocab_size": _range(16),
    "data.source": _choice("procedural", "files", "tfds"),
    "data.on_error": _choice("raise", "skip"),
    "data.num_train": _POSITIVE, "data.num_eval_id": _NON_NEGATIVE,
    "data.num_eval_ood": _NON_NEGATIVE,
    "sampler.max_new_tokens": _POSITIVE, "sampler.temperature": _NON_NEGATIVE,
    "sampler.top_p": _range(0, 1, lo_open=True), "sampler.top_k": _NON_NEGATIVE,
    "sampler.rows": _NON_NEGATIVE,
    "rl.method": _choice(*routing.METHODS),
    "rl.num_samples": _range(2),
    "rl.alpha": _range(0, 1), "rl.beta_gal": _POSITIVE, "rl.sft_loss_coef": _NON_NEGATIVE,
    "rl.kl_coef": _NON_NEGATIVE, "rl.kl_estimator": _choice(*losses.KL_ESTIMATORS),
    "rl.clip_low": _range(0, 1), "rl.clip_high": _NON_NEGATIVE,
    "rl.agg_mode": _choice(*losses.AGG_MODES), "rl.adv_eps": _POSITIVE,
    "rl.gal_length_norm": _choice(*losses.LENGTH_NORMS), "rl.switch_gate": _NON_NEGATIVE,
    "rl.offline_loss_type": _choice(*routing.OFFLINE_LOSS_TYPES), "rl.offpolicy_shaping": _POSITIVE,
    "rl.format_penalty_coef": _NON_NEGATIVE, "rl.sft_then_rl_switch": _NON_NEGATIVE,
    "rl.loss_scale": _choice(*losses.LOSS_SCALES), "rl.srft_sft_coef": _NON_NEGATIVE,
    "rl.srft_positive_coef": _NON_NEGATIVE, "rl.chord_mu_start": _range(0, 1),
    "rl.chord_mu_end": _range(0, 1), "rl.chord_mu_steps": _range(1),
    "optim.learning_rate": _POSITIVE, "optim.schedule": _choice(*train_step.SCHEDULES),
    "optim.warmup_steps": _NON_NEGATIVE, "optim.min_lr_ratio": _range(0, 1),
    "optim.weight_decay": _NON_NEGATIVE, "optim.b1": _range(0, 1, hi_open=True),
    "optim.b2": _range(0, 1, hi_open=True), "optim.eps": _POSITIVE,
    "optim.grad_clip": _NON_NEGATIVE,
    "train.num_steps": _NON_NEGATIVE, "train.rollout_prompts": _POSITIVE,
    "train.update_prompts": _POSITIVE, "train.micro_batches": _POSITIVE,
    "train.pack_attention_block": _NON_NEGATIVE,
    "train.max_rollouts_per_update": _POSITIVE, "train.max_empty_updates": _POSITIVE,
    "train.workdir_lock_stale_s": _POSITIVE, "train.storage_retry_s": _NON_NEGATIVE,
    "compile_cache.min_compile_time_s": _NON_NEGATIVE,
    "train.log_every": _POSITIVE, "train.checkpoint_every": _NON_NEGATIVE,
    "train.keep_checkpoints": _POSITIVE, "train.eval_every": _NON_NEGATIVE,
    "train.max_nonfinite_updates": _POSITIVE,
    "pretrain.target_accuracy": _range(0, 1), "pretrain.max_steps": _POSITIVE,
    "pretrain.eval_every": _POSITIVE, "pretrain.eval_prompts": _POSITIVE,
    "pretrain.learning_rate": _POSITIVE, "pretrain.update_prompts": _POSITIVE,
    "pretrain.max_minutes": _POSITIVE,
    "eval.num_samples": _POSITIVE, "eval.temperature": _NON_NEGATIVE,
    "eval.top_p": _range(0, 1, lo_open=True), "eval.max_new_tokens": _POSITIVE,
    "eval.max_prompts": _POSITIVE,
    "verifier.workers": _NON_NEGATIVE, "verifier.item_timeout_s": _POSITIVE,
    "verifier.batch_timeout_s": _POSITIVE,
}


def _flatten(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in c.keys():
    value = c[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _type_ok(value, default) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _bad_element(value, default):
  """The first element of a tuple value whose type differs from the default's elements, if any.

  Only checked where the default's elements share one scalar type (pass_ks, prompt_buckets,
  task names); an empty default (file lists) says nothing about its elements.
  """
  if not isinstance(default, (tuple, list)) or not default:
    return None
  kinds = {type(d) for d in default}
  if len(kinds) != 1 or kinds.pop() not in (bool, int, float, str):
    return None
  return next((v for v in value if not _type_ok(v, default[0])), None)


def _numbers(value) -> list[float]:
  """The floats in a value (a number, or a tuple or list of them, nested)."""
  if isinstance(value, float):
    return [value]
  if isinstance(value, (tuple, list)):
    return [x for v in value for x in _numbers(v)]
  return []


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key and what it allows."""
  schema = _flatten(base_config())
  values = _flatten(config)
  for key in values:
    if key not in schema:
      section = key.rsplit(".", 1)[0] if "." in key else ""
      known = sorted(k for k in schema if k.rsplit(".", 1)[0] == section) if section else []
      raise ConfigError(f"unknown config key {key!r}; known keys"
                        f"{' in ' + repr(section) if section else ''}: {known or sorted(schema)}")
  for key in schema:
    if key not in values:
      raise ConfigError(f"config key {key!r} is missing (start configs from base_config())")
  for key, value in values.items():
    default = schema[key]
    if not _type_ok(value, default):
      raise ConfigError(f"config key {key!r} = {value!r} has type {type(value).__name__}; "
                        f"expected {type(default).__name__}")
    bad = _bad_element(value, default)
    if bad is not None:
      raise ConfigError(f"config key {key!r} = {tuple(value)!r} holds {bad!r} of type "
                        f"{type(bad).__name__}; expected a tuple of {type(default[0]).__name__}")
    for number in _numbers(value):
      if not math.isfinite(number):
        raise ConfigError(f"config key {key!r} = {value!r} is not finite; every number must be")
    rule = _RULES.get(key)
    if rule is not None and not rule.check(value):
      raise ConfigError(f"config key {key!r} = {value!r} is not allowed; expected {rule.allowed}")
  _validate_relations(config)


def _validate_relations(c: ml_collections.ConfigDict) -> None:
  """Checks that involve several keys."""
  m = c.model
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of "
                      f"model.num_kv_heads={m.num_kv_heads}")
  if m.head_dim % 2:
    raise ConfigError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
  if m.init == "hf" and not m.hf_path:
    raise ConfigError("model.init='hf' needs model.hf_path (a Hugging Face checkpoint directory)")
  sizes = [c.mesh[a] for a in sharding.MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(f"mesh sizes {dict(zip(sharding.MESH_AXES, sizes))}: each >= 1, "
                      "and at most one may be -1")
  for rule in c.mesh.rules:
    if len(rule) != 2:
      raise ConfigError(f"mesh.rules entry {rule!r}: expected (logical_axis, mesh_axes)")
    targets = (rule[1],) if isinstance(rule[1], str) else tuple(rule[1] or ())
    for t in targets:
      if t not in sharding.MESH_AXES:
        raise ConfigError(f"mesh.rules entry {rule!r}: mesh axis {t!r} not in "
                          f"{sharding.MESH_AXES}")
  t = c.train
  if t.update_prompts % t.micro_batches:
    raise ConfigError(f"train.update_prompts={t.update_prompts} must be a multiple of "
                      f"train.micro_batches={t.micro_batches}")
  if t.shared_prompt and not t.pack_updates and m.remat != "none":
    raise ConfigError("train.shared_prompt=True needs model.remat='none' (the prompt's KV cache "
                      "is read by a cached forward, which is not rematerialised); set one off")
  if c.rl.clip_low >= 1:
    raise ConfigError(f"rl.clip_low={c.rl.clip_low} must be < 1 (the ratio floor 1 - clip_low)")
  if c.rl.loss_scale == "sequence" and c.rl.agg_mode != "seq-mean-token-sum-norm":
    raise ConfigError(f"rl.loss_scale='sequence' sums each trajectory's tokens over "
                      f"sampler.max_new_tokens, which is rl.agg_mode='seq-mean-token-sum-norm' "
                      f"for GRPO; got rl.agg_mode={c.rl.agg_mode!r}: set both")
  # The reward registry is open (`rewards.register`): a reward registered by the experiment file
  # before validation is as good as a built-in one.
  if c.data.reward not in rewards.REWARDS:
    raise ConfigError(f"config key 'data.reward' = {c.data.reward!r} is not a registered reward; "
                      f"expected one of {sorted(rewards.REWARDS)} (or register one with "
                      f"dypo_jax.evaluation.rewards.register)")
  if c.data.source == "files" and not c.data.train_path:
    raise ConfigError("data.source='files' needs data.train_path")
  file_keys = [k for k in ("train_path", "eval_id_paths", "eval_ood_paths") if c.data[k]]
  if c.data.source != "files" and file_keys:  # Would be silently ignored.
    raise ConfigError(f"data.{file_keys[0]} is set but data.source={c.data.source!r} does not read "
                      "files; add --config.data.source=files")
  tfds_keys = [k for k in ("tfds_data_dir", "tfds_name") if c.data[k]]
  if c.data.source == "tfds":
    missing = [k for k in ("tfds_data_dir", "tfds_name", "tfds_train_split") if not c.data[k]]
    if missing:
      raise ConfigError(f"data.source='tfds' needs data.{missing[0]} (build a dataset with "
                        "python -m dypo_jax.data.tfds_builder)")
  elif tfds_keys:  # Would be silently ignored.
    raise ConfigError(f"data.{tfds_keys[0]} is set but data.source={c.data.source!r} does not "
                      "read TFDS; add --config.data.source=tfds")
  buckets = tuple(c.sampler.prompt_buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
    raise ConfigError(f"sampler.prompt_buckets={buckets}: a non-empty increasing tuple of "
                      "positive lengths")
  if any(k < 1 for k in c.eval.pass_ks) or max(c.eval.pass_ks, default=1) > c.eval.num_samples:
    raise ConfigError(f"eval.pass_ks={tuple(c.eval.pass_ks)}: each k in [1, eval.num_samples="
                      f"{c.eval.num_samples}]")
  for section in ("sampler", "eval"):  # A response needs at least one prompt token before it.
    if c[section].max_new_tokens >= m.max_seq_len:
      raise ConfigError(f"{section}.max_new_tokens={c[section].max_new_tokens} must be < "
                        f"model.max_seq_len={m.max_seq_len}")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return config.to_dict()


def from_dict(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config saved with `to_dict` (e.g. in a checkpoint), over `base_config()`: keys it lacks keep
  their defaults, keys the schema no longer has are ignored (an older run's config still loads),
  and JSON lists become tuples again."""
  tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v
  config = base_config()
  # A run saved before rl.loss_scale existed trained with what is now 'legacy': keep it so.
  if isinstance(saved.get("rl"), dict) and "loss_scale" not in saved["rl"]:
    config.rl.loss_scale = "legacy"
  for section, values in saved.items():
    if section not in config:
      continue
    if isinstance(values, dict):
      for key, value in values.items():
        if key in config[section]:
          config[section][key] = tuples(value)
    else:
      config[section] = tuples(values)
  return config


def load_module(path: str):
  """The Python file at `path` as a module (an experiment config, or a script beside one)."""
  spec = importlib.util.spec_from_file_location(
      "dypo_experiment_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"experiment file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment(path: str, variant: str = "") -> ml_collections.ConfigDict:
  """`get_config(variant)` of an experiment file, by path (configs may build on one another)."""
  return load_module(path).get_config(variant)


def check_override_keys(argv: list[str]) -> None:
  """Names an unknown `--config.a.b=...` override with the keys that exist (before absl parses
  the flags, which would only say "Unknown command line flag")."""
  schema = base_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:i]) or "config"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"unknown config key {key!r} in {arg!r}; keys of {where!r}: {known}")
      node = node[part]


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parse (an `app.run` flags_parser), with a flag it cannot read as a ConfigError
  that names it in one sentence: a `--config.<key>=` value of the wrong type names the key and
  its type, and an experiment file's own refusal (an unknown variant) is said as it said it.
  absl would print "FATAL Flags parsing error" (with the experiment file's traceback) and exit 1.
  """
  try:
    return flag_values(argv)
  except flags.Error as e:
    raise ConfigError(_flag_error(e, flag_values)) from e


def _a(kind: str) -> str:
  return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _flag_error(e: flags.Error, flag_values: flags.FlagValues) -> str:
  text = str(e)
  named = re.match(r"flag (\S+): ", text)
  if not named:
    return text
  arg = named.group(1)
  name, _, value = arg[2:].partition("=")
  if name.startswith("config.") and value:
    key = name[len("config."):]
    default = _flatten(base_config()).get(key)
    if default is not None:
      return (f"{arg}: config key {key!r} takes {_a(type(default).__name__)} (the schema's "
              f"default is {default!r}), not {value!r}")
  elif name in flag_values and flag_values[name].flag_type() in ("int", "float"):
    return f"{arg}: --{name} takes {_a(flag_values[name].flag_type())}, not {value!r}"
  cause = e  # The innermost error: what the experiment file (or the flag's parser) raised.
  while cause.__cause__ or cause.__context__:
    cause = cause.__cause__ or cause.__context__
  reason = text[named.end():] if cause is e else str(cause)
  return f"{arg}: {reason.strip().splitlines()[-1] if reason.strip() else text}"
