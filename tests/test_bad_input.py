"""Bad input is one paragraph naming the file, record, key or value at fault (exit status 2), and a
full disk stops a run with its own status (74) without losing a complete checkpoint."""
import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import pytest

from dypo_jax import build
from dypo_jax import config as config_lib
from dypo_jax import errors
from dypo_jax import models
from dypo_jax.data import record_files
from dypo_jax.data import records as records_lib
import tiny_runs


def _write_jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _row(uid: str, prompt: str = "1 + 2 =", answer: str = "3") -> dict:
  return {"uid": uid, "prompt": prompt, "answer": answer, "source": "add",
          "teachers": [{"teacher": "t", "response": f"Answer: {answer}"}]}


def test_a_tuple_key_with_an_element_of_the_wrong_type_is_named():
  config = tiny_runs.tiny_config()
  with config.unlocked():
    config.eval.pass_ks = (1, "x")
  with pytest.raises(config_lib.ConfigError, match=r"'eval.pass_ks' = \(1, 'x'\) holds 'x' of "
                                                   r"type str; expected a tuple of int"):
    config_lib.validate(config)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_train_file_is_named(tmp_path, content):
  train = tmp_path / "train.jsonl"
  train.write_text(content)
  config = config_lib.base_config()
  config.data.source, config.data.train_path = "files", str(train)
  with pytest.raises(errors.BadInput, match=f"data.train_path: {train} holds no records"):
    build.build_data(config, str(tmp_path))


