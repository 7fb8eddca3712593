"""The DYPO loop: rollout -> reward -> grade -> queue -> update -> log -> eval -> checkpoint.

The loop only orchestrates; the maths are in `losses`, `gating` and `train_step`. Everything a
restart needs (train state, reference params, rng, data position, queues, eval history, counters,
the config) is saved together in one Orbax checkpoint, every `train.checkpoint_every` steps, at the
end, and at the step boundary after a SIGTERM. A restart from it continues the run exactly: the
metrics of every later step equal an uninterrupted run's (same machine).

Multi-process (one controller per host, `jax.distributed`): every process runs this loop in
lockstep on the same global arrays (params, optimizer state, update batch: global `jax.Array`s on
the global mesh). What is per process:
  * the data: each process reads its own shard of the training pool (`PromptStream`) and takes
    rollout_prompts / process_count prompts per round; the round's global prompt list is the
    processes' lists concatenated in process order (an all-gather of indices);
  * rewards: process p scores the rollouts of its own prompts (rows of the sampler's replicated
    output), and the scores are all-gathered;
  * device transfers: each process puts only the shards of the update batch its devices hold.
The graded items, and so the Hard and Mid queues, are the same on every process, so an update
batch holds the U oldest items of the whole job in arrival order, as with one process, and the
metrics (global means) are identical on every process; process 0 logs them. A checkpoint holds
the queues once and every process's data position (`extras["streams"][p]`).
"""
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dypo_jax import checkpoint as checkpoint_lib
from dypo_jax import evaluate as evaluate_lib
from dypo_jax import fileio
from dypo_jax import gating
from dypo_jax import metrics as metrics_lib
from dypo_jax import multihost
from dypo_jax import queues as queues_lib
from dypo_jax import rewards as rewards_lib
from dypo_jax import runtime
from dypo_jax import sampler as sampler_lib
from dypo_jax import sharding
from dypo_jax import train_step as step_lib
from dypo_jax.data import pipeline as pipeline_lib
from dypo_jax.data import records as records_lib

# Methods whose rollouts are graded and routed (after rl.switch_gate).
_ROUTED = ("dypo",)
# Version of what `Trainer.checkpoint_extras` writes (read by `restore` and `dypo_jax.export`).
CHECKPOINT_FORMAT = 1

# What each derived key is for: fold_in(rng, purpose), then fold_in(that, counter).
_KEY_ROLLOUT, _KEY_TEACHER, _KEY_UPDATE = 1, 2, 3


@jax.jit
def _derived_key(rng: jax.Array, purpose: int, counter: int) -> jax.Array:
  """fold_in(fold_in(rng, purpose), counter) as one dispatch: two eager fold_ins cost ~0.25 ms,
  a few per step."""
  return jax.random.fold_in(jax.random.fold_in(rng, purpose), counter)


