"""Tests for dypo_jax.data.tfds_builder: JSONL -> TFDS (ArrayRecord) -> PromptRecords / grain."""
import dataclasses
import json
import os
import subprocess
import sys

import grain
import pytest

from dypo_jax.data import pipeline
from dypo_jax.data import records
from dypo_jax.data import tasks
from dypo_jax.data import tfds_builder as tb
from dypo_jax.data.records import RecordError
import tiny_runs

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One dataset with all three splits; returns (data_dir, {split: records}, files)."""
  folder = tmp_path_factory.mktemp("tfds")
  train = tasks.generate(["add"], num=20, seed=0, split="train")
  eval_id = tasks.generate(["add"], num=5, seed=0, split="eval")
  # No teachers (an empty sequence) and non-ASCII text must survive too.
  eval_id[1] = dataclasses.replace(eval_id[1], teachers=())
  eval_id[2] = dataclasses.replace(eval_id[2], prompt="Combien font 2+3 ? — é", source="fr")
  eval_ood = tasks.generate(["add_long"], num=4, seed=0, split="eval")
  splits = {"train": train, "eval_id": eval_id, "eval_ood": eval_ood}
  files = {}
  for split, recs in splits.items():
    files[split] = str(folder / f"{split}.jsonl")
    tiny_runs.write_jsonl(recs, files[split])
  data_dir = str(folder / "data")
  path = tb.build_dataset("arith", data_dir=data_dir, train_path=files["train"],
                          eval_id_path=files["eval_id"], eval_ood_path=files["eval_ood"])
  assert path == os.path.join(data_dir, "arith", tb.VERSION)
  return data_dir, splits, files


def test_load_split_equals_the_input_records(built):
  data_dir, splits, _ = built
  for split, recs in splits.items():
    loaded = tb.load_split("arith", split, data_dir=data_dir)
    assert loaded == recs, split  # Same order, same text, same teachers.
  assert all(len(r.teachers) == 3 for r in splits["train"])
  assert all(isinstance(t.response, str) for r in loaded for t in r.teachers)


def test_build_stats_are_recorded(built):
  data_dir, splits, files = built
  stats = tb.read_build_stats("arith", data_dir=data_dir)
  assert stats == {s: {"path": files[s], "read": len(splits[s]), "skipped": 0, "errors": []}
                   for s in splits}


def test_grain_reads_the_data_source(built):
  data_dir, splits, _ = built
  src = tb.data_source("arith", "train", data_dir)
  assert len(src) == 20
  raw = grain.MapDataset.source(src)[4]
  assert isinstance(raw["prompt"], bytes)  # TFDS gives text back as bytes.
  assert tb.example_to_record(raw) == splits["train"][4]
  # The shuffled, sharded record pipeline over TFDS yields what the in-memory one yields.
  from_tfds = pipeline.record_pipeline(tb.records_dataset("arith", "train", data_dir=data_dir),
                                       seed=1, process_index=1, process_count=2, num_epochs=2)
  in_memory = pipeline.record_pipeline(pipeline.records_source(splits["train"]), seed=1,
                                       process_index=1, process_count=2, num_epochs=2)
  got = list(from_tfds)
  assert got == list(in_memory)
  assert len(got) == 20 and sorted(r.uid for r in got[:10]) == sorted(
      r.uid for r in splits["train"][1::2])
  # Raw examples plus decode, read with threads, resume from a JSON state.
  ds = pipeline.record_pipeline(src, seed=1, decode=tb.example_to_record,
                                read_options=grain.ReadOptions(num_threads=2))
  it = iter(ds)
  expected = [next(it) for _ in range(12)]
  it = iter(ds)
  head = [next(it) for _ in range(5)]
  again = iter(ds)
  again.set_state(json.loads(json.dumps(it.get_state())))
  assert head + [next(again) for _ in range(7)] == expected


def test_missing_split_dataset_and_bad_name(built, tmp_path):
  data_dir, _, files = built
  with pytest.raises(ValueError, match="split must be one of"):
    tb.data_source("arith", "test", data_dir)
  with pytest.raises(ValueError, match="no dataset 'other'"):
    tb.load_split("other", "train", data_dir=data_dir)
  with pytest.raises(ValueError, match="snake_case"):
    tb.build_dataset("Bad-Name", data_dir=str(tmp_path), train_path=files["train"])
  only_train = tb.build_dataset("solo", data_dir=str(tmp_path), train_path=files["train"])
  assert os.path.isdir(only_train)
  with pytest.raises(ValueError, match="has no split 'eval_id'"):
    tb.load_split("solo", "eval_id", data_dir=str(tmp_path))


def test_existing_build_needs_overwrite(built, tmp_path):
  _, splits, files = built
  data_dir = str(tmp_path)
  tb.build_dataset("arith", data_dir=data_dir, train_path=files["train"],
                   eval_ood_path=files["eval_ood"])
  with pytest.raises(ValueError, match="already exists"):
    tb.build_dataset("arith", data_dir=data_dir, train_path=files["eval_id"])
  tb.build_dataset("arith", data_dir=data_dir, train_path=files["eval_id"], overwrite=True)
  assert tb.load_split("arith", "train", data_dir=data_dir) == splits["eval_id"]
  with pytest.raises(ValueError, match="no split 'eval_ood'"):  # The old split is gone.
    tb.data_source("arith", "eval_ood", data_dir)


def _with_bad_line(tmp_path, good):
  path = str(tmp_path / "mixed.jsonl")
  lines = [json.dumps(records.record_to_dict(r)) for r in good]
  bad = records.record_to_dict(good[0]) | {"uid": "broken"}
  del bad["answer"]
  lines.insert(2, json.dumps(bad))  # Line 3.
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def test_malformed_record_stops_the_build_with_file_and_line(built, tmp_path):
  _, splits, _ = built
  path = _with_bad_line(tmp_path, splits["train"][:6])
  data_dir = str(tmp_path / "data")
  with pytest.raises(RecordError, match=r"mixed\.jsonl line 3: field 'answer': is missing") as e:
    tb.build_dataset("arith", data_dir=data_dir, train_path=path)
  assert e.value.where == f"{path} line 3"
  assert not os.path.exists(os.path.join(data_dir, "arith"))  # Nothing was written.


def test_skip_counts_malformed_records(built, tmp_path):
  _, splits, _ = built
  path = _with_bad_line(tmp_path, splits["train"][:6])
  data_dir = str(tmp_path / "data")
  tb.build_dataset("arith", data_dir=data_dir, train_path=path, on_error="skip")
  assert tb.load_split("arith", "train", data_dir=data_dir) == splits["train"][:6]
  stats = tb.read_build_stats("arith", data_dir=data_dir)["train"]
  assert stats["read"] == 6 and stats["skipped"] == 1
  assert stats["errors"] == [f"{path} line 3: field 'answer': is missing"]


def test_a_file_with_no_usable_record_is_an_error(tmp_path):
  path = str(tmp_path / "bad.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write("{not json\n")
  with pytest.raises(RecordError, match=r"bad\.jsonl: holds no usable record for split 'train' "
                     r"\(1 skipped\)"):
    tb.build_dataset("arith", data_dir=str(tmp_path / "d"), train_path=path, on_error="skip")


def test_example_to_record_names_the_bad_field():
  good = tb.record_to_example(tasks.generate(["add"], num=1, seed=0, split="train")[0])
  encoded = {k: (v.encode() if isinstance(v, str) else v) for k, v in good.items()}
  encoded["teachers"] = {"teacher": [b"a", b"b"], "response": [b"x"]}
  with pytest.raises(RecordError, match="ex 1: field 'teachers': 2 teacher names but 1"):
    tb.example_to_record(encoded, where="ex 1")
  encoded["teachers"] = {"teacher": [], "response": []}
  encoded["answer"] = b""
  with pytest.raises(RecordError, match="ex 2: field 'answer'"):
    tb.example_to_record(encoded, where="ex 2")


@pytest.mark.slow
def test_cli_builds_and_reports_errors(built, tmp_path, capsys):
  _, splits, files = built
  data_dir = str(tmp_path / "cli")
  proc = subprocess.run(
      [sys.executable, "-m", "dypo_jax.data.tfds_builder", "--name=cli_set",
       f"--data_dir={data_dir}", f"--train={files['train']}", f"--eval_ood={files['eval_ood']}"],
      capture_output=True, text=True, cwd=_REPO, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert os.path.join(data_dir, "cli_set", tb.VERSION) in proc.stdout
  assert "train: 20 records, 0 skipped" in proc.stdout
  assert tb.load_split("cli_set", "eval_ood", data_dir=data_dir) == splits["eval_ood"]
  # In-process: a bad file gives exit status 1 and the file and line on stderr.
  bad = _with_bad_line(tmp_path, splits["train"][:4])
  assert tb.main(["--name=other", f"--data_dir={data_dir}", f"--train={bad}"]) == 1
  assert "mixed.jsonl line 3: field 'answer'" in capsys.readouterr().err


def _tfds_config(data_dir: str, **data):
  return tiny_runs.tiny_config(**{"data.source": "tfds", "data.tfds_data_dir": data_dir,
                                  "data.tfds_name": "arith",
                                  **{f"data.{k}": v for k, v in data.items()}})


def test_a_run_reads_the_pools_built_from_records(tmp_path):
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  splits = {"train": tasks.generate(["add", "mul"], num=12, seed=3, split="train"),
            "eval_ood": tasks.generate(["add_long"], num=3, seed=3, split="eval")}
  data_dir = str(tmp_path)
  tb.build_from_records("arith", data_dir=data_dir, splits=splits)
  assert tb.split_names("arith", data_dir=data_dir) == ["eval_ood", "train"]
  recs, stats = tb.read_split("arith", "train", data_dir=data_dir)
  assert recs == splits["train"] and stats == {"read": 12, "skipped": 0, "errors": []}
  pools = build.build_data(_tfds_config(data_dir, tfds_eval_id_split=""), str(tmp_path / "w"))
  assert pools == {"train": splits["train"], "eval_id": [], "eval_ood": splits["eval_ood"]}


def test_a_run_names_the_key_of_a_missing_dataset_or_split(tmp_path):
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax import errors  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "d")
  with pytest.raises(errors.BadInput, match=r"data.tfds_data_dir='.*/d', data.tfds_name='arith'"
                     r": no dataset 'arith'"):
    build.build_data(_tfds_config(data_dir), str(tmp_path))
  tb.build_from_records(
      "arith", data_dir=data_dir,
      splits={"train": tasks.generate(["add"], num=4, seed=0, split="train")})
  with pytest.raises(errors.BadInput, match=r"data.tfds_eval_id_split='eval_id': the dataset at "
                     r".*arith/1.0.0 has no such split \(it holds \['train'\]\)"):
    build.build_data(_tfds_config(data_dir), str(tmp_path))


def test_bad_examples_are_named_and_skipped_as_in_record_files(tmp_path):
  good = tasks.generate(["add"], num=5, seed=0, split="train")
  bad = [*good[:2], dataclasses.replace(good[2], answer=""), *good[3:]]
  data_dir = str(tmp_path)
  tb.build_from_records("arith", data_dir=data_dir, splits={"train": bad})
  where = f"{tb.dataset_dir('arith', data_dir=data_dir)} split 'train' example 2"
  with pytest.raises(RecordError, match=rf"{where}: field 'answer'") as e:
    tb.read_split("arith", "train", data_dir=data_dir)
  assert e.value.where == where
  recs, stats = tb.read_split("arith", "train", data_dir=data_dir, on_error="skip")
  assert recs == good[:2] + good[3:] and stats["skipped"] == 1
  assert stats["errors"][0].startswith(f"{where}: field 'answer'")
  with pytest.raises(RecordError, match="duplicate uid"):  # A reader would refuse it.
    tb.build_from_records("dup", data_dir=data_dir, splits={"train": [good[0], good[0]]})


@pytest.mark.slow
def test_main_trains_on_a_tfds_dataset(tmp_path):
  data_dir = str(tmp_path / "tfds")
  assert tb.main(["--name=arith", f"--data_dir={data_dir}", "--procedural", "--num_train=64",
                  "--num_eval_id=4", "--num_eval_ood=4"]) == 0
  workdir = str(tmp_path / "run")
  cmd = tiny_runs.main_command(workdir, **{
      "data.source": "tfds", "data.tfds_data_dir": data_dir, "data.tfds_name": "arith",
      "train.num_steps": 2, "train.checkpoint_every": 2})
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(tiny_runs.comparable_metrics(workdir)) == [1, 2]
