"""Rollout rounds: sample a group per prompt, score it, grade it and queue it (METHOD.md §1).

Where each prompt goes is `routing.route`'s answer; this module only carries it out. Multi-process
runs: every process takes its own share of a round's prompts from its data shard, scores the
rollouts of its own prompts, and the indices and scores are all-gathered, so the graded items (and
the queues) are the same on every process.
"""
import dataclasses
import time

import jax
import numpy as np

from dypo_jax import errors
from dypo_jax.data import record_files
from dypo_jax.data import records as records_lib
from dypo_jax.data import tokenizers
from dypo_jax.evaluation import evaluate as evaluate_lib
from dypo_jax.evaluation import rewards as rewards_lib
from dypo_jax.models import sampler as sampler_lib
from dypo_jax.parallel import multihost
from dypo_jax.rl import grading
from dypo_jax.rl import queues as queues_lib
from dypo_jax.rl import routing

# What each key derived from the run's rng is for: fold_in(fold_in(rng, purpose), counter).
KEY_ROLLOUT, KEY_TEACHER, KEY_UPDATE, KEY_EVAL = 1, 2, 3, 4


@jax.jit
def derived_key(rng: jax.Array, purpose: int, counter: int) -> jax.Array:
  """One dispatch for the two fold_ins (two eager ones cost ~0.25 ms, several per step)."""
  return jax.random.fold_in(jax.random.fold_in(rng, purpose), counter)


@jax.jit
def _draw_teachers(rng: jax.Array, rollout_round: int, num_teachers: jax.Array) -> jax.Array:
  return grading.pick_teacher(derived_key(rng, KEY_TEACHER, rollout_round), num_teachers)


@dataclasses.dataclass
class RoundStats:
  """What the rollout rounds of one update saw."""
  rewards: list = dataclasses.field(default_factory=list)
  shaped: list = dataclasses.field(default_factory=list)
  grades: list = dataclasses.field(default_factory=list)
  lengths: list = dataclasses.field(default_factory=list)
  truncated: list = dataclasses.field(default_factory=list)
  tokens: int = 0
  rounds: int = 0
  empty_rounds: int = 0  # Rounds that queued nothing (every group Easy, or Hard with no teacher).
  rollout_s: float = 0.0
  reward_s: float = 0.0
  no_teacher: int = 0
  reward_timeouts: int = 0  # Verifier timeouts (scored 0; not wrong answers).
  reward_errors: int = 0  # Verifier crashes and unparseable golds (scored 0; not wrong answers).

  def metrics(self) -> dict[str, float]:
    out = {"rollout/rounds": self.rounds, "rollout/empty_rounds": self.empty_rounds,
           "rollout/groups": sum(len(g) for g in self.grades), "rollout/tokens": self.tokens,
           "sft/no_teacher_skipped": self.no_teacher}
    if not self.rewards:
      return out
    r, g = np.concatenate(self.rewards), np.concatenate(self.grades)
    lengths = np.concatenate(self.lengths)
    out.update({
        "reward/binary": float(r.mean()),
        "reward/shaped": float(np.concatenate(self.shaped).mean()),
        **{f"route/{name}": float(v) for name, v in grading.grade_fractions(g).items()},
        "response/len_mean": float(lengths.mean()), "response/len_max": float(lengths.max()),
        "response/truncated_frac": float(np.concatenate(self.truncated).mean()),
        "perf/rollout_tok_s": self.tokens / max(self.rollout_s, 1e-9),
        "time/rollout_s": self.rollout_s, "time/reward_s": self.reward_s,
        "reward/timeouts": self.reward_timeouts, "reward/errors": self.reward_errors,
    })
    return out


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  reward: str  # A name in rewards.REWARDS.
  format_penalty_coef: float


class TrainingPool:
  """The training records with their prompts and teacher traces encoded once."""

  def __init__(self, records: list[records_lib.PromptRecord], tokenizer: tokenizers.Tokenizer, *,
               template: str, max_len: int):
    self.records = records
    self.teacher_names = sorted({s.teacher for r in records for s in r.teachers})
    self.teacher_index = {n: i for i, n in enumerate(self.teacher_names)}
    self.prompt_tokens = [np.asarray(evaluate_lib.encode_prompt(tokenizer, r, template), np.int32)
                          for r in records]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    traces = [[tokenizer.encode(s.response) + eos for s in r.teachers] for r in records]
    self.truncated_teacher_traces = sum(len(t) > max_len for ts in traces for t in ts)
    self.teacher_tokens = [[np.asarray(t[:max_len], np.int32) for t in ts] for ts in traces]

  def __len__(self) -> int:
    return len(self.records)

  def longest_prompt(self) -> int:
    return max(len(p) for p in self.prompt_tokens)

  def too_long_error(self, limit: int, *, source: str, context: str) -> errors.BadInput:
    """The error for prompts over `limit` tokens, naming the first one's uid, file and line."""
    over = [i for i, p in enumerate(self.prompt_tokens) if len(p) > limit]
    first = self.records[over[0]]
    where = f" ({record_files.where_is(source, first.uid)})" if source else ""
    return errors.BadInput(
        f"{len(over)} training prompt(s) are longer than {limit} tokens; the first, uid "
        f"{first.uid!r}{where}, has {len(self.prompt_tokens[over[0]])}: {context}. Drop such "
        "prompts from the data, or raise model.max_seq_len or lower sampler.max_new_tokens")