@jax.jit
def _draw_teachers(rng: jax.Array, rollout_round: int, num_teachers: jax.Array) -> jax.Array:
  return gating.pick_teacher(_derived_key(rng, _KEY_TEACHER, rollout_round), num_teachers)


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
    self.rules = runtime.mesh_rules(config)
    self.is_main = jax.process_index() == 0
    self.num_processes, self.process_index = jax.process_count(), jax.process_index()
    if tr.rollout_prompts % self.num_processes:
      raise ValueError(f"train.rollout_prompts={tr.rollout_prompts} must be a multiple of the "
                       f"{self.num_processes} processes (each samples an equal share of the "
                       f"prompts from its own data shard)")
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
    self.model_config = model.config
    # Rollouts run on the training mesh, or on their own data-parallel one (mesh.rollout_data):
    # the sampler copies the parameters onto its mesh at each call.
    self.sampler = sampler_lib.Sampler(
        self.graphdef, model_config=model.config, pad_id=self.pad_id,
        prompt_buckets=tuple(sp.prompt_buckets),
        mesh=runtime.build_rollout_mesh(config.mesh) or mesh, rules=self.rules)
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

    split = dict(micro_batches=tr.micro_batches, k=self.k,
                 batch_shards=sharding.batch_shards(mesh, self.rules))
    error = step_lib.micro_batch_error(items=tr.update_prompts, **split)
    if error:
      raise ValueError(error)
    step_cfg = step_config(config, prompt_len=self.prompt_len,
                           num_teachers=len(self.teacher_names))
    self.step_cfg = step_cfg
    # Update batches come in up to three slot counts (a quarter, half or all of update_prompts,
    # rounded up to what micro-batches and batch shards divide), so packed Hard items need not
    # fill a batch sized for Mid groups; each size compiles once.
    self.slot_buckets = step_lib.slot_buckets(update_prompts=tr.update_prompts, **split)
    shapes = step_lib.batch_spec_shapes(items=tr.update_prompts, k=self.k,
                                        prompt_len=self.prompt_len, max_len=self.max_len)
    self.batch_shardings = {
        name: (sharding.batch_sharding(mesh, self.rules, len(shape)) if name != "weights"
               else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        for name, (shape, _) in shapes.items()}
    self.step_trace_count = 0
    self._steps = {}  # (shared_prompt, per_term_grad_norms) -> the jitted update.
    self._compiled_shapes = set()  # Batch shapes whose every update variant is compiled.

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
    """Optimizer state born sharded like the parameters; the rest replicated on every device.

    Each parameter-shaped leaf of the optimizer state (Adam's moments) takes its parameter's
    sharding (`optax.tree_utils.tree_map_params`); counters are pinned replicated. Propagation
    through a jitted `tx.init` is not enough: it leaves the counters, and the moments of
    replicated parameters, on one device, which a multi-device jit and Orbax refuse.
    """
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_utils.tree_map_params(
        self.tx, lambda _, sharding: sharding, jax.eval_shape(self.tx.init, params),
        self.param_shardings, transform_non_params=lambda _: replicated)
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

  def _take_prompts(self, n: int) -> list[int]:
    """The round's n prompts (training-pool indices): the same list on every process.

    Each process takes n / process_count indices from its own shard; the list is their
    concatenation in process order, so process p's prompts are rows [p * n_local, (p + 1) *
    n_local) of the round (the rows it scores).
    """
    local = np.asarray(self.stream.take(n // self.num_processes), np.int32)
    return [int(i) for i in multihost.gather_rows(local)]

  def _pick_teachers(self, idx: list[int]) -> np.ndarray:
    num = np.array([len(self.teacher_tokens[i]) for i in idx], np.int32)
    return np.asarray(_draw_teachers(self.rng, self.rollout_round, num))

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
    idx = self._take_prompts(self.config.train.rollout_prompts)
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
    idx = self._take_prompts(cfg.train.rollout_prompts)
    luffy = self.method == "luffy"
    offpolicy_hard = self._routing_on() and rl.offline_loss_type == "rl"
    k = self.k - 1 if luffy else self.k
    start = time.perf_counter()
    key = _derived_key(self.rng, _KEY_ROLLOUT, self.rollout_round)
    out = self.sampler.sample(
        self.state.params, [self.prompt_tokens[i] for i in idx], num_samples=k,
        max_new_tokens=self.max_len, temperature=cfg.sampler.temperature,
        top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k, stop_ids=self.stop_ids, rng=key)
    stats.rollout_s += time.perf_counter() - start
    stats.tokens += int(out.lengths.sum())

    start = time.perf_counter()
    recs = [self.pools["train"][i] for i in idx]
    # Each process scores the rollouts of its own prompts (rows `mine`); the scores are gathered.
    n_local = len(idx) // self.num_processes
    mine = range(self.process_index * n_local, (self.process_index + 1) * n_local)
    texts, flat_recs, finished = [], [], []
    for b in mine:
      for j in range(k):
        texts.append(evaluate_lib.decode_response(self.tok, out.tokens[b, j], out.lengths[b, j]))
        flat_recs.append(recs[b])
        finished.append(out.stop_reason[b, j] == sampler_lib.STOP_TOKEN)
    scores, rstats = rewards_lib.reward_batch(cfg.data.reward, flat_recs, texts,
                                              pool=self.reward_pool)
    coef = rl.format_penalty_coef  # A ConfigDict lookup costs microseconds: once, not per text.
    penalty = np.array([rewards_lib.format_penalty(t, finished=f, coef=coef)
                        for t, f in zip(texts, finished)], np.float32).reshape(n_local, k)
    scored = multihost.gather_rows(np.stack([scores.reshape(n_local, k).astype(np.float32), penalty],
                                   axis=-1))  # [B, K, 2]
    rewards, penalty = scored[..., 0], scored[..., 1]
    stats.reward_errors += int(multihost.gather_rows(
        np.array([int(rstats.get("reward_errors", 0))], np.int32)).sum())
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
    """Lays queued items out in a [U, K, L] update batch (see train_step's docstring).

    Hard items are packed K to a slot; U is the smallest slot bucket that holds the batch.
    """
    batch, offline = step_lib.layout_batch(
        hard, mid, slot_buckets=self.slot_buckets, k=self.k, prompt_len=self.prompt_len,
        max_len=self.max_len, pad_id=self.pad_id, teacher_index=self.teacher_index)
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

  def step_for(self, *, shared_prompt: bool, term_norms: bool):
    """The jitted update for a batch, compiled on first use.

    A batch of groups alone (no packed Hard slot) runs each prompt once
    (`StepConfig.shared_prompt`, when `train.shared_prompt` allows it). The per-term gradient
    norms cost a backward pass per loss term, so only updates that are logged compute them.
    """
    cfg = dataclasses.replace(
        self.step_cfg, shared_prompt=shared_prompt and self.config.train.shared_prompt,
        per_term_grad_norms=term_norms and self.step_cfg.per_term_grad_norms)
    key = (cfg.shared_prompt, cfg.per_term_grad_norms)
    if key not in self._steps:
      step_fn = step_lib.build_train_step(self.graphdef, cfg, self.tx, self.schedule)

      def counted_step(*args):
        self.step_trace_count += 1
        return step_fn(*args)

      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._steps[key] = jax.jit(
          counted_step, donate_argnums=(0,),
          in_shardings=(self.state_shardings, self.param_shardings, self.batch_shardings,
                        replicated),
          out_shardings=(self.state_shardings, replicated))
    return self._steps[key]

  def update_variants(self) -> list[tuple[bool, bool]]:
    """The (shared_prompt, term_norms) update variants that this run's batches can take.

    The row path serves batches with a packed Hard slot, so only methods that queue Hard items
    need it beside the shared one; the per-term-norm variant serves logged updates.
    """
    if not self.config.train.shared_prompt or self.method == "sft":
      paths = (False,)
    elif self.method in ("sft_then_rl", "sft_plus_rl") or (
        self.method in _ROUTED and self.config.rl.offline_loss_type != "rl"):
      paths = (True, False)
    else:
      paths = (True,)
    if not self.step_cfg.per_term_grad_norms:
      norms = (False,)
    elif self.config.train.log_every == 1:
      norms = (True,)
    else:
      norms = (False, True)
    return [(path, norm) for path in paths for norm in norms]

  def _compile_variants(self, device_batch, key) -> None:
    """At the first update of a batch shape, compiles every variant the run can take.

    A run's first batch with a packed Hard slot (or its first logged update) would otherwise
    compile mid-run, a stall of seconds on CPU and minutes on a large TPU program. Lowering and
    compiling ahead fills the jit's caches: the later first call neither traces nor compiles.
    """
    shape = device_batch["tokens"].shape
    if shape not in self._compiled_shapes:
      self._compiled_shapes.add(shape)
      for shared, norms in self.update_variants():
        self.step_for(shared_prompt=shared, term_norms=norms).lower(
            self.state, self.ref_params, device_batch, key).compile()

  def update(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    # Every process holds the whole host batch and places only the shards its devices hold (a
    # device_put of host data onto a multi-process sharding would first compare it across hosts).
    device_batch = {
        name: jax.make_array_from_callback(value.shape, self.batch_shardings[name],
                                           lambda index, value=value: value[index])
        for name, value in batch.items()}
    step = int(self.state.step)
    key = _derived_key(self.rng, _KEY_UPDATE, step)
    logged = (step + 1) % self.config.train.log_every == 0 or step + 1 == self.config.train.num_steps
    self._compile_variants(device_batch, key)
    fn = self.step_for(shared_prompt=step_lib.slots_share_prompts(batch, self.prompt_len),
                       term_norms=logged)
    self.state, metrics = fn(self.state, self.ref_params, device_batch, key)
    return metrics

  # --------------------------------------------------------------------------- eval and ckpt

  def evaluate(self) -> dict[str, float]:
    e, c = self.config.eval, self.config
    settings = evaluate_lib.settings_from_config(e, reward=c.data.reward,
                                                 template=c.tokenizer.template)
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
    self._write_eval_history()
    return result

  def _write_eval_history(self) -> None:
    """workdir/eval.jsonl := the eval history (what a checkpoint holds), replaced atomically: a
    kill leaves no partial line, a restart from a checkpoint no evaluation of a lost step."""
    if not self.is_main:
      return
    fileio.atomic_write_bytes(os.path.join(self.workdir, "eval.jsonl"), "".join(
        json.dumps(r) + "\n" for r in self.eval_history).encode("utf-8"))

  def checkpoint_state(self) -> dict[str, Any]:
    """The arrays of a checkpoint: the train state (policy params, optimizer state, step, skip
    counter) and the frozen reference params (global arrays; restored onto any mesh)."""
    return {"train": self.state, "ref": self.ref_params}

  def checkpoint_extras(self) -> dict[str, Any]:
    """The JSON part of a checkpoint. Collective: every process calls it, since each process's
    position in its own data shard is gathered (`streams[p]` is process p's)."""
    return {"format": CHECKPOINT_FORMAT, "process_count": self.num_processes,
            "streams": multihost.gather_json(self.stream.state()), "rollout_round": self.rollout_round,
            "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
            "eval_history": self.eval_history, "teacher_counts": self.teacher_counts.tolist(),
            "config": self.config.to_json(),
            "model_config": dataclasses.asdict(self.model_config)}

  def save_checkpoint(self, ckpt: "checkpoint_lib.Checkpointer", step: int) -> bool:
    """Saves `step` with the queues (collective; asynchronous; a saved step is never rewritten)."""
    return ckpt.save(step, state=self.checkpoint_state(), extras=self.checkpoint_extras(),
                     queues=self.queues.to_bytes())

  def restore(self, ckpt: "checkpoint_lib.Checkpointer") -> bool:
    """Restores the latest finalised checkpoint, if any, resharded onto this trainer's mesh."""
    step = ckpt.latest_step()
    if step is None:
      return False
    where = f"checkpoint {ckpt.step_dir(step)}"
    abstract = checkpoint_lib.abstract_like(self.checkpoint_state())
    state, extras = ckpt.restore(step, abstract_state=abstract)
    if extras.get("format") != CHECKPOINT_FORMAT:
      raise ValueError(f"{where}: extras format {extras.get('format')!r}; this trainer reads "
                       f"format {CHECKPOINT_FORMAT}")
    streams = extras["streams"]
    if extras["process_count"] != self.num_processes or len(streams) != self.num_processes:
      raise ValueError(
          f"{where} was written by {extras['process_count']} processes and this run has "
          f"{self.num_processes}: each process's position in its own data shard cannot be carried "
          f"over; resume with {extras['process_count']} processes (the mesh shape may differ)")
    queue_bytes = ckpt.restore_queues(step)
    if queue_bytes is None:
      raise ValueError(f"{where} has no 'queues' item")
    self.state, self.ref_params = state["train"], state["ref"]
    self.rng = jax.random.wrap_key_data(np.asarray(extras["rng"], np.uint32))
    self.stream.restore(streams[self.process_index])
    self.rollout_round = int(extras["rollout_round"])
    self.queues = queues_lib.QueueSet.from_bytes(queue_bytes, source=f"{where} item 'queues'")
    self.eval_history = list(extras["eval_history"])
    self.teacher_counts = np.asarray(extras["teacher_counts"], np.int64)
    if self.eval_history:
      self._write_eval_history()
    return True

  # ------------------------------------------------------------------------------------- loop

  def run(self, should_stop=None) -> dict[str, Any]:
    """The loop. `should_stop(trainer) -> bool`, checked after each update, ends it early
    (the base model's accuracy gate uses it).

    Resumes from the latest checkpoint in `workdir/checkpoints` if there is one. After a SIGTERM
    the loop stops at the next step boundary, saves and returns. More non-finite updates than
    `train.max_nonfinite_updates` raise FloatingPointError (the failing step is logged, not
    saved). In a multi-process run every process calls this, and they move in lockstep.
    """
    cfg, tr = self.config, self.config.train
    ckpt_dir = os.path.join(self.workdir, "checkpoints")
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=tr.keep_checkpoints)
    writer = None
    stop_requested = []
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
      previous_handler = checkpoint_lib.install_sigterm_handler(
          lambda: stop_requested.append(True)) or signal.SIG_DFL
    try:
      resumed = self.restore(ckpt)
      writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main)
      progress = metrics_lib.Progress(max(tr.num_steps, 1), start_step=int(self.state.step))
      if self.is_main:
        print(f"train: method={self.method} k={self.k} P={self.prompt_len} T={self.max_len} "
              f"U={tr.update_prompts} teachers={self.teacher_names} processes="
              f"{self.num_processes} "
              f"{'resumed at step ' + str(int(self.state.step)) if resumed else 'from scratch'}",
              flush=True)
      last_metrics: dict[str, Any] = {}
      if cfg.train.eval_every and int(self.state.step) == 0 and not resumed:
        self._log_eval(writer, self.evaluate())
      stopped = False
      while int(self.state.step) < tr.num_steps:
        if multihost.any_process(bool(stop_requested)):  # Every process stops at the same step.
          stopped = True
          break
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
        too_many_nonfinite = metrics.get("train/nonfinite_skipped", 0) > tr.max_nonfinite_updates
        if step % tr.log_every == 0 or step == tr.num_steps or too_many_nonfinite:
          writer.write(step, metrics)
          if self.is_main:
            print(progress.line(step, metrics, keys=(
                "reward/binary", "route/hard_frac", "route/mid_frac", "batch/offline_ratio",
                "loss/total", "policy/entropy")), flush=True)
        if too_many_nonfinite:
          ckpt.wait()
          raise FloatingPointError(
              f"{int(metrics['train/nonfinite_skipped'])} updates had a non-finite loss or "
              f"gradient (limit train.max_nonfinite_updates={tr.max_nonfinite_updates}); stopping "
              f"at step {step}. The last good checkpoint is kept in {ckpt_dir} (step "
              f"{ckpt.latest_step()}).")
        if tr.eval_every and step % tr.eval_every == 0:
          self._log_eval(writer, self.evaluate())
        if tr.checkpoint_every and step % tr.checkpoint_every == 0:
          self.save_checkpoint(ckpt, step)
        last_metrics = metrics
        if should_stop is not None and should_stop(self):
          break
      step = int(self.state.step)
      stopped = stopped or multihost.any_process(bool(stop_requested))
      if stopped or (tr.checkpoint_every and step % tr.checkpoint_every):
        self.save_checkpoint(ckpt, step)
      ckpt.wait()
      if stopped and self.is_main:
        print(f"train: SIGTERM: stopped at step {step}; checkpoint {ckpt.step_dir(step)}",
              flush=True)
      return last_metrics
    finally:
      ckpt.close()  # Waits for a pending save.
      if writer is not None:
        writer.close()
      if self.reward_pool is not None:
        self.reward_pool.close()
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)

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


def step_config(config: ml_collections.ConfigDict, *, prompt_len: int,
                num_teachers: int) -> step_lib.StepConfig:
  """The plain values the update step needs, read from the config once."""
  rl, tr, sp = config.rl, config.train, config.sampler
  return step_lib.StepConfig(
      prompt_len=prompt_len, temperature=max(sp.temperature, 1e-6),
      clip_low=rl.clip_low, clip_high=rl.clip_high, kl_coef=rl.kl_coef,
      kl_estimator=rl.kl_estimator, agg_mode=rl.agg_mode, max_len=sp.max_new_tokens,
      scale_adv_by_std=rl.scale_adv_by_std, adv_eps=rl.adv_eps, beta_gal=rl.beta_gal,
      gal_length_norm=rl.gal_length_norm, offpolicy_shaping=rl.offpolicy_shaping,
      micro_batches=tr.micro_batches, num_teachers=max(num_teachers, 1),
      logprob_impl=config.model.logprob_impl, vocab_chunk=config.model.vocab_chunk,
      pallas_interpret=config.model.pallas_interpret,
      use_gal=rl.method in _ROUTED and rl.alpha < 1.0,
      per_term_grad_norms=tr.per_term_grad_norms)


def run(config: ml_collections.ConfigDict, *, workdir: str, mesh, tokenizer, model,
        pools) -> dict[str, Any]:
  """Builds the trainer and runs the loop; returns the last logged metrics."""
  return Trainer(config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, model=model,
                 pools=pools).run()