def test_an_empty_eval_file_is_named(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", [_row("a")])
  (tmp_path / "ood.jsonl").write_text("")
  config = config_lib.base_config()
  config.data.update(dict(source="files", train_path=train,
                          eval_ood_paths=(str(tmp_path / "ood.jsonl"),)))
  with pytest.raises(errors.BadInput, match="data.eval_ood_paths: .*ood.jsonl holds no records"):
    build.build_data(config, str(tmp_path))


def test_named_sets_keep_files_of_one_name_apart_and_refuse_empty_ones(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  a = _write_jsonl(tmp_path / "a" / "x.jsonl", [_row("1")])
  b = _write_jsonl(tmp_path / "b" / "x.jsonl", [_row("2"), _row("3")])
  c = _write_jsonl(tmp_path / "y.jsonl", [_row("4")])
  sets = record_files.read_named_sets([a, b, c])
  assert {name: len(recs) for name, recs in sets.items()} == {a: 1, b: 2, "y.jsonl": 1}
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(errors.BadInput, match="empty.jsonl: --data: the file holds no records"):
    record_files.read_named_sets([a, str(tmp_path / "empty.jsonl")])
  with pytest.raises(errors.BadInput, match="nope.jsonl: --data: there is no such file"):
    record_files.read_named_sets([str(tmp_path / "nope.jsonl")])


@pytest.mark.parametrize("field,text,at", [("prompt", "1 + \ud83d =", 4),
                                           ("teachers[0].response", "Answer: \udc00 3", 8)])
def test_a_lone_surrogate_names_the_file_line_record_and_field(tmp_path, field, text, at):
  bad = _row("b")
  if field == "prompt":
    bad["prompt"] = text
  else:
    bad["teachers"][0]["response"] = text
  train = _write_jsonl(tmp_path / "train.jsonl", [_row("a"), bad])  # JSON: a "\\ud83d" escape.
  config = config_lib.base_config()
  config.data.source, config.data.train_path = "files", train
  with pytest.raises(records_lib.RecordError) as info:
    build.build_data(config, str(tmp_path))
  assert str(info.value) == (
      f"{train} line 2: field {field!r}: record 'b': character {at} is a lone surrogate "
      f"{text[at]!r}, which is not valid Unicode (a \\u escape of half a pair?)")


def test_where_is_names_the_line_or_row(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  jsonl = _write_jsonl(tmp_path / "x.jsonl", [_row("a"), _row("b")])
  assert record_files.where_is(jsonl, "b") == f"{jsonl} line 2"
  parquet = str(tmp_path / "x.parquet")
  rows = [{k: v for k, v in _row(u).items() if k != "teachers"} for u in ("a", "b", "c")]
  pq.write_table(pa.Table.from_pylist(rows), parquet)
  assert record_files.where_is(parquet, "c") == f"{parquet} row 3"
  assert record_files.where_is(parquet, "zz") == parquet


def test_an_over_long_training_prompt_names_its_uid_file_and_line(tmp_path):
  from dypo_jax.data import tasks  # pylint: disable=g-import-not-at-top
  rows = [records_lib.record_to_dict(r) for r in tasks.generate(["add"], num=62, seed=0,
                                                                split="train")]
  rows[2:2] = [_row("long-1", prompt="1 + " * 200 + "1 ="), _row("long-2", prompt="2 + " * 200)]
  train = _write_jsonl(tmp_path / "train.jsonl", rows)
  config = tiny_runs.tiny_config(**{"data.source": "files", "data.train_path": train})
  with pytest.raises(errors.BadInput) as info:
    tiny_runs.build_trainer(config, str(tmp_path / "run"))
  message = str(info.value)
  assert "2 training prompt(s) are longer than" in message
  assert f"uid 'long-1' ({train} line 3)" in message
  assert "model.max_seq_len=128 and sampler.max_new_tokens=32 leave room for 64" in message


def test_a_truncated_safetensors_file_is_named(tmp_path):
  config = tiny_runs.model_config()
  models.save_pretrained(models.Transformer(config, rngs=nnx.Rngs(0)), str(tmp_path))
  weights = tmp_path / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.BadInput, match=f"{weights}: not a complete safetensors file"):
    models.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("key", ["rope_theta", "rope_parameters"])
def test_a_rope_theta_that_is_not_a_number_names_the_file_and_key(tmp_path, key):
  from dypo_jax.models import hf_config  # pylint: disable=g-import-not-at-top
  hf = hf_config.hf_config_from_model_config(tiny_runs.model_config(), dtype="float32")
  hf.pop("rope_theta", None)
  hf["rope_parameters"] = {"rope_type": "default"}
  if key == "rope_theta":
    hf["rope_theta"] = "abc"
  else:
    hf["rope_parameters"]["rope_theta"] = "abc"
  (tmp_path / "config.json").write_text(json.dumps(hf))
  said = (f"{tmp_path / 'config.json'}: {'rope_parameters.' if key != 'rope_theta' else ''}"
          "rope_theta='abc' must be a positive number")
  with pytest.raises(errors.BadInput, match=said):
    models.from_pretrained(str(tmp_path))
  config = tiny_runs.tiny_config(**{"model.init": "hf", "model.hf_path": str(tmp_path)})
  with pytest.raises(errors.BadInput, match=said):
    build.model_config(config)


def test_update_prompts_the_mesh_cannot_split_is_bad_input():
  """Refused by the update program (trainer and aot) as bad input, which main exits 2 on."""
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import program  # pylint: disable=g-import-not-at-top
  config = tiny_runs.tiny_config(**{"train.update_prompts": 3, "train.micro_batches": 1})
  mesh = jax.sharding.AbstractMesh((2, 1, 1), sharding.MESH_AXES)  # data=2: two batch shards.
  with pytest.raises(errors.BadInput, match=r"train.update_prompts=3 must be a multiple of the 2 "
                     r"batch shards of the mesh"):
    program.UpdateProgram.build(config, graphdef=None, params=None, mesh=mesh,
                                rules=sharding.mesh_rules(config), prompt_len=8, num_teachers=1)


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                        cwd=tiny_runs.REPO, timeout=timeout)


@pytest.mark.slow
def test_cli_bad_input_is_one_paragraph_and_status_2(tmp_path):
  """The tools and main, on bad input: exit 2, one paragraph, no traceback (unless asked)."""
  tool = [sys.executable, "-m", "dypo_jax.tools.eval_checkpoint", f"--workdir={tmp_path}"]
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  for flags, said in (([f"--data={empty}"], f"{empty}: --data: the file holds no records"),
                      (["--pass_ks=1,x"], "--pass_ks=1,x: expected whole numbers"),
                      (["--step=abc"], "--step=abc: --step takes an int, not 'abc'")):
    proc = _run(tool + flags)
    assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  # A workdir that cannot be created (under a file); with --verbose the traceback comes too.
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  cmd = tiny_runs.main_command(str(blocker / "run"))
  proc = _run(cmd)
  assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
  assert f"--workdir={blocker / 'run'}: cannot write there" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _run(cmd + ["--verbose"])
  assert proc.returncode == errors.EXIT_BAD_INPUT and "Traceback" in proc.stderr


@pytest.mark.slow
def test_cli_update_prompts_on_a_2_device_mesh_is_one_sentence_and_status_2(tmp_path):
  cmd = tiny_runs.main_command(str(tmp_path / "run"), **{
      "train.update_prompts": 3, "train.micro_batches": 1, "mesh.data": 2, "mesh.fsdp": 1,
      "pretrain.enabled": False, "train.num_steps": 1})
  proc = subprocess.run(cmd, capture_output=True, text=True, env=tiny_runs.subprocess_env(2),
                        cwd=tiny_runs.REPO, timeout=300)
  assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "input error: train.update_prompts=3 must be a multiple of the 2 batch shards of the mesh "
      "(the update batch's items are split over them)"), proc.stderr[-2000:]


def _mount_tmpfs(path, size: str) -> bool:
  path.mkdir()
  if sys.platform != "linux" or shutil.which("mount") is None:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_keeps_every_complete_checkpoint(tmp_path):
  small = tmp_path / "small"
  if not _mount_tmpfs(small, "900k"):  # Room for two tiny checkpoints, not three.
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    workdir = small / "run"
    proc = _run(tiny_runs.main_command(str(workdir), **{"train.checkpoint_every": 1}))
    assert proc.returncode == errors.EXIT_DISK_FULL, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("disk full: no space left where the run writes"), last_line
    assert "No space left on device" in last_line
    done = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert done and done[-1] < 5, done
    # Noticed at the failing save: the step after the last complete one is named, and the run
    # logged at most one step past it (the step during which that save ran).
    assert f"checkpoint step {done[-1] + 1} " in last_line, last_line
    logged = [r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))]
    assert max(logged) <= done[-1] + 2, (logged, done)
    # Moved to a disk with room, the same command resumes from the newest complete checkpoint.
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
  finally:
    subprocess.run(["umount", str(small)], check=False)
  proc = _run(tiny_runs.main_command(str(moved), **{"train.checkpoint_every": 1}))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed at step {done[-1]}" in proc.stdout
