"""`python -m dypo_jax.tools.export`: a checkpoint's policy as a Hugging Face directory."""
import glob
import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax import models
from dypo_jax.io import checkpoint as checkpoint_lib
from dypo_jax.tools import export as export_lib
import tiny_runs


def _checkpointed_model(workdir: str, step: int, like: models.Transformer) -> models.Transformer:
  """The policy params of checkpoint `step`, read straight from Orbax, in `like`'s structure."""
  graphdef, params = nnx.split(like, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        params)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                   read_only=True) as ckpt:
    restored = ckpt.restore_subtree(step, abstract_subtree={"train": {"params": target}})
  return nnx.merge(graphdef, restored["train"]["params"])


def _logits(model, tokens):
  return np.asarray(model(jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny run of 2 steps with a checkpoint after each."""
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  tiny_runs.run_python("""
      import sys
      import tiny_runs
      tiny_runs.build_trainer(tiny_runs.tiny_config(**{
          "train.num_steps": 2, "train.checkpoint_every": 1}), sys.argv[1]).run()
      """, workdir)
  return workdir


@pytest.mark.slow
def test_exported_logits_equal_the_checkpointed_params_logits(trained_workdir, tmp_path):
  out = str(tmp_path / "hf")
  proc = subprocess.run([sys.executable, "-m", "dypo_jax.tools.export", f"--workdir={trained_workdir}",
                         "--step=1", f"--out={out}"], capture_output=True, text=True,
                        env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step 1 of {trained_workdir}" in proc.stdout
  assert os.path.exists(os.path.join(out, "config.json"))
  assert os.path.exists(os.path.join(out, "spm.model"))  # The run's tokenizer travels along.

  exported = models.from_pretrained(out)
  assert exported.config.vocab_size == tiny_runs.OVERRIDES["model.vocab_size"]
  tokens = np.random.default_rng(0).integers(0, exported.config.vocab_size, (2, 9))
  step1 = _checkpointed_model(trained_workdir, 1, exported)
  step2 = _checkpointed_model(trained_workdir, 2, exported)
  np.testing.assert_array_equal(_logits(exported, tokens), _logits(step1, tokens))
  # The export is the requested step's policy, not another's (one update apart).
  assert np.abs(_logits(exported, tokens) - _logits(step2, tokens)).max() > 1e-6


@pytest.mark.slow
def test_missing_or_corrupt_checkpoint_is_a_clear_error(trained_workdir, tmp_path):
  out = str(tmp_path / "hf")
  with pytest.raises(export_lib.ExportError, match="no checkpoint directory .*nowhere"):
    export_lib.export(str(tmp_path / "nowhere"), out)
  with pytest.raises(export_lib.ExportError, match=r"step 7 not found .*\[1, 2\]"):
    export_lib.export(trained_workdir, out, step=7)
  # A damaged copy of the run: the arrays of step 2 lost.
  damaged = str(tmp_path / "damaged")
  shutil.copytree(trained_workdir, damaged)
  for path in glob.glob(os.path.join(damaged, "checkpoints", "2", "state", "*")):
    if os.path.basename(path) not in ("_METADATA", "commit_success.txt"):
      (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
  step_dir = os.path.join(damaged, "checkpoints", "2")
  with pytest.raises(export_lib.ExportError, match=f"checkpoint {step_dir} is corrupt"):
    export_lib.export(damaged, out)
  assert not os.path.exists(out)  # Nothing half-written.
  # The command line says the same in one line, with a non-zero exit status.
  proc = subprocess.run([sys.executable, "-m", "dypo_jax.tools.export", f"--workdir={damaged}",
                         f"--out={out}"], capture_output=True, text=True,
                        env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO, timeout=300)
  assert proc.returncode != 0
  assert f"export error: checkpoint {step_dir} is corrupt" in proc.stderr


# ------------------------------------------------------------------ python -m dypo_jax.tools.eval_checkpoint


def _eval_checkpoint(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "dypo_jax.tools.eval_checkpoint", *flags],
                        capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                        cwd=tiny_runs.REPO, timeout=300)


@pytest.mark.slow
def test_eval_checkpoint_equals_evaluating_the_checkpointed_params(trained_workdir, tmp_path):
  out = str(tmp_path / "eval.json")
  proc = _eval_checkpoint(f"--workdir={trained_workdir}", "--step=1", "--num_samples=3",
                          "--pass_ks=1,3", "--temperature=0.6", "--seed=5", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  assert result["source"] == {"workdir": trained_workdir, "step": 1}
  assert set(result["results"]) == {"eval_id", "eval_ood"}
  assert "| eval_id | 4 |" in proc.stdout  # The printed table.

  # The same evaluation in this process, on the params read straight from the checkpoint.
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.models import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  config = tiny_runs.tiny_config()
  pools = build.build_data(config, trained_workdir)
  tok = build.build_tokenizer(config, trained_workdir, pools)
  like = models.Transformer(tiny_runs.model_config(), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(_checkpointed_model(trained_workdir, 1, like), nnx.Param)
  sampler = sampler_lib.Sampler(graphdef, model_config=like.config, pad_id=tok.pad_id,
                                prompt_buckets=tuple(config.sampler.prompt_buckets),
                                mesh=sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}),
                                rules=sharding.DEFAULT_RULES)
  settings = evaluate_lib.EvalSettings(
      num_samples=3, temperature=0.6, top_p=1.0, max_new_tokens=config.eval.max_new_tokens,
      pass_ks=(1, 3), max_prompts=config.eval.max_prompts,
      batch_prompts=min(32, config.eval.max_prompts), reward=config.data.reward,
      template=config.tokenizer.template)
  for split in ("eval_id", "eval_ood"):
    want, _ = evaluate_lib.evaluate(sampler=sampler, params=params, tokenizer=tok,
                                    records=pools[split], settings=settings,
                                    rng=jax.random.key(5))
    got = result["results"][split]
    assert got["num_prompts"] == want["num_prompts"] == 4
    for key in ("pass@1", "pass@3", "response_len"):
      assert got[key] == pytest.approx(want[key], abs=1e-9), (split, key)


@pytest.mark.slow
def test_eval_checkpoint_of_an_export_and_on_a_record_file(trained_workdir, tmp_path):
  hf_dir = str(tmp_path / "hf")
  export_lib.export(trained_workdir, hf_dir, step=2)
  data = tmp_path / "records.jsonl"
  rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b), "source": "add"}
          for a, b in ((1, 2), (3, 4), (5, 6))]
  data.write_text("".join(json.dumps(row) + "\n" for row in rows))
  by_step = str(tmp_path / "by_step.json")
  by_hf = str(tmp_path / "by_hf.json")
  common = ("--num_samples=2", f"--data={data}", "--max_new_tokens=16")
  proc = _eval_checkpoint(f"--workdir={trained_workdir}", "--step=2", f"--out={by_step}",
                          *common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The exported folder read in place of the checkpoint (the run's config and tokenizer): the
  # same samples, the same scores.
  proc = _eval_checkpoint(f"--hf_path={hf_dir}", f"--workdir={trained_workdir}",
                          f"--out={by_hf}", *common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(by_step) as f, open(by_hf) as g:
    a, b = json.load(f)["results"], json.load(g)["results"]
  assert list(a) == ["records.jsonl"] and a == b
  assert a["records.jsonl"]["num_prompts"] == 3
  # A Hugging Face folder alone, as a user brings one (here with its SentencePiece file).
  alone = str(tmp_path / "alone.json")
  proc = _eval_checkpoint(f"--hf_path={hf_dir}", f"--tokenizer={hf_dir}/spm.model",
                          f"--out={alone}", *common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(alone) as f:
    result = json.load(f)
  assert result["source"] == {"hf_path": hf_dir}
  assert result["results"]["records.jsonl"]["num_prompts"] == 3


@pytest.mark.slow
def test_eval_checkpoint_bad_input_is_named(trained_workdir, tmp_path):
  proc = _eval_checkpoint(f"--workdir={trained_workdir}", "--num_samples=2", "--pass_ks=4",
                          f"--out={tmp_path / 'x.json'}")
  assert proc.returncode != 0
  assert "--pass_ks=(4,): each k must lie in [1, --num_samples=2]" in proc.stderr
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"uid": "long-1", "prompt": "1+" * 200 + "1=?", "answer": "201",
                              "source": "add"}) + "\n")
  proc = _eval_checkpoint(f"--workdir={trained_workdir}", f"--data={long}",
                          f"--out={tmp_path / 'x.json'}")
  assert proc.returncode != 0
  assert "long.jsonl: record 0 ('long-1') has a" in proc.stderr, proc.stderr[-2000:]
  proc = _eval_checkpoint(f"--workdir={tmp_path / 'nowhere'}")
  assert proc.returncode != 0 and "no checkpoint directory" in proc.stderr
  assert not os.path.exists(tmp_path / "x.json")
