"""Rounds that queue nothing and updates that find nothing are ordinary paths of the loop: counted,
logged, and after `train.max_empty_updates` in a row the run stops with a sentence and exit
status 3 (a model that got good, or Hard prompts without a teacher trace)."""
import dataclasses
import json
import os
import subprocess

import pytest

from dypo_jax import build
from dypo_jax import errors
from dypo_jax.evaluation import rewards
from dypo_jax.io import metrics as metrics_lib
from dypo_jax.parallel import sharding
from dypo_jax.rl import trainer as trainer_lib
import tiny_runs


@pytest.fixture(scope="module", autouse=True)
def constant_rewards():
  rewards.register("test_always_right")(lambda record, response: 1.0)
  rewards.register("test_always_wrong")(lambda record, response: 0.0)
  yield
  del rewards.REWARDS["test_always_right"], rewards.REWARDS["test_always_wrong"]


def _trainer(workdir: str, *, method: str, reward: str, teachers: bool = True, **overrides):
  config = tiny_runs.tiny_config(method, **{
      "train.num_steps": 6, "train.max_rollouts_per_update": 2, "train.max_empty_updates": 2,
      "train.checkpoint_every": 0, "train.rollout_prompts": 4, **overrides})
  config.data.reward = reward
  mesh = sharding.build_mesh(config.mesh)
  pools = build.build_data(config, workdir)
  tok = build.build_tokenizer(config, workdir, pools)
  if not teachers:
    pools["train"] = [dataclasses.replace(r, teachers=()) for r in pools["train"]]
  model = build.build_model(config, mesh, tok)
  return trainer_lib.Trainer(config, workdir=workdir, mesh=mesh, tokenizer=tok, model=model,
                             pools=pools)


def _records(workdir):
  return metrics_lib.merge_by_step(
      metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILENAME)))


@pytest.mark.slow
@pytest.mark.parametrize("offline_loss_type", ["sft", "rl"])
def test_every_group_easy_stops_with_nothing_to_learn(tmp_path, offline_loss_type):
  workdir = str(tmp_path)
  trainer = _trainer(workdir, method="dypo", reward="test_always_right",
                     **{"rl.offline_loss_type": offline_loss_type})
  with pytest.raises(errors.NothingToLearn, match="nothing left to learn at this difficulty"):
    trainer.run()
  records = _records(workdir)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["train/empty_update"] == 1 and r["route/easy_frac"] == 1.0
    assert r["rollout/rounds"] == 2 and r["rollout/empty_rounds"] == 2  # Sampled up to the limit.
  assert trainer.run_state.step == 2 and int(trainer.run_state.train.step) == 2
  # Saved before stopping: a restart resumes at step 2 and stops again at once, not later.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


@pytest.mark.slow
# Every method whose updates can find nothing: DYPO (Hard prompts), and SFT and SFT -> RL (before
# the switch), which read only teacher traces. GRPO, LUFFY and SFT + RL always queue the group.
@pytest.mark.parametrize("method", ["dypo", "sft", "sft_then_rl"])
def test_hard_prompts_without_teachers_are_counted_not_trained(tmp_path, method):
  workdir = str(tmp_path)
  trainer = _trainer(workdir, method=method, reward="test_always_wrong", teachers=False)
  with pytest.raises(errors.NothingToLearn, match="Hard with no teacher trace"):
    trainer.run()
  records = _records(workdir)
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert r["train/empty_update"] == 1
    assert r["sft/no_teacher_skipped"] == 2 * 4  # Two rounds of four prompts, each counted.
    if method == "dypo":
      assert r["route/hard_frac"] == 1.0


@pytest.mark.slow
def test_an_empty_update_between_real_ones_does_not_stop_the_run(tmp_path):
  """GRPO queues every group whatever its grade: all-Easy rounds still train (zero advantage)."""
  workdir = str(tmp_path)
  trainer = _trainer(workdir, method="grpo", reward="test_always_right",
                     **{"train.num_steps": 2})
  trainer.run()
  assert all("train/empty_update" not in r for r in _records(workdir))


@pytest.mark.slow
def test_cli_exits_3_on_a_pool_without_teachers(tmp_path):
  """verl data without `target`: every prompt Hard with no teacher trace -> exit status 3."""
  data = tmp_path / "train.jsonl"
  with open(data, "w") as f:
    for i in range(64):
      a, b = 37 * i % 101, 53 * i % 97
      f.write(json.dumps({"uid": f"q{i}", "prompt": f"What is {a} + {b}? Add {a} and {b}.",
                          "answer": str(a + b), "source": "add", "teachers": []}) + "\n")
  workdir = str(tmp_path / "run")
  cmd = tiny_runs.main_command(workdir, **{
      "data.source": "files", "data.train_path": str(data), "train.max_empty_updates": 2,
      "train.num_steps": 20, "tokenizer.train_vocab_size": 40})
  proc = subprocess.run(cmd, capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                        cwd=tiny_runs.REPO, timeout=300)
  assert proc.returncode == errors.EXIT_NOTHING_TO_LEARN, proc.stderr[-3000:]
  assert "nothing left to learn" in proc.stderr
  assert "Traceback" not in proc.stderr
