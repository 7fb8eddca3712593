"""The DYPO loop: rollout rounds -> update batch -> update -> metrics, with eval and checkpoints.

The loop only orchestrates. Where a group goes and how a batch is weighted is `routing`'s; rounds
are `rollout`'s; the batch layout `update_batch`'s; the jitted update `program`'s and
`train_step`'s. `step()` is one update and the only place its body is written: `run()` and the
benchmarks call it.

The Trainer holds the run's plan (config-derived values, the sampler, the compiled programs) and
one `RunState` (`run_state`: train state, reference params, queues, data position, rng,
counters, eval history). `run_checkpoint` saves that RunState whole every
`train.checkpoint_every` updates, at the end, and at the step boundary after a SIGTERM; a restart
from it continues the run exactly (every later step's metrics equal an uninterrupted run's, same
machine).

Multi-process (one controller per host): every process runs this loop in lockstep on the same
global arrays. Each reads its own shard of the training pool and scores its own prompts' rollouts
(`rollout`); the graded items, and so the queues and metrics, are the same on every process, and
process 0 logs them. A checkpoint holds the queues once and every process's data position.
"""
import functools
import json
import signal
import sys
import threading
import time
from typing import Any

from flax import nnx
import jax
import ml_collections
import numpy as np

from dypo_jax import errors
from dypo_jax.evaluation import evaluate as evaluate_lib
from dypo_jax.evaluation import verifier
from dypo_jax.io import checkpoint as checkpoint_lib
from dypo_jax.io import metrics as metrics_lib
from dypo_jax.io import paths
from dypo_jax.io import storage
from dypo_jax.models import sampler as sampler_lib
from dypo_jax.parallel import multihost
from dypo_jax.parallel import sharding
from dypo_jax.rl import program as program_lib
from dypo_jax.rl import rollout
from dypo_jax.rl import routing
from dypo_jax.rl import run_checkpoint
from dypo_jax.rl import run_state as run_state_lib
from dypo_jax.rl import update_batch

