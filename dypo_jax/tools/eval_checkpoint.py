r"""Standalone evaluation of a training checkpoint or a Hugging Face directory: pass@1 and pass@k.

  python -m dypo_jax.tools.eval_checkpoint --workdir=/tmp/dypo_tiny                 # latest step
  python -m dypo_jax.tools.eval_checkpoint --workdir=/tmp/dypo_tiny --step=50 --num_samples=8 \
      --pass_ks=1,4,8
  python -m dypo_jax.tools.eval_checkpoint --workdir=/tmp/dypo_tiny --hf_path=/tmp/dypo_tiny/base_model
  python -m dypo_jax.tools.eval_checkpoint --hf_path=/ckpt/Qwen2.5-Math-7B --benchmarks=gsm8k,math500 \
      --template=qwen_chat --max_new_tokens=2048 --out=/tmp/qwen_eval.json

The policy is a checkpoint's (`--workdir`, `--step`; only its parameters are read) or a Hugging
Face directory (`--hf_path`). The evaluation sets are, by default, the run's own held-out ID and
OOD pools, rebuilt from the config saved in the checkpoint; `--benchmarks` names real benchmarks
(`dypo_jax.data.benchmarks`: gsm8k, math500, math with math-verify, arc_challenge with exact
match of the letter) and
`--data` record files (JSONL / Parquet). Settings default to the run's `eval` section (or the
base config's). The result is printed as a table and written as JSON: `--out`, by default
`<workdir>/eval_checkpoint/step_<N>.json` (or `hf_<folder>.json`); --hf_path without --workdir
needs --out.
"""
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging

from dypo_jax import errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir (checkpoints/, config).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_HF_PATH = flags.DEFINE_string("hf_path", None, "Evaluate this Hugging Face directory instead.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer file or folder (default: the run's, or --hf_path's).")
_BENCHMARKS = flags.DEFINE_list("benchmarks", [], "Real benchmarks to evaluate on.")
_DATA = flags.DEFINE_list("data", [], "Record files (JSONL / Parquet) to evaluate on.")
_SPLITS = flags.DEFINE_list("splits", ["eval_id", "eval_ood"],
                            "The run's own pools to evaluate on when neither --benchmarks nor "
                            "--data is given.")
_TEMPLATE = flags.DEFINE_string("template", None, "Prompt template (default: the run's).")
_REWARD = flags.DEFINE_string("reward", None, "Reward (default: the run's for its pools and "
                              "--data; per benchmark for --benchmarks).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Samples per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus threshold.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Response length limit.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", None, "First N prompts of each set.")
