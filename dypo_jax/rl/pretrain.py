"""A partly capable base model for small experiments: teacher SFT stopped on an accuracy gate.

METHOD.md §8: SFT of a tiny model from scratch has a sharp transition, so a base trained for fixed
time lands anywhere; stop on a quick held-out greedy accuracy crossing a target instead. The base
is saved as a Hugging Face directory (`workdir/base_model`) so every method of a comparison starts
from the same weights, and a restarted run reuses it.
"""
import copy
import json
import os
import time

from flax import nnx
import jax
import ml_collections

from dypo_jax import models
from dypo_jax.evaluation import evaluate as evaluate_lib
from dypo_jax.io import paths
from dypo_jax.models import builder
from dypo_jax.rl import trainer as trainer_lib

BASE_DIR = "base_model"


def base_dir(workdir: str) -> str:
  return paths.join(workdir, BASE_DIR)


def greedy_accuracy(trainer: trainer_lib.Trainer, records, *, max_new_tokens: int,
                    template: str, reward: str) -> float:
  settings = evaluate_lib.EvalSettings(
      num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, pass_ks=(1,),
      max_prompts=len(records), batch_prompts=min(32, len(records)), reward=reward,
      template=template)
  summary, _ = evaluate_lib.evaluate(sampler=trainer.sampler,
                                     params=trainer.run_state.train.params, tokenizer=trainer.tok,
                                     records=records, settings=settings, rng=jax.random.key(0))
  return float(summary["pass@1"])


def sft_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config turned into the base model's SFT run."""
  p = config.pretrain
  c = copy.deepcopy(config)
  c.rl.method = "sft"
  c.optim.learning_rate = p.learning_rate
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.train.num_steps = p.max_steps
  c.train.update_prompts = p.update_prompts
  c.train.rollout_prompts = p.update_prompts
  c.train.micro_batches = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.log_every = p.eval_every
  c.train.per_term_grad_norms = False  # Only the SFT term is active.
  return c


def load_base(path: str, options: builder.ModelOptions, mesh) -> models.Transformer:
  """The saved base model of `path`, loaded into the model the run's `options` describe (its
  scan_layers, remat, chunks, dtypes, shardings and residual-stream pin): the same model the run
  that trained it returned."""
  return models.load_pretrained(paths.local_copy(path), options, mesh)


def ensure_base(config: ml_collections.ConfigDict, *, workdir: str, mesh, tokenizer,
                model: models.Transformer, pools, options: builder.ModelOptions,
                lock=None) -> models.Transformer:
  """Returns the base model: read from `workdir/base_model` if there, else trained from `model`
  and saved (checking the workdir's `lock`, as the run's own trainer does). `options`: the ones
  `model` was built with (`build.model_options`)."""
  path = base_dir(workdir)
  if paths.exists(paths.join(path, "config.json")):  # Written last: the folder is complete.
    print(f"pretrain: reusing the base model in {path}", flush=True)
    return load_base(path, options, mesh)
  p = config.pretrain
  c = sft_config(config)
  sft_workdir = paths.join(workdir, "pretrain")
  paths.makedirs(sft_workdir)
  trainer = trainer_lib.Trainer(c, workdir=sft_workdir, mesh=mesh, tokenizer=tokenizer,
                                model=model, pools=pools, lock=lock)
  gate_records = list(pools["eval_id"])[:p.eval_prompts]
  start = time.perf_counter()
  history = []

  def gate(t: trainer_lib.Trainer) -> bool:
    step = t.run_state.step
    if step % p.eval_every:
      return False
    acc = greedy_accuracy(t, gate_records, max_new_tokens=config.sampler.max_new_tokens,
                          template=config.tokenizer.template, reward=config.data.reward)
    minutes = (time.perf_counter() - start) / 60
    history.append({"step": step, "greedy_id_acc": acc, "minutes": minutes})
    print(f"pretrain: step {step} greedy ID accuracy {acc:.3f} (gate {p.target_accuracy}) "
          f"{minutes:.1f} min", flush=True)
    if acc >= p.target_accuracy:
      return True
    if minutes >= p.max_minutes:
      print(f"pretrain: WARNING stopped by pretrain.max_minutes={p.max_minutes} before the "
            f"accuracy gate {p.target_accuracy} (reached {acc:.3f})", flush=True)
      return True
    return False

  trainer.run(should_stop=gate)
  base = nnx.merge(trainer.graphdef, trainer.run_state.train.params)
  trainer.check_lock()
  if jax.process_index() == 0:
    paths.write_text(paths.join(sft_workdir, "gate.json"), json.dumps(history, indent=1))
  if paths.is_remote(path):  # Written locally, then uploaded with config.json last.
    local = os.path.join(paths.staging_dir(workdir), BASE_DIR)
    models.save_pretrained(base, local)
    if jax.process_index() == 0:
      paths.upload_tree(local, path, last=("config.json",))
  else:
    models.save_pretrained(base, path)
  print(f"pretrain: base model saved to {path}", flush=True)
  return base