class Trainer:
  """Holds what the loop needs between updates."""

  def __init__(self, config: ml_collections.ConfigDict, *, workdir: str, mesh, tokenizer, model,
               pools: dict[str, list], allow_config_change: tuple[str, ...] = (), lock=None):
    self.config, self.workdir, self.mesh, self.tok, self.pools = (config, workdir, mesh,
                                                                  tokenizer, pools)
    self.lock = lock  # The workdir's `io.lock.WorkdirLock` (process 0's), checked before writes.
    self.allow_config_change = tuple(allow_config_change)  # Keys a resume may change.
    rl, tr, sp = config.rl, config.train, config.sampler
    self.policy = routing.Policy.from_config(rl)
    self.k, self.max_len = rl.num_samples, sp.max_new_tokens
    self.is_main = jax.process_index() == 0
    if tr.rollout_prompts % jax.process_count():
      raise errors.BadInput(f"train.rollout_prompts={tr.rollout_prompts} must be a multiple of the "
                           f"{jax.process_count()} processes (each samples an equal share of "
                           f"the prompts from its own data shard)")
    if tokenizer.pad_id is None:
      raise errors.BadInput("the tokenizer has neither a pad nor an eos token; dypo_jax needs one")
    self.pool = rollout.TrainingPool(pools["train"], tokenizer, template=config.tokenizer.template,
                                     max_len=self.max_len)
    rules = sharding.mesh_rules(config)
    self.graphdef, params = nnx.split(model, nnx.Param)
    # Rollouts run on the training mesh, or on their own data-parallel one (mesh.rollout_data).
    self.sampler = sampler_lib.Sampler(
        self.graphdef, model_config=model.config, pad_id=tokenizer.pad_id,
        prompt_buckets=tuple(sp.prompt_buckets), rows=sp.rows,
        mesh=sharding.build_rollout_mesh(config.mesh) or mesh, rules=rules)
    room = min(sp.prompt_buckets[-1], model.config.max_seq_len - self.max_len)
    if self.pool.longest_prompt() > room:
      raise self.pool.too_long_error(room, source=config.data.train_path, context=(
          f"sampler.prompt_buckets={tuple(sp.prompt_buckets)}, model.max_seq_len="
          f"{model.config.max_seq_len} and sampler.max_new_tokens={self.max_len} leave room "
          f"for {room}"))
    self.prompt_len = self.sampler.bucket_for(self.pool.longest_prompt(), self.max_len)
    self.program = program_lib.UpdateProgram.build(
        config, graphdef=self.graphdef, params=params, mesh=mesh, rules=rules,
        prompt_len=self.prompt_len, num_teachers=len(self.pool.teacher_names))
    self.run_state = run_state_lib.RunState.initial(
        train=self.program.init_state(params), params=params, pool_size=len(self.pool),
        seed=config.seed, shuffle=config.data.shuffle,
        num_teachers=len(self.pool.teacher_names))
    v = config.verifier
    self.reward_pool = (verifier.MathVerifyPool(v.workers, timeout=v.item_timeout_s,
                                                   batch_timeout=v.batch_timeout_s)
                        if config.data.reward == "math_verify" else None)
    self.rollouts = rollout.Rollouts(
        pool=self.pool, policy=self.policy, sampler=self.sampler, tokenizer=tokenizer, k=self.k,
        reward_pool=self.reward_pool, settings=rollout.SamplingSettings(
            max_new_tokens=self.max_len, temperature=sp.temperature, top_p=sp.top_p,
            top_k=sp.top_k, reward=config.data.reward,
            format_penalty_coef=rl.format_penalty_coef))
    self.update_trace_count = 0  # This process's compiles (not run state: a restart recompiles).
    self._updates = {}  # (shared_prompt, term_norms) -> the jitted update.
    self._compiled_shapes = set()  # Batch shapes whose every update variant is compiled.

  # ------------------------------------------------------------------------------ one update

  def step(self) -> dict[str, Any]:
    """One update: rollout rounds until a batch is queued (or the round limit), then the update.

    Returns the update's metrics as host values. With nothing queued after
    `train.max_rollouts_per_update` rounds the update is empty: the step counts, nothing trains.
    """
    tr, rs = self.config.train, self.run_state
    start = time.perf_counter()
    stats = rollout.RoundStats()
    items = routing.update_items(self.policy, tr.update_prompts)
    while not rs.queues.ready(items) and stats.rounds < tr.max_rollouts_per_update:
      self.run_rollout_round(stats)
    rounds_done = time.perf_counter()
    if len(rs.queues):
      hard, mid, _ = rs.queues.pop_batch(min(items, len(rs.queues)))
      batch, info = self.build_batch(hard, mid)
      update_start = time.perf_counter()
      metrics = self._host_metrics(jax.device_get(self.update(batch)))
      metrics.update(info)
      metrics["time/update_s"] = time.perf_counter() - update_start
      metrics["time/build_s"] = update_start - rounds_done
      metrics["perf/update_tok_s"] = float(batch["input_mask"].sum()) / metrics["time/update_s"]
      rs.empty_updates_in_a_row = 0
    else:
      rs.train = rs.train.replace(step=rs.train.step + 1)
      metrics = {"train/empty_update": 1}
      rs.empty_updates_in_a_row += 1
    rs.step += 1
    metrics.update(stats.metrics())
    metrics.update({"queue/hard": rs.queues.depths()["hard"],
                    "queue/mid": rs.queues.depths()["mid"], "train/compiles":
                    self.update_trace_count, "train/empty_updates_in_a_row":
                    rs.empty_updates_in_a_row, "time/rounds_s": rounds_done - start,
                    "time/step_s": time.perf_counter() - start})
    return metrics

  def run_rollout_round(self, stats: rollout.RoundStats) -> None:
    """One rollout round of the next `train.rollout_prompts` prompts into the queues."""
    idx, rs = self._take_prompts(self.config.train.rollout_prompts), self.run_state
    self.rollouts.run_round(idx, params=rs.train.params, step=rs.step,
                            rollout_round=rs.rollout_round, rng=rs.rng, queues=rs.queues,
                            teacher_counts=rs.teacher_counts, stats=stats)
    rs.rollout_round += 1

  def _take_prompts(self, n: int) -> list[int]:
    """The round's n prompts, the same list on every process: each takes n / process_count from
    its own shard, and process p's are rows [p * n_local, (p + 1) * n_local) of the round."""
    local = np.asarray(self.run_state.stream.take(n // jax.process_count()), np.int32)
    return [int(i) for i in multihost.gather_rows(local)]

  def build_batch(self, hard: list, mid: list) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The host update batch of queued items, weighted by `routing.loss_weights`."""
    batch, offline = update_batch.layout(
        hard, mid, slot_buckets=self.program.slot_buckets, k=self.k, prompt_len=self.prompt_len,
        max_len=self.max_len, pad_id=self.tok.pad_id, teacher_index=self.pool.teacher_index)
    weights = routing.loss_weights(self.policy, self.run_state.step, n_hard=len(hard),
                                   n_mid=len(mid))
    batch["weights"][:] = weights
    if self.program.packed:
      batch = self.program.pack(batch, share_prompts=self.config.train.shared_prompt)
    n = max(len(hard) + len(mid), 1)
    info = {"batch/offline_ratio": (len(hard) + offline) / n, "batch/hard_items": len(hard),
            "batch/mid_items": len(mid), **{f"batch/weight_{name}": w
                                            for name, w in zip(update_batch.TERMS, weights)}}
    if self.program.packed:
      info["batch/packed_rows"] = batch["pack_tokens"].shape[0]
    return batch, info

  def update_fn(self, *, shared_prompt: bool, term_norms: bool):
    """The jitted update for a batch variant, made once (`update_variants`)."""
    key = (shared_prompt and self.config.train.shared_prompt and not self.program.packed,
           term_norms and self.program.step_cfg.per_term_grad_norms)
    if key not in self._updates:
      self._updates[key] = self.program.jit(shared_prompt=key[0], term_norms=key[1],
                                            on_trace=self._count_trace)
    return self._updates[key]

  def _count_trace(self) -> None:
    self.update_trace_count += 1

  def update_variants(self) -> list[tuple[bool, bool]]:
    return routing.update_variants(
        self.policy, shared_prompt=self.config.train.shared_prompt and not self.program.packed,
        term_norms=self.program.step_cfg.per_term_grad_norms,
        every_update_logged=self.config.train.log_every == 1)

  def update(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs the jitted update on a host batch; returns its metrics (device values).

    Each process places only the shards its devices hold (a device_put of host data onto a
    multi-process sharding would first compare it across hosts). At a batch shape's first update
    every variant the run can take is compiled, so none compiles mid-run (seconds on CPU,
    minutes for a large TPU program).
    """
    shardings = self.program.batch_shardings
    device_batch = {name: jax.make_array_from_callback(value.shape, shardings[name],
                                                       lambda index, value=value: value[index])
                    for name, value in batch.items()}
    tr, rs = self.config.train, self.run_state
    key = rollout.derived_key(rs.rng, rollout.KEY_UPDATE, rs.step)
    logged = (rs.step + 1) % tr.log_every == 0 or rs.step + 1 == tr.num_steps
    # A packed batch's shape is its packed rows' too (a bucket compiles at its first batch).
    shape = (batch["tokens"].shape, batch["pack_tokens"].shape if "pack_tokens" in batch else None)
    if shape not in self._compiled_shapes:
      self._compiled_shapes.add(shape)
      for shared, norms in self.update_variants():
        self.update_fn(shared_prompt=shared, term_norms=norms).lower(
            rs.train, rs.ref_params, device_batch, key).compile()
    shared = update_batch.slots_share_prompts(batch, self.prompt_len)
    fn = self.update_fn(shared_prompt=shared and not self.program.packed,
                        term_norms=logged)
    rs.train, metrics = fn(rs.train, rs.ref_params, device_batch, key)
    return metrics

  def _host_metrics(self, metrics) -> dict[str, Any]:
    nll, tokens = metrics.pop("sft/teacher_nll_sum"), metrics.pop("sft/teacher_tokens")
    out = {name: float(np.asarray(value)) for name, value in metrics.items()}
    for i, name in enumerate(self.pool.teacher_names):
      out[f"sft/teacher_{name}_count"] = int(self.run_state.teacher_counts[i])
      if tokens[i] > 0:
        out[f"sft/teacher_{name}_loss"] = float(nll[i] / tokens[i])
    return out

  # ------------------------------------------------------------------------------ eval, ckpt

  def evaluate(self) -> dict[str, Any]:
    """pass@k on the held-out ID and OOD pools; the same sampling randomness at every eval."""
    c = self.config
    settings = evaluate_lib.settings_from_config(c.eval, reward=c.data.reward,
                                                 template=c.tokenizer.template)
    rs = self.run_state
    result = {"step": rs.step}
    key = jax.random.fold_in(rs.rng, rollout.KEY_EVAL)
    for split, prefix in (("eval_id", "id"), ("eval_ood", "ood")):
      if self.pools.get(split):
        summary, correct = evaluate_lib.evaluate(
            sampler=self.sampler, params=rs.train.params, tokenizer=self.tok,
            records=self.pools[split], settings=settings, rng=key, pool=self.reward_pool)
        result.update({f"{prefix}/{name}": value for name, value in summary.items()})
        by_source = evaluate_lib.pass_at_1_by_source(self.pools[split], correct)
        if len(by_source) > 1:  # A pool of several sets: each set's figure, not only the pool's.
          result.update({f"{prefix}/{source}/pass@1": v for source, v in by_source.items()})
    rs.eval_history.append(result)
    self._write_eval_history()
    return result

  def _write_eval_history(self) -> None:
    """workdir/eval.jsonl := the eval history (what a checkpoint holds), replaced atomically."""
    if self.is_main:
      paths.write_bytes(paths.join(self.workdir, "eval.jsonl"), "".join(
          json.dumps(r) + "\n" for r in self.run_state.eval_history).encode("utf-8"))

  # ------------------------------------------------------------------------------------ loop

  def run(self, should_stop=None) -> dict[str, Any]:
    """The loop; returns the last update's metrics. `should_stop(trainer)`, asked after each
    update, ends it early (the base model's accuracy gate uses it).

    Resumes from the latest checkpoint in `workdir/checkpoints`. After a SIGTERM or SIGINT it
    stops at the next step boundary, saves and raises `errors.Preempted`. Raises
    FloatingPointError after more than
    `train.max_nonfinite_updates` non-finite updates (the failing step is logged, not saved) and
    NothingToLearn after `train.max_empty_updates` empty updates in a row (saved first).
    """
    tr, rs = self.config.train, self.run_state
    ckpt_dir = run_checkpoint.checkpoint_dir(self.workdir)
    storage.bound_client_retries(tr.storage_retry_s)
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=tr.keep_checkpoints)
    writer, stop_requested, previous_handlers = None, [], {}
    if threading.current_thread() is threading.main_thread():
      previous_handlers = checkpoint_lib.install_stop_handlers(
          lambda: stop_requested.append(True))
    try:
      restored = run_checkpoint.restore(ckpt, rs, config=self.config,
                                        allow_config_change=self.allow_config_change,
                                        storage_retry_s=tr.storage_retry_s)
      if resumed := restored is not None:
        self.run_state = rs = restored
        if rs.eval_history:
          self._write_eval_history()
      writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main)
      progress = metrics_lib.Progress(max(tr.num_steps, 1), start_step=rs.step)
      if self.is_main:
        print(f"train: method={self.policy.method} k={self.k} P={self.prompt_len} "
              f"T={self.max_len} U={tr.update_prompts} teachers={self.pool.teacher_names} "
              f"processes={jax.process_count()} "
              f"{f'resumed at step {rs.step}' if resumed else 'from scratch'}",
              flush=True)
      if tr.eval_every and rs.step == 0 and not resumed:
        self._log_eval(writer, self.evaluate())
      metrics, stopped = {}, False
      save = lambda: run_checkpoint.save(ckpt, rs, config=self.config,
                                         model_config=self.sampler.config, writer=writer,
                                         fence=self.check_lock)
      while rs.step < tr.num_steps:
        if multihost.any_process(bool(stop_requested)):  # Every process stops at one step.
          stopped = True
          break
        metrics = self.step()
        ckpt.wait_saved()  # The save started after the last step failed? Said now, naming it.
        self.check_lock()  # Before this step's first write.
        step = rs.step
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
          save()
        if rs.empty_updates_in_a_row >= tr.max_empty_updates:
          break
        if should_stop is not None and should_stop(self):
          break
      stopped = stopped or multihost.any_process(bool(stop_requested))
      nothing_left = rs.empty_updates_in_a_row >= tr.max_empty_updates
      if stopped or nothing_left or (tr.checkpoint_every and rs.step % tr.checkpoint_every):
        save()
      ckpt.wait_saved()
      if nothing_left:
        raise errors.NothingToLearn(
            f"the last {rs.empty_updates_in_a_row} updates found nothing queued (each after "
            f"train.max_rollouts_per_update={tr.max_rollouts_per_update} rollout rounds in which "
            f"every prompt was Easy, or Hard with no teacher trace): nothing left to learn at "
            f"this difficulty; stopped at step {rs.step} (limit "
            f"train.max_empty_updates={tr.max_empty_updates}); checkpoint "
            f"{ckpt.step_dir(rs.step)}")
      if stopped:
        raise errors.Preempted(f"SIGTERM/SIGINT: stopped at step {rs.step}; checkpoint "
                               f"{ckpt.step_dir(rs.step)}; rerun the same command to "
                               f"resume")
      return metrics
    except Exception as e:  # A run that lost its lock: that is why, whatever failed after.
      lost = self.lock.lost() if self.lock is not None else None
      if lost is None or isinstance(e, errors.LockLost):
        raise
      raise lost from e
    finally:
      # ckpt.close waits for a pending save; a failing store must not hide what stopped the run.
      failing = sys.exc_info()[1]
      storage.close_after(failing, ckpt.close, writer and functools.partial(
          writer.close, sync=not isinstance(failing, errors.LockLost)))
      if self.reward_pool is not None:
        self.reward_pool.close()
      for sig, handler in previous_handlers.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

  def check_lock(self) -> None:
    """errors.LockLost on every process once process 0's workdir lock names another run."""
    lost = self.lock.lost() if self.lock is not None else None
    if multihost.any_process(lost is not None):
      raise lost or errors.LockLost("process 0 lost the workdir lock to another run; stopped "
                                    "before the next write")

  def _log_eval(self, writer, result: dict[str, Any]) -> None:
    writer.write(result["step"], {f"eval/{k}": v for k, v in result.items() if k != "step"})
    if self.is_main:
      shown = {k: round(v, 4) for k, v in result.items() if k.endswith("pass@1") or k == "step"}
      print(f"eval: {shown}", flush=True)