_PASS_KS = flags.DEFINE_list("pass_ks", None, "The k of pass@k (each <= num_samples).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "JSON file to write.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an input error, print the traceback too.")


class EvalCheckpointError(errors.BadInput):
  """A flag, checkpoint or data source that cannot be evaluated (the message names it)."""


def _pass_ks_flag() -> tuple[int, ...]:
  try:
    return tuple(int(k) for k in _PASS_KS.value)
  except ValueError:
    raise EvalCheckpointError(f"--pass_ks={','.join(_PASS_KS.value)}: expected whole numbers, "
                              "e.g. --pass_ks=1,8") from None


def eval_settings(config, *, reward: str, template: str):
  """The run's eval settings, overridden by the flags that were given."""
  from dypo_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  flags_given = {name: flag.value for name, flag in (
      ("num_samples", _NUM_SAMPLES), ("temperature", _TEMPERATURE), ("top_p", _TOP_P),
      ("max_new_tokens", _MAX_NEW_TOKENS), ("max_prompts", _MAX_PROMPTS)) if flag.value is not None}
  if _PASS_KS.value:
    pass_ks = _pass_ks_flag()
    num_samples = flags_given.get("num_samples", config.eval.num_samples)
    if any(k < 1 or k > num_samples for k in pass_ks):
      raise EvalCheckpointError(f"--pass_ks={pass_ks}: each k must lie in [1, --num_samples="
                                f"{num_samples}]")
    flags_given["pass_ks"] = pass_ks
  try:
    return evaluate_lib.settings_from_config(config.eval, reward=reward, template=template,
                                             **flags_given)
  except ValueError as e:
    raise EvalCheckpointError(str(e)) from e


def load_sets(config, workdir: str | None,
              data_sets: dict[str, list] | None = None) -> dict[str, tuple[list, str]]:
  """{set name: (records, reward name)} from --benchmarks, --data or the run's own pools."""
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax.data import benchmarks  # pylint: disable=g-import-not-at-top
  from dypo_jax.data import record_files  # pylint: disable=g-import-not-at-top
  sets = {}
  for name in _BENCHMARKS.value:
    # ARC's gold is a choice letter: compared exactly; the math sets need math-verify.
    default = "exact_match" if name == "arc_challenge" else "math_verify"
    sets[name] = (benchmarks.load_benchmark(name), _REWARD.value or default)
  if data_sets is None:
    data_sets = record_files.read_named_sets(_DATA.value)
  for name, recs in data_sets.items():
    sets[name] = (recs, _REWARD.value or config.data.reward)
  if sets:
    return sets
  d = config.data
  if ((d.source == "files" and not (d.eval_id_paths or d.eval_ood_paths)) or
      (d.source == "tfds" and not (d.tfds_eval_id_split or d.tfds_eval_ood_split))):
    raise EvalCheckpointError("no evaluation set: pass --benchmarks or --data (the run has no "
                              "eval pools)")
  pools = build.build_data(config, workdir or "")
  for split in _SPLITS.value:
    if split not in pools:
      raise EvalCheckpointError(f"--splits: unknown pool {split!r}; allowed: {sorted(pools)}")
    if pools[split]:
      sets[split] = (pools[split], _REWARD.value or config.data.reward)
  if not sets:
    raise EvalCheckpointError(f"the run's pools {_SPLITS.value} are empty")
  return sets


def format_table(results: dict[str, dict[str, float]]) -> str:
  keys = sorted({k for r in results.values() for k in r if k.startswith("pass@")},
                key=lambda k: int(k.split("@")[1]))
  rows = ["| set | prompts | " + " | ".join(keys) + " | mean response tokens |",
          "|---|---|" + "---|" * len(keys) + "---|"]
  for name, r in results.items():
    cells = " | ".join(f"{100 * r[k]:.1f}%" if k in r else "–" for k in keys)
    rows.append(f"| {name} | {r['num_prompts']} | {cells} | {r['response_len']:.1f} |")
  return "\n".join(rows)


def run(workdir: str | None, *, step: int | None, hf_path: str | None,
        data_sets: dict[str, list] | None = None) -> dict[str, Any]:
  """Evaluates the chosen policy on the chosen sets; returns the JSON-ready result."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dypo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  from dypo_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from dypo_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.evaluation import verifier  # pylint: disable=g-import-not-at-top
  from dypo_jax.models import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  if hf_path:
    config = config_lib.base_config()
    if workdir:  # A run's base model or export: its tokenizer, template and pools still apply.
      config = config_lib.from_dict(run_checkpoint.read_config(workdir, step=step))
    model = models.from_pretrained(hf_path, mesh=mesh)
    source = {"hf_path": os.path.abspath(hf_path)}
  else:
    policy = run_checkpoint.read_policy(workdir, step=step)
    config, model = config_lib.from_dict(policy.config), policy.model
    source = {"workdir": os.path.abspath(workdir), "step": policy.step}

  if _TOKENIZER.value:
    kind = "sentencepiece" if _TOKENIZER.value.endswith(".model") else "hf"
    tok = tokenizers.load_tokenizer(kind, _TOKENIZER.value)
  elif hf_path and not workdir:
    tok = tokenizers.load_tokenizer("hf", hf_path)
  elif config.tokenizer.path:
    tok = tokenizers.load_tokenizer(config.tokenizer.kind, config.tokenizer.path)
  else:
    tok = tokenizers.SentencePieceTokenizer(os.path.join(workdir, "tokenizer", "spm.model"))
  tokenizers.check_vocab_fits(tok, model.config.vocab_size)
  if tok.pad_id is None:
    raise EvalCheckpointError(f"the tokenizer {tok!r} has neither a pad nor an eos token")
  template = _TEMPLATE.value or config.tokenizer.template

  graphdef, params = nnx.split(model, nnx.Param)
  buckets = tuple(config.sampler.prompt_buckets) or sampler_lib.DEFAULT_BUCKETS
  sampler = sampler_lib.Sampler(graphdef, model_config=model.config, pad_id=tok.pad_id,
                                prompt_buckets=buckets, mesh=mesh,
                                rules=sharding.DEFAULT_RULES)
  sets = load_sets(config, workdir, data_sets)
  pool = None
  if any(reward == "math_verify" for _, reward in sets.values()):
    v = config.verifier
    pool = verifier.MathVerifyPool(v.workers, timeout=v.item_timeout_s,
                                      batch_timeout=v.batch_timeout_s)
  results, settings_json = {}, {}
  try:
    for name, (records, reward) in sets.items():
      settings = eval_settings(config, reward=reward, template=template)
      try:
        summary, _ = evaluate_lib.evaluate(sampler=sampler, params=params, tokenizer=tok,
                                           records=records, settings=settings,
                                           rng=jax.random.key(_SEED.value), pool=pool)
      except evaluate_lib.PromptTooLongError as e:
        raise EvalCheckpointError(f"{name}: {e} (pass a smaller --max_new_tokens or "
                                  f"--max_prompts, or a model with a longer context)") from e
      results[name] = summary
      settings_json[name] = {k: getattr(settings, k) for k in (
          "num_samples", "temperature", "top_p", "max_new_tokens", "pass_ks", "reward",
          "template")}
      print(f"eval: {name}: " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in summary.items()), flush=True)
  finally:
    if pool is not None:
      pool.close()
  return {"source": source, "seed": _SEED.value, "settings": settings_json, "results": results}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir, hf_path = _WORKDIR.value, _HF_PATH.value
  if not workdir and not hf_path:
    raise app.UsageError("pass --workdir (a training run) or --hf_path (a Hugging Face folder)")
  if hf_path and not workdir and not _OUT.value:
    raise app.UsageError("--out is required with --hf_path and no --workdir")
  errors.set_verbose(_VERBOSE.value)
  errors.quiet_background_errors()
  if _VERBOSE.value:
    logging.set_verbosity(logging.INFO)
  try:
    if _PASS_KS.value:
      _pass_ks_flag()
    from dypo_jax.data import record_files  # pylint: disable=g-import-not-at-top
    data_sets = record_files.read_named_sets(_DATA.value)  # Before JAX: a bad file named at once.
    result = run(workdir, step=_STEP.value, hf_path=hf_path, data_sets=data_sets)
  except (errors.BadInput, FileNotFoundError, IsADirectoryError, PermissionError) as e:
    errors.exit_with("eval_checkpoint error", e, errors.EXIT_BAD_INPUT, verbose=_VERBOSE.value)
  except errors.StorageUnavailable as e:
    errors.exit_with("eval_checkpoint error", e, errors.EXIT_STORAGE_UNAVAILABLE,
                     verbose=_VERBOSE.value)
  except ValueError as e:
    errors.exit_with("eval_checkpoint error", e, errors.EXIT_ERROR, verbose=_VERBOSE.value)
  out = _OUT.value
  if out is None:
    name = ("hf_" + os.path.basename(os.path.normpath(hf_path)) if hf_path
            else f"step_{result['source']['step']}")
    out = os.path.join(workdir, "eval_checkpoint", name + ".json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  from dypo_jax.io import fileio  # pylint: disable=g-import-not-at-top
  fileio.atomic_write_bytes(out, json.dumps(result, indent=1).encode("utf-8"))
  print(format_table(result["results"]), flush=True)
  print(f"eval_checkpoint: wrote {out}", flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore step (INFO, WARNING).
  from dypo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=config_lib.parse_flags)
  except config_lib.ConfigError as e:  # A flag that does not parse: one sentence, exit 2.
    errors.exit_with("eval_checkpoint error", e, errors.EXIT_BAD_INPUT)
