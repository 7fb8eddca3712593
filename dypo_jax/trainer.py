"""The DYPO loop: rollout -> reward -> grade -> queue -> update -> log -> eval -> checkpoint.

The loop only orchestrates; the maths are in `losses`, `gating` and `train_step`. Everything a
restart needs (train state, reference params, rng, data position, queues, eval history, counters)
is saved together in one Orbax checkpoint.
"""
import base64
import dataclasses
import json
import os
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dypo_jax import checkpoint as checkpoint_lib
from dypo_jax import evaluate as evaluate_lib
from dypo_jax import gating
from dypo_jax import metrics as metrics_lib
from dypo_jax import queues as queues_lib
from dypo_jax import rewards as rewards_lib
from dypo_jax import sampler as sampler_lib
from dypo_jax import sharding
from dypo_jax import train_step as step_lib
from dypo_jax.data import pipeline as pipeline_lib
from dypo_jax.data import records as records_lib

# Methods whose rollouts are graded and routed (after rl.switch_gate).
_ROUTED = ("dypo",)


# Seeded epochs over this process's shard of the training pool (a grain pipeline): take(n) gives
# record indices, state() a JSON dict that restore() resumes exactly. See data/pipeline.py.
PromptStream = pipeline_lib.IndexStream


@dataclasses.dataclass
class _RoundStats:
  """Rollout statistics accumulated between two updates."""
  rewards: list = dataclasses.field(default_factory=list)
  shaped: list = dataclasses.field(default_factory=list)
  grades: list = dataclasses.field(default_factory=list)
  lengths: list = dataclasses.field(default_factory=list)
  truncated: list = dataclasses.field(default_factory=list)
  tokens: int = 0
  rollout_s: float = 0.0
  reward_s: float = 0.0
  no_teacher: int = 0
  reward_errors: int = 0

  def metrics(self) -> dict[str, float]:
    if not self.rewards:
      return {}
    r = np.concatenate(self.rewards)
    g = np.concatenate(self.grades)
    lengths = np.concatenate(self.lengths)
    return {
        "reward/binary": float(r.mean()), "reward/shaped": float(np.concatenate(self.shaped).mean()),
        "route/easy_frac": float((g == gating.EASY).mean()),
        "route/mid_frac": float((g == gating.MID).mean()),
        "route/hard_frac": float((g == gating.HARD).mean()),
        "response/len_mean": float(lengths.mean()), "response/len_max": float(lengths.max()),
        "response/truncated_frac": float(np.concatenate(self.truncated).mean()),
        "perf/rollout_tok_s": self.tokens / max(self.rollout_s, 1e-9),
        "time/rollout_s": self.rollout_s, "time/reward_s": self.reward_s,
        "sft/no_teacher_skipped": self.no_teacher, "reward/errors": self.reward_errors,
    }


def _left_pad(tokens, length: int, pad_id: int) -> np.ndarray:
  out = np.full((length,), pad_id, np.int32)
  out[length - len(tokens):] = tokens
  return out


