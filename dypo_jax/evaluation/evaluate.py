"""Evaluation: n samples per prompt at the eval temperature, pass@1 (mean over n) and pass@k."""
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from dypo_jax import errors
from dypo_jax.data import records as records_lib
from dypo_jax.data import templates
from dypo_jax.data import tokenizers
from dypo_jax.evaluation import passk
from dypo_jax.evaluation import rewards as rewards_lib
from dypo_jax.models import sampler as sampler_lib


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  num_samples: int
  temperature: float
  top_p: float
  max_new_tokens: int
  pass_ks: tuple[int, ...]
  max_prompts: int
  batch_prompts: int = 32
  reward: str = "exact_match"
  template: str = "plain"


class PromptTooLongError(errors.BadInput):
  """A record's prompt leaves no room in the model's context for the response."""


def settings_from_config(eval_cfg, *, reward: str, template: str, **overrides) -> EvalSettings:
  """EvalSettings from a config's `eval` section; `overrides` replace its fields by name. pass@k
  values above num_samples are dropped unless `pass_ks` is given, and then checked."""
  values = {k: eval_cfg[k] for k in ("num_samples", "temperature", "top_p", "max_new_tokens",
                                     "max_prompts")}
  values.update({k: v for k, v in overrides.items() if k != "pass_ks"})
  n = values["num_samples"]
  pass_ks = tuple(overrides.get("pass_ks") or
                  (tuple(k for k in eval_cfg.pass_ks if k <= n) or (1,)))
  if n < 1 or any(k < 1 or k > n for k in pass_ks):
    raise ValueError(f"pass_ks={pass_ks}: each k must lie in [1, num_samples={n}]")
  return EvalSettings(**values, pass_ks=pass_ks, batch_prompts=min(32, values["max_prompts"]),
                      reward=reward, template=template)


def encode_prompt(tokenizer: tokenizers.Tokenizer, record: records_lib.PromptRecord,
                  template: str) -> list[int]:
  """The prompt's token ids with the template applied (bos first where the tokenizer has one)."""
  text = templates.apply_template(template, record.prompt)
  return tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)


def decode_response(tokenizer: tokenizers.Tokenizer, tokens: np.ndarray, length: int) -> str:
  """The response text. Ids past the tokenizer's vocabulary (a model's embedding is often padded
  beyond it) have no text and are dropped; the reward sees what remains."""
  ids = np.asarray(tokens[:length])
  return tokenizer.decode(ids[ids < tokenizer.vocab_size])


def evaluate(*, sampler: sampler_lib.Sampler, params, tokenizer: tokenizers.Tokenizer,
             records: Sequence[records_lib.PromptRecord], settings: EvalSettings,
             rng: jax.Array, pool=None) -> tuple[dict[str, float], np.ndarray]:
  """Samples each record `num_samples` times; returns ({pass@k, ...}, correct [P, n] bool)."""
  records = list(records)[:settings.max_prompts]
  if not records:
    return {}, np.zeros((0, settings.num_samples), bool)
  stop_ids = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
  # Checked for every record before anything is sampled, so the error names the record.
  room = sampler.config.max_seq_len - settings.max_new_tokens
  encoded = [encode_prompt(tokenizer, r, settings.template) for r in records]
  for i, (rec, prompt) in enumerate(zip(records, encoded)):
    if len(prompt) > room:
      raise PromptTooLongError(
          f"record {i} ({rec.uid!r}) has a {len(prompt)}-token prompt; the model's context "
          f"(max_seq_len={sampler.config.max_seq_len}) leaves {room} tokens for prompts at "
          f"max_new_tokens={settings.max_new_tokens}")
  correct = []
  lengths = []
  for start in range(0, len(records), settings.batch_prompts):
    chunk = records[start:start + settings.batch_prompts]
    # A fixed batch size keeps one compiled program: pad the last chunk with copies.
    prompts = encoded[start:start + len(chunk)]
    prompts += [prompts[-1]] * (settings.batch_prompts - len(chunk))
    out = sampler.sample(params, prompts, num_samples=settings.num_samples,
                         max_new_tokens=settings.max_new_tokens,
                         temperature=settings.temperature, top_p=settings.top_p,
                         stop_ids=stop_ids, rng=jax.random.fold_in(rng, start))
    texts, recs = [], []
    for i, rec in enumerate(chunk):
      for j in range(settings.num_samples):
        texts.append(decode_response(tokenizer, out.tokens[i, j], out.lengths[i, j]))
        recs.append(rec)
    scores, _ = rewards_lib.reward_batch(settings.reward, recs, texts, pool=pool)
    correct.append(scores.reshape(len(chunk), settings.num_samples) > 0.5)
    lengths.append(out.lengths[:len(chunk)])
  correct = np.concatenate(correct)
  summary = passk.summarize(correct, ks=tuple(settings.pass_ks))
  summary["response_len"] = float(np.mean(np.concatenate(lengths)))
  summary["num_prompts"] = len(records)
  return summary, correct


def pass_at_1_by_source(records: Sequence[records_lib.PromptRecord],
                        correct: np.ndarray) -> dict[str, float]:
  """pass@1 per record source (a task or benchmark) from `evaluate`'s correct [P, n], whose P
  rows are the first P records."""
  sources = [r.source for r in list(records)[:len(correct)]]
  return {s: float(np.mean([correct[i].mean() for i, src in enumerate(sources) if src == s]))
          for s in sorted(set(sources))}