class Rollouts:
  """Runs rollout rounds into a `QueueSet`, as the method's `routing.Policy` directs."""

  def __init__(self, *, pool: TrainingPool, policy: routing.Policy, sampler: sampler_lib.Sampler,
               tokenizer: tokenizers.Tokenizer, settings: SamplingSettings, k: int,
               reward_pool=None):
    self.pool, self.policy, self.sampler, self.tok = pool, policy, sampler, tokenizer
    self.settings, self.k, self.reward_pool = settings, k, reward_pool
    self.stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()

  def _hard_item(self, i: int, choice: int, rollout_round: int) -> queues_lib.HardItem:
    rec = self.pool.records[i]
    return queues_lib.HardItem(
        uid=rec.uid, prompt_tokens=self.pool.prompt_tokens[i],
        teacher=rec.teachers[choice].teacher, teacher_index=choice,
        response_tokens=self.pool.teacher_tokens[i][choice], step=rollout_round)

  def run_round(self, idx: list[int], *, params, step: int, rollout_round: int, rng: jax.Array,
                queues: queues_lib.QueueSet, teacher_counts: np.ndarray,
                stats: RoundStats) -> None:
    """One round over the training-pool prompts `idx` (the same list on every process);
    `teacher_counts` (traces drawn per teacher, the run's) is counted up in place."""
    num_teachers = np.array([len(self.pool.teacher_tokens[i]) for i in idx], np.int32)
    choices = np.asarray(_draw_teachers(rng, rollout_round, num_teachers))
    before = len(queues)
    if routing.samples(self.policy, step):
      grades, group = self._sample_and_score(idx, params=params, rollout_round=rollout_round,
                                             rng=rng, stats=stats)
    else:
      grades, group = [None] * len(idx), None
    for b, i in enumerate(idx):
      choice = int(choices[b])
      dest = routing.route(self.policy, step, grades[b], has_teacher=choice >= 0)
      stats.no_teacher += dest.no_teacher
      if dest.hard or dest.mid_teacher:
        teacher_counts[self.pool.teacher_index[
            self.pool.records[i].teachers[choice].teacher]] += 1
      if dest.hard:
        queues.push_hard(self._hard_item(i, choice, rollout_round))
      if dest.mid:
        queues.push_mid(self._mid_item(b, i, group, rollout_round,
                                       teacher=choice if dest.mid_teacher else None))
    stats.rounds += 1
    stats.empty_rounds += len(queues) == before

  def _mid_item(self, b: int, i: int, group, rollout_round: int,
                teacher: int | None) -> queues_lib.MidItem:
    out, rewards, shaped = group
    rec = self.pool.records[i]
    return queues_lib.MidItem(
        uid=rec.uid, prompt_tokens=self.pool.prompt_tokens[i], response_tokens=out.tokens[b],
        response_lengths=out.lengths[b], rewards=rewards[b], shaped_rewards=shaped[b],
        logprobs=out.logprobs[b], step=rollout_round,
        teacher_tokens=None if teacher is None else self.pool.teacher_tokens[i][teacher],
        teacher=None if teacher is None else rec.teachers[teacher].teacher)

  def _sample_and_score(self, idx, *, params, rollout_round, rng, stats: RoundStats):
    """Samples the round's groups, scores them (each process its own prompts' rows, gathered)
    and grades them on the binary reward. Returns ([B] grades, (sampler output, [B, K] binary
    rewards, [B, K] shaped rewards))."""
    s = self.settings
    k = routing.rollouts_per_group(self.policy, self.k)
    start = time.perf_counter()
    out = self.sampler.sample(
        params, [self.pool.prompt_tokens[i] for i in idx], num_samples=k,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
        top_k=s.top_k, stop_ids=self.stop_ids, rng=derived_key(rng, KEY_ROLLOUT, rollout_round))
    stats.rollout_s += time.perf_counter() - start
    stats.tokens += int(out.lengths.sum())

    start = time.perf_counter()
    n_local = len(idx) // jax.process_count()
    mine = range(jax.process_index() * n_local, (jax.process_index() + 1) * n_local)
    texts, recs, finished = [], [], []
    for b in mine:
      for j in range(k):
        texts.append(evaluate_lib.decode_response(self.tok, out.tokens[b, j], out.lengths[b, j]))
        recs.append(self.pool.records[idx[b]])
        finished.append(out.stop_reason[b, j] == sampler_lib.STOP_TOKEN)
    scores, reward_stats = rewards_lib.reward_batch(s.reward, recs, texts, pool=self.reward_pool)
    penalty = np.array([rewards_lib.format_penalty(t, finished=f, coef=s.format_penalty_coef)
                        for t, f in zip(texts, finished)], np.float32).reshape(n_local, k)
    scored = multihost.gather_rows(np.stack(
        [scores.reshape(n_local, k).astype(np.float32), penalty], axis=-1))  # [B, K, 2]
    rewards = scored[..., 0]
    shaped = rewards + scored[..., 1]
    faults = multihost.gather_rows(np.array(
        [[reward_stats["reward_timeouts"], reward_stats["reward_errors"]]], np.int32)).sum(axis=0)
    stats.reward_timeouts += int(faults[0])
    stats.reward_errors += int(faults[1])
    stats.reward_s += time.perf_counter() - start

    grades = np.asarray(grading.grade(rewards))
    stats.rewards.append(rewards.ravel())
    stats.shaped.append(shaped.ravel())
    stats.grades.append(grades)
    stats.lengths.append(out.lengths.ravel())
    stats.truncated.append((out.stop_reason == sampler_lib.STOP_LENGTH).ravel())
    return [int(g) for g in grades], (out, rewards, shaped)