class Trainer:
  """Holds what the loop needs between steps; `run()` is the loop."""

  def __init__(self, config: ml_collections.ConfigDict, *, workdir: str, mesh, tokenizer, model,
               pools: dict[str, list[records_lib.PromptRecord]]):
    self.config, self.workdir, self.mesh, self.tok = config, workdir, mesh, tokenizer
    self.pools = pools
    rl, tr, sp = config.rl, config.train, config.sampler
    self.method = rl.method
    self.k = rl.num_samples
    self.max_len = sp.max_new_tokens
    self.rules = tuple((n, tuple(t) if isinstance(t, list) else t) for n, t in config.mesh.rules)
    self.is_main = jax.process_index() == 0
    if self.tok.pad_id is None:
      raise ValueError("the tokenizer has neither a pad nor an eos token; dypo_jax needs one")
    self.pad_id = self.tok.pad_id
    self.stop_ids = (self.tok.eos_id,) if self.tok.eos_id is not None else ()

    # Encode the training pool once: prompt tokens and teacher traces (eos-terminated).
    train = pools["train"]
    self.teacher_names = sorted({s.teacher for r in train for s in r.teachers})
    self.teacher_index = {n: i for i, n in enumerate(self.teacher_names)}
    self.prompt_tokens = [evaluate_lib.encode_prompt(self.tok, r, config.tokenizer.template)
                          for r in train]
    self.teacher_tokens = [[self._encode_trace(s.response) for s in r.teachers] for r in train]
    self.truncated_teacher_traces = sum(
        len(t) > self.max_len for ts in self.teacher_tokens for t in ts)
    self.teacher_tokens = [[t[:self.max_len] for t in ts] for ts in self.teacher_tokens]

    # Model, reference and optimizer state, all sharded by the rules.
    self.graphdef, params = nnx.split(model, nnx.Param)
    self.sampler = sampler_lib.Sampler(
        self.graphdef, model_config=model.config, pad_id=self.pad_id,
        prompt_buckets=tuple(sp.prompt_buckets), mesh=mesh, rules=self.rules)
    longest = max(len(p) for p in self.prompt_tokens)
    self.prompt_len = self.sampler.bucket_for(longest, self.max_len)
    if longest > self.prompt_len:
      raise ValueError(f"a training prompt has {longest} tokens; with max_new_tokens="
                       f"{self.max_len} the context (model.max_seq_len="
                       f"{model.config.max_seq_len}) leaves room for {self.prompt_len}")
    self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
    o = config.optim
    self.tx, self.schedule = step_lib.make_optimizer(
        learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
        total_steps=tr.num_steps, min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay,
        b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip)
    self.state, self.state_shardings = self._init_state(params)
    # The frozen reference: a copy of the starting policy (never donated, never updated).
    self.ref_params = jax.tree.map(jnp.copy, params)

    batch_shards = self.sampler.batch_shards
    per_micro = tr.update_prompts // tr.micro_batches
    if per_micro % batch_shards:
      raise ValueError(f"train.update_prompts / train.micro_batches = {per_micro} must be a "
                       f"multiple of the {batch_shards} batch shards of the mesh")
    step_cfg = step_lib.StepConfig(
        prompt_len=self.prompt_len, temperature=max(sp.temperature, 1e-6),
        clip_low=rl.clip_low, clip_high=rl.clip_high, kl_coef=rl.kl_coef,
        kl_estimator=rl.kl_estimator, agg_mode=rl.agg_mode, max_len=self.max_len,
        scale_adv_by_std=rl.scale_adv_by_std, adv_eps=rl.adv_eps, beta_gal=rl.beta_gal,
        gal_length_norm=rl.gal_length_norm, offpolicy_shaping=rl.offpolicy_shaping,
        micro_batches=tr.micro_batches, num_teachers=max(len(self.teacher_names), 1),
        logprob_impl=config.model.logprob_impl, vocab_chunk=config.model.vocab_chunk,
        use_gal=self.method in _ROUTED and rl.alpha < 1.0,
        per_term_grad_norms=tr.per_term_grad_norms)
    self.step_cfg = step_cfg
    step_fn = step_lib.build_train_step(self.graphdef, step_cfg, self.tx, self.schedule)
    shapes = step_lib.batch_spec_shapes(items=tr.update_prompts, k=self.k,
                                        prompt_len=self.prompt_len, max_len=self.max_len)
    self.batch_shardings = {
        name: (sharding.batch_sharding(mesh, self.rules, len(shape)) if name != "weights"
               else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        for name, (shape, _) in shapes.items()}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.step_trace_count = 0

    def counted_step(*args):
      self.step_trace_count += 1
      return step_fn(*args)

    self.train_step = jax.jit(
        counted_step, donate_argnums=(0,),
        in_shardings=(self.state_shardings, self.param_shardings, self.batch_shardings,
                      replicated),
        out_shardings=(self.state_shardings, replicated))

    self.queues = queues_lib.QueueSet()
    self.stream = PromptStream(len(train), seed=config.seed, shuffle=config.data.shuffle)
    self.rng = jax.random.key(config.seed)
    self.rollout_round = 0
    self.eval_history: list[dict[str, Any]] = []
    self.teacher_counts = np.zeros((max(len(self.teacher_names), 1),), np.int64)
    self.reward_pool = None
    if config.data.reward == "math_verify":
      self.reward_pool = rewards_lib.MathVerifyPool(num_workers=2)

  # ------------------------------------------------------------------------------------ setup

  def _encode_trace(self, text: str) -> list[int]:
    ids = self.tok.encode(text)
    if self.tok.eos_id is not None:
      ids = ids + [self.tok.eos_id]
    return ids

  def _init_state(self, params):
    """Optimizer state born sharded like the parameters; scalars replicated on every device.

    The moments' shardings come from propagation through `tx.init` (they are zeros_like of the
    sharded params); counters are pinned replicated, since a jitted init otherwise leaves them
    on one device, which a multi-process Orbax save refuses.
    """
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    probe = jax.jit(self.tx.init)(params)
    opt_shardings = jax.tree.map(lambda x: replicated if x.ndim == 0 else x.sharding, probe)
    del probe
    state_shardings = step_lib.TrainState(
        step=replicated, params=self.param_shardings, opt_state=opt_shardings,
        nonfinite_skipped=replicated)
    make = lambda p: step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                         opt_state=self.tx.init(p),
                                         nonfinite_skipped=jnp.zeros((), jnp.int32))
    state = jax.jit(make, out_shardings=state_shardings)(params)
    return state, state_shardings

  # ---------------------------------------------------------------------------------- rollout

  def _routing_on(self) -> bool:
    return self.method in _ROUTED and int(self.state.step) >= self.config.rl.switch_gate

  def _sft_phase(self) -> bool:
    if self.method == "sft":
      return True
    return (self.method == "sft_then_rl"
            and int(self.state.step) < self.config.rl.sft_then_rl_switch)

  def _pick_teachers(self, idx: list[int]) -> np.ndarray:
    num = np.array([len(self.teacher_tokens[i]) for i in idx], np.int32)
    key = jax.random.fold_in(jax.random.fold_in(self.rng, 2), self.rollout_round)
    return np.asarray(gating.pick_teacher(key, jnp.asarray(num)))

  def _hard_item(self, i: int, choice: int) -> queues_lib.HardItem:
    rec = self.pools["train"][i]
    name = rec.teachers[choice].teacher
    self.teacher_counts[self.teacher_index[name]] += 1
    return queues_lib.HardItem(
        uid=rec.uid, prompt_tokens=np.asarray(self.prompt_tokens[i], np.int32), teacher=name,
        teacher_index=int(choice),
        response_tokens=np.asarray(self.teacher_tokens[i][choice], np.int32),
        step=self.rollout_round)

  def sft_round(self, stats: _RoundStats) -> None:
    """SFT-only methods: queue teacher traces without sampling."""
    idx = self.stream.take(self.config.train.rollout_prompts)
    choices = self._pick_teachers(idx)
    for i, c in zip(idx, choices):
      if c < 0:
        stats.no_teacher += 1
      else:
        self.queues.push_hard(self._hard_item(i, int(c)))
    self.rollout_round += 1

  def rollout_round_(self, stats: _RoundStats) -> None:
    """Samples a group per prompt, scores, grades and queues (DYPO.md §1 steps 1-4)."""
    cfg, rl = self.config, self.config.rl
    idx = self.stream.take(cfg.train.rollout_prompts)
    luffy = self.method == "luffy"
    offpolicy_hard = self._routing_on() and rl.offline_loss_type == "rl"
    k = self.k - 1 if luffy else self.k
    start = time.perf_counter()
    key = jax.random.fold_in(jax.random.fold_in(self.rng, 1), self.rollout_round)
    out = self.sampler.sample(
        self.state.params, [self.prompt_tokens[i] for i in idx], num_samples=k,
        max_new_tokens=self.max_len, temperature=cfg.sampler.temperature,
        top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k, stop_ids=self.stop_ids, rng=key)
    stats.rollout_s += time.perf_counter() - start
    stats.tokens += int(out.lengths.sum())

    start = time.perf_counter()
    recs = [self.pools["train"][i] for i in idx]
    texts, flat_recs, finished = [], [], []
    for b, rec in enumerate(recs):
      for j in range(k):
        texts.append(evaluate_lib.decode_response(self.tok, out.tokens[b, j], out.lengths[b, j]))
        flat_recs.append(rec)
        finished.append(out.stop_reason[b, j] == sampler_lib.STOP_TOKEN)
    scores, rstats = rewards_lib.reward_batch(cfg.data.reward, flat_recs, texts,
                                              pool=self.reward_pool)
    stats.reward_errors += int(rstats.get("reward_errors", 0))
    rewards = scores.reshape(len(idx), k).astype(np.float32)
    penalty = np.array([rewards_lib.format_penalty(t, finished=f, coef=rl.format_penalty_coef)
                        for t, f in zip(texts, finished)], np.float32).reshape(len(idx), k)
    shaped = rewards + penalty
    stats.reward_s += time.perf_counter() - start
    grades = np.asarray(gating.grade(rewards))
    stats.rewards.append(rewards.ravel())
    stats.shaped.append(shaped.ravel())
    stats.grades.append(grades)
    stats.lengths.append(out.lengths.ravel())
    stats.truncated.append((out.stop_reason == sampler_lib.STOP_LENGTH).ravel())

    routing = self._routing_on()
    choices = self._pick_teachers(idx)
    for b, i in enumerate(idx):
      mid = lambda teacher=None, b=b, i=i: queues_lib.MidItem(
          uid=recs[b].uid, prompt_tokens=np.asarray(self.prompt_tokens[i], np.int32),
          response_tokens=out.tokens[b], response_lengths=out.lengths[b], rewards=rewards[b],
          shaped_rewards=shaped[b], logprobs=out.logprobs[b], step=self.rollout_round,
          teacher_tokens=(None if teacher is None
                          else np.asarray(self.teacher_tokens[i][teacher], np.int32)),
          teacher=None if teacher is None else recs[b].teachers[teacher].teacher)
      wants_teacher = luffy or (routing and grades[b] == gating.HARD) or (
          self.method == "sft_plus_rl")
      if wants_teacher and choices[b] < 0:
        stats.no_teacher += 1
        if routing:
          continue  # A Hard prompt without a teacher is counted and skipped, never mistrained.
      if routing:
        if grades[b] == gating.EASY:
          continue
        if grades[b] == gating.HARD:
          if offpolicy_hard:
            self.teacher_counts[self.teacher_index[recs[b].teachers[choices[b]].teacher]] += 1
            self.queues.push_mid(mid(int(choices[b])))
          else:
            self.queues.push_hard(self._hard_item(i, int(choices[b])))
          continue
        self.queues.push_mid(mid())
      elif luffy:
        if choices[b] >= 0:
          self.teacher_counts[self.teacher_index[recs[b].teachers[choices[b]].teacher]] += 1
        self.queues.push_mid(mid(int(choices[b]) if choices[b] >= 0 else None))
      elif self.method == "sft_plus_rl":
        if choices[b] >= 0:
          self.queues.push_hard(self._hard_item(i, int(choices[b])))
        self.queues.push_mid(mid())
      else:  # Plain GRPO (method grpo, sft_then_rl after SFT, or before switch_gate).
        self.queues.push_mid(mid())
    self.rollout_round += 1

  # ----------------------------------------------------------------------------------- update

  def build_batch(self, hard: list, mid: list) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Lays queued items out in the fixed [U, K, L] update batch (see train_step's docstring)."""
    u, k, p, t = self.config.train.update_prompts, self.k, self.prompt_len, self.max_len
    shapes = step_lib.batch_spec_shapes(items=u, k=k, prompt_len=p, max_len=t)
    batch = {name: np.zeros(shape, np.dtype(dtype)) for name, (shape, dtype) in shapes.items()}
    batch["tokens"][:] = self.pad_id
    batch["teacher_id"][:] = -1

    def put_row(slot, row, prompt, response, kind, old_logp=None):
      batch["tokens"][slot, row, :p] = _left_pad(prompt, p, self.pad_id)
      batch["tokens"][slot, row, p:p + len(response)] = response
      batch["input_mask"][slot, row, p - len(prompt):p + len(response)] = True
      batch["resp_mask"][slot, row, :len(response)] = 1.0
      batch["row_kind"][slot, row] = kind
      if old_logp is not None:
        batch["old_logp"][slot, row, :len(response)] = old_logp[:len(response)]

    slot = 0
    for item in hard:
      put_row(slot, 0, item.prompt_tokens, item.response_tokens, step_lib.ROW_TEACHER_SFT)
      batch["teacher_id"][slot] = self.teacher_index[item.teacher]
      slot += 1
    offline = 0
    for item in mid:
      rollouts = k - 1 if item.teacher_tokens is not None else k
      for j in range(rollouts):
        n = int(item.response_lengths[j])
        put_row(slot, j, item.prompt_tokens, item.response_tokens[j, :n], step_lib.ROW_ROLLOUT,
                item.logprobs[j])
      batch["rewards"][slot, :rollouts] = item.rewards[:rollouts]
      batch["adv_rewards"][slot, :rollouts] = item.shaped_rewards[:rollouts]
      if item.teacher_tokens is not None:
        put_row(slot, k - 1, item.prompt_tokens, item.teacher_tokens,
                step_lib.ROW_TEACHER_OFFPOLICY)
        batch["rewards"][slot, k - 1] = 1.0
        batch["adv_rewards"][slot, k - 1] = 1.0
        offline += 1
      slot += 1

    rl, n_h, n_m = self.config.rl, len(hard), len(mid)
    n = max(n_h + n_m, 1)
    if self._sft_phase():
      weights = (rl.sft_loss_coef, 0.0, 0.0)
    elif self._routing_on() or self.method == "sft_plus_rl":
      alpha = rl.alpha if self.step_cfg.use_gal else 1.0
      weights = (n_h / n * rl.sft_loss_coef, n_m / n * alpha, n_m / n * (1 - alpha))
    else:
      weights = (0.0, 1.0, 0.0)
    batch["weights"][:] = weights
    info = {"batch/offline_ratio": (n_h + offline) / n, "batch/hard_items": n_h,
            "batch/mid_items": n_m, "batch/weight_sft": weights[0],
            "batch/weight_grpo": weights[1], "batch/weight_gal": weights[2]}
    return batch, info

  def update(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    device_batch = {name: jax.device_put(value, self.batch_shardings[name])
                    for name, value in batch.items()}
    key = jax.random.fold_in(jax.random.fold_in(self.rng, 3), int(self.state.step))
    self.state, metrics = self.train_step(self.state, self.ref_params, device_batch, key)
    return metrics

  # --------------------------------------------------------------------------- eval and ckpt

  def evaluate(self) -> dict[str, float]:
    e, c = self.config.eval, self.config
    settings = evaluate_lib.EvalSettings(
        num_samples=e.num_samples, temperature=e.temperature, top_p=e.top_p,
        max_new_tokens=e.max_new_tokens, pass_ks=tuple(e.pass_ks), max_prompts=e.max_prompts,
        batch_prompts=min(32, e.max_prompts), reward=c.data.reward, template=c.tokenizer.template)
    result = {"step": int(self.state.step)}
    key = jax.random.fold_in(self.rng, 4)  # Same eval samples' randomness at every eval.
    for split in ("eval_id", "eval_ood"):
      recs = self.pools.get(split) or []
      if not recs:
        continue
      summary, _ = evaluate_lib.evaluate(sampler=self.sampler, params=self.state.params,
                                         tokenizer=self.tok, records=recs, settings=settings,
                                         rng=key, pool=self.reward_pool)
      prefix = "id" if split == "eval_id" else "ood"
      for name, value in summary.items():
        result[f"{prefix}/{name}"] = value
    self.eval_history.append(result)
    if self.is_main:
      with open(os.path.join(self.workdir, "eval.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    return result

  def checkpoint_state(self) -> dict[str, Any]:
    return {"train": self.state, "ref": self.ref_params,
            "rng": jax.random.key_data(self.rng)}

  def checkpoint_extras(self) -> dict[str, Any]:
    return {"stream": self.stream.state(), "rollout_round": self.rollout_round,
            "queues": base64.b64encode(self.queues.to_bytes()).decode("ascii"), "eval_history": self.eval_history,
            "teacher_counts": self.teacher_counts.tolist(), "config": self.config.to_json()}

  def restore(self, ckpt: "checkpoint_lib.Checkpointer") -> bool:
    step = ckpt.latest_step()
    if step is None:
      return False
    abstract = checkpoint_lib.abstract_like(self.checkpoint_state())
    state, extras = ckpt.restore(step, abstract_state=abstract)
    self.state, self.ref_params = state["train"], state["ref"]
    self.rng = jax.random.wrap_key_data(state["rng"])
    self.stream.restore(extras["stream"])
    self.rollout_round = int(extras["rollout_round"])
    self.queues = queues_lib.QueueSet.from_bytes(base64.b64decode(extras["queues"]),
                                                 source=f"checkpoint step {step}")
    self.eval_history = list(extras["eval_history"])
    self.teacher_counts = np.asarray(extras["teacher_counts"], np.int64)
    return True

  # ------------------------------------------------------------------------------------- loop

  def run(self, should_stop=None) -> dict[str, Any]:
    """The loop. `should_stop(trainer) -> bool`, checked after each update, ends it early
    (the base model's accuracy gate uses it)."""
    cfg, tr = self.config, self.config.train
    ckpt_dir = os.path.join(self.workdir, "checkpoints")
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=tr.keep_checkpoints)
    resumed = self.restore(ckpt)
    writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main)
    progress = metrics_lib.Progress(tr.num_steps, start_step=int(self.state.step))
    stop_requested = []
    checkpoint_lib.install_sigterm_handler(lambda: stop_requested.append(True))
    if self.is_main:
      print(f"train: method={self.method} k={self.k} P={self.prompt_len} T={self.max_len} "
            f"U={tr.update_prompts} teachers={self.teacher_names} "
            f"{'resumed at step ' + str(int(self.state.step)) if resumed else 'from scratch'}",
            flush=True)
    last_metrics: dict[str, Any] = {}
    if cfg.train.eval_every and int(self.state.step) == 0 and not resumed:
      self._log_eval(writer, self.evaluate())
    while int(self.state.step) < tr.num_steps and not stop_requested:
      step_start = time.perf_counter()
      stats = _RoundStats()
      rounds = 0
      while not self.queues.ready(tr.update_prompts) and rounds < tr.max_rollouts_per_update:
        if self._sft_phase():
          self.sft_round(stats)
        else:
          self.rollout_round_(stats)
        rounds += 1
      hard, mid, _ = self.queues.pop_batch(min(tr.update_prompts, len(self.queues)))
      if not hard and not mid:
        # Every prompt was Easy for max_rollouts_per_update rounds: nothing to learn from.
        self.state = self.state.replace(step=self.state.step + 1)
        metrics = {"train/empty_update": 1}
      else:
        batch, info = self.build_batch(hard, mid)
        update_start = time.perf_counter()
        metrics = self.update(batch)
        metrics = jax.device_get(metrics)
        update_s = time.perf_counter() - update_start
        metrics = self._host_metrics(metrics, info, update_s, batch)
      metrics.update(stats.metrics())
      metrics.update({"queue/hard": self.queues.depths()["hard"],
                      "queue/mid": self.queues.depths()["mid"],
                      "time/step_s": time.perf_counter() - step_start,
                      "train/compiles": self.step_trace_count})
      step = int(self.state.step)
      if metrics.get("train/nonfinite_skipped", 0) > tr.max_nonfinite_updates:
        ckpt.wait()
        raise FloatingPointError(
            f"{metrics['train/nonfinite_skipped']} updates had a non-finite loss or gradient "
            f"(limit train.max_nonfinite_updates={tr.max_nonfinite_updates}); stopping. The "
            f"last good checkpoint is kept in {ckpt_dir} (step {ckpt.latest_step()}).")
      if step % tr.log_every == 0 or step == tr.num_steps:
        writer.write(step, metrics)
        if self.is_main:
          print(progress.line(step, metrics, keys=(
              "reward/binary", "route/hard_frac", "route/mid_frac", "batch/offline_ratio",
              "loss/total", "policy/entropy")), flush=True)
      if tr.eval_every and step % tr.eval_every == 0:
        self._log_eval(writer, self.evaluate())
      if tr.checkpoint_every and step % tr.checkpoint_every == 0:
        ckpt.save(step, state=self.checkpoint_state(), extras=self.checkpoint_extras())
      last_metrics = metrics
      if should_stop is not None and should_stop(self):
        break
    step = int(self.state.step)
    if stop_requested or (tr.checkpoint_every and step % tr.checkpoint_every):
      ckpt.save(step, state=self.checkpoint_state(), extras=self.checkpoint_extras())
    ckpt.wait()
    ckpt.close()
    writer.close()
    if self.reward_pool is not None:
      self.reward_pool.close()
    return last_metrics

  def _log_eval(self, writer, result: dict[str, Any]) -> None:
    writer.write(result["step"], {f"eval/{k}": v for k, v in result.items() if k != "step"})
    if self.is_main:
      shown = {k: round(v, 4) for k, v in result.items()
               if k.endswith("pass@1") or k == "step"}
      print(f"eval: {shown}", flush=True)

  def _host_metrics(self, metrics, info, update_s, batch) -> dict[str, Any]:
    out = {}
    for name, value in metrics.items():
      if name in ("sft/teacher_nll_sum", "sft/teacher_tokens"):
        continue
      out[name] = float(np.asarray(value))
    nll = np.asarray(metrics["sft/teacher_nll_sum"])
    tokens = np.asarray(metrics["sft/teacher_tokens"])
    for i, name in enumerate(self.teacher_names):
      out[f"sft/teacher_{name}_count"] = int(self.teacher_counts[i])
      if tokens[i] > 0:
        out[f"sft/teacher_{name}_loss"] = float(nll[i] / tokens[i])
    out.update(info)
    out["time/update_s"] = update_s
    out["perf/update_tok_s"] = float(batch["input_mask"].sum()) / max(update_s, 1e-9)
    return out


def run(config: ml_collections.ConfigDict, *, workdir: str, mesh, tokenizer, model,
        pools) -> dict[str, Any]:
  """Builds the trainer and runs the loop; returns the last logged metrics."""
  return Trainer(config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, model=model,
                 pools=pools).run()
