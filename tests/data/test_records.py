"""Tests for dypo_jax.data.records: JSONL / Parquet readers, validation, atomic writer."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dypo_jax.data import record_files
from dypo_jax.data import records as rec_lib
from dypo_jax.data.records import PromptRecord
from dypo_jax.data.records import RecordError
from dypo_jax.data.records import TeacherSolution
import tiny_runs


def _good(uid="u1", prompt="12+7=?", answer="19", source="add", teachers=None):
  if teachers is None:
    teachers = [{"teacher": "running_total", "response": "12+7=19\nAnswer: 19"},
                {"teacher": "place_value", "response": "tens: 10\nones: 2+7=9\nAnswer: 19"}]
  return {"uid": uid, "prompt": prompt, "answer": answer, "source": source, "teachers": teachers}


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(line + "\n")
  return str(path)


def _jsonl(tmp_path, objs, name="data.jsonl"):
  return _write_lines(tmp_path / name, [o if isinstance(o, str) else json.dumps(o) for o in objs])


# ------------------------------------------------------------------------------------ good files


def test_good_jsonl_parses(tmp_path):
  path = _jsonl(tmp_path, [_good("a"), _good("b", prompt="3*4=?", answer=12, source="mul")])
  recs, stats = record_files.read_jsonl(path)
  assert stats == {"read": 2, "skipped": 0, "errors": []}
  assert recs[0] == PromptRecord(
      uid="a", prompt="12+7=?", answer="19", source="add",
      teachers=(TeacherSolution("running_total", "12+7=19\nAnswer: 19"),
                TeacherSolution("place_value", "tens: 10\nones: 2+7=9\nAnswer: 19")))
  assert recs[1].answer == "12"  # An integer answer becomes its text.
  assert recs[1].source == "mul"


def test_jsonl_blank_lines_and_derived_uid(tmp_path):
  no_uid = _good()
  del no_uid["uid"]
  del no_uid["teachers"]
  path = _jsonl(tmp_path, [_good("a"), "", no_uid])
  recs, _ = record_files.read_jsonl(path)
  assert [r.uid for r in recs] == ["a", "add-3"]  # Derived from source and the 1-based line.
  assert recs[1].teachers == ()


def test_jsonl_gz_via_read_records(tmp_path):
  path = str(tmp_path / "data.jsonl.gz")
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(json.dumps(_good("a")) + "\n" + json.dumps(_good("b")) + "\n")
  recs, stats = record_files.read_records(path)
  assert [r.uid for r in recs] == ["a", "b"] and stats["read"] == 2


def test_good_parquet_dypo_layout(tmp_path):
  path = str(tmp_path / "data.parquet")
  pq.write_table(pa.Table.from_pylist([_good("a"), _good("b", teachers=[])]), path)
  recs, stats = record_files.read_records(path)
  assert stats["read"] == 2
  assert recs[0].teachers[1] == TeacherSolution("place_value",
                                                "tens: 10\nones: 2+7=9\nAnswer: 19")
  assert recs[1].teachers == ()


def _verl_row(index, user="What is 2+3?", target=None, extra=None):
  row = {
      "data_source": "openr1",
      "prompt": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "ignored earlier turn"},
                 {"role": "assistant", "content": "ok"},
                 {"role": "user", "content": user}],
      "ability": "math",
      "reward_model": {"ground_truth": "5", "style": "rule"},
      "extra_info": {"index": index, "split": "train"},
  }
  if extra is not None:
    row["extra_info"].update(extra)
  if target is not None:
    row["target"] = target
  return row


def test_good_parquet_verl_layout(tmp_path):
  path = str(tmp_path / "luffy.parquet")
  rows = [_verl_row(7, target=[{"role": "assistant", "content": "2+3=5\nAnswer: 5"}]),
          _verl_row(8, user="What is 4+4?", target=[{"role": "assistant", "content": "8"}])]
  pq.write_table(pa.Table.from_pylist(rows), path)
  recs, stats = record_files.read_parquet(path)  # layout="auto" detects verl by reward_model.
  assert stats["read"] == 2
  assert recs[0] == PromptRecord(uid="7", prompt="What is 2+3?", answer="5", source="openr1",
                                 teachers=(TeacherSolution("target", "2+3=5\nAnswer: 5"),))
  assert recs[1].prompt == "What is 4+4?"


def test_verl_row_teacher_names_and_no_target():
  where = rec_lib.Where("x.parquet", 1, "row")
  rec = rec_lib.record_from_verl(
      _verl_row(1, target=["t1", "t2"], extra={"teachers": ["r1", "qwen3"]}), where=where)
  assert [(t.teacher, t.response) for t in rec.teachers] == [("r1", "t1"), ("qwen3", "t2")]
  rec = rec_lib.record_from_verl(_verl_row(2, target=["t1", "t2"]), where=where)
  assert [t.teacher for t in rec.teachers] == ["target_0", "target_1"]
  row = _verl_row(3)
  del row["extra_info"]
  rec = rec_lib.record_from_verl(row, where=where)
  assert rec.uid == "openr1-1" and rec.teachers == ()


# ------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("bad_line, field", [
    ('{"uid": "b", "prompt": "1+1=?", ', None),                          # Bad JSON.
    (json.dumps({"uid": "b", "prompt": "1+1=?", "source": "add"}), "answer"),  # Missing field.
    (json.dumps(_good("b", prompt="   ")), "prompt"),                   # Empty prompt.
    (json.dumps(_good("b", teachers=[{"teacher": "t", "response": 3}])),
     "teachers[0].response"),                                           # Trace not text.
    (json.dumps(_good("b", teachers=[{"teacher": "t"}])), "teachers[0].response"),
    (json.dumps([1, 2]), None),                                         # Not an object.
])
def test_bad_jsonl_line_raises_naming_file_and_line(tmp_path, bad_line, field):
  path = _jsonl(tmp_path, [_good("a"), "", bad_line, _good("c")])
  with pytest.raises(RecordError) as info:
    record_files.read_jsonl(path)
  msg = str(info.value)
  assert path in msg and "line 3" in msg, msg
  assert info.value.field == field
  if field is not None:
    assert repr(field) in msg


def test_teacher_trace_not_text_names_record_and_teacher_index(tmp_path):
  bad = _good("rec-9", teachers=[{"teacher": "a", "response": "x\nAnswer: 1"},
                                 {"teacher": "b", "response": ["not", "text"]}])
  path = _jsonl(tmp_path, [bad])
  with pytest.raises(RecordError, match=r"line 1.*teachers\[1\]\.response.*'rec-9'.*teacher 1"):
    record_files.read_jsonl(path)


def test_duplicate_uid_names_both_lines(tmp_path):
  path = _jsonl(tmp_path, [_good("a"), _good("dup"), _good("b"), _good("dup")])
  with pytest.raises(RecordError) as info:
    record_files.read_jsonl(path)
  msg = str(info.value)
  assert path in msg and "'dup'" in msg and "line 2" in msg and "line 4" in msg, msg


def test_unknown_extension_names_file(tmp_path):
  path = _write_lines(tmp_path / "data.csv", ["a,b"])
  with pytest.raises(RecordError, match="data.csv.*unknown file extension"):
    record_files.read_records(path)


def test_bad_parquet_rows_name_file_and_row(tmp_path):
  path = str(tmp_path / "bad.parquet")
  pq.write_table(pa.Table.from_pylist([_good("a"), _good("b", prompt="")]), path)
  with pytest.raises(RecordError, match=r"bad\.parquet row 2: field 'prompt'"):
    record_files.read_records(path)
  path2 = str(tmp_path / "nocol.parquet")
  pq.write_table(pa.Table.from_pylist([{"uid": "a", "prompt": "p", "source": "s"}]), path2)
  with pytest.raises(RecordError, match=r"nocol\.parquet: field 'answer': column is missing"):
    record_files.read_parquet(path2, on_error="skip")  # A missing column always raises.
  path3 = _write_lines(tmp_path / "fake.parquet", ["not parquet"])
  with pytest.raises(RecordError, match="fake.parquet: cannot read as Parquet"):
    record_files.read_parquet(path3)


def test_bad_verl_rows_name_field(tmp_path):
  path = str(tmp_path / "verl.parquet")
  no_user = _verl_row(2)
  no_user["prompt"] = [{"role": "system", "content": "s"}]
  rows = [_verl_row(1), no_user, _verl_row(3, user=" "), _verl_row(1)]
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(RecordError, match=r"row 2: field 'prompt': has no message with role 'user'"):
    record_files.read_parquet(path)
  recs, stats = record_files.read_parquet(path, layout="verl", on_error="skip")
  assert [r.uid for r in recs] == ["1"]
  assert stats["skipped"] == 3 and stats["read"] == 1
  assert "row 3: field 'prompt'" in stats["errors"][1]
  assert "duplicate uid '1'" in stats["errors"][2] and "row 1" in stats["errors"][2]
  where = rec_lib.Where("v.parquet", 5, "row")
  with pytest.raises(RecordError, match=r"v\.parquet row 5: field 'target\[0\]\.response'"):
    rec_lib.record_from_verl(_verl_row(1, target=[{"role": "assistant", "content": 4}]),
                             where=where)


def test_skip_counts_every_bad_line(tmp_path):
  path = _jsonl(tmp_path, [_good("a"), "{not json", _good("b", prompt=""), _good("c"),
                           _good("a"), json.dumps({"prompt": "x", "answer": "1"})])
  recs, stats = record_files.read_jsonl(path, on_error="skip")
  assert [r.uid for r in recs] == ["a", "c"]
  assert stats["read"] == 2 and stats["skipped"] == 4 and len(stats["errors"]) == 4
  for line, err in zip((2, 3, 5, 6), stats["errors"]):
    assert f"{path} line {line}" in err, err
  with pytest.raises(ValueError, match="on_error"):
    record_files.read_jsonl(path, on_error="ignore")


# ---------------------------------------------------------------------------- validate and write


def test_validate_record_direct():
  good = PromptRecord("u", "p", "1", "s", (TeacherSolution("t", "Answer: 1"),))
  assert rec_lib.validate_record(good, where="mem") is good
  bad = [
      (PromptRecord("", "p", "1", "s"), "uid"),
      (PromptRecord("u", " \n", "1", "s"), "prompt"),
      (PromptRecord("u", "p", 1, "s"), "answer"),
      (PromptRecord("u", "p", "", "s"), "answer"),
      (PromptRecord("u", "p", "1", None), "source"),
      (PromptRecord("u", "p", "1", "s", [TeacherSolution("t", "r")]), "teachers"),
      (PromptRecord("u", "p", "1", "s", ("r",)), "teachers[0]"),
      (PromptRecord("u", "p", "1", "s", (TeacherSolution(3, "r"),)), "teachers[0].teacher"),
      (PromptRecord("u", "p", "1", "s", (TeacherSolution("t", b"r"),)), "teachers[0].response"),
  ]
  for r, field in bad:
    with pytest.raises(RecordError) as info:
      rec_lib.validate_record(r, where="mem.jsonl line 4")
    assert info.value.field == field and "mem.jsonl line 4" in str(info.value)


def test_jsonl_and_gzip_files_read_back_as_written(tmp_path):
  recs = [PromptRecord("a", "12+7=?", "19", "add",
                       (TeacherSolution("running_total", "12+7=19\nAnswer: 19"),)),
          PromptRecord("b", "gcd(4,6)=? — ünïcode", "2", "gcd", ())]
  for name in ("out.jsonl", "out.jsonl.gz"):
    path = str(tmp_path / name)
    assert tiny_runs.write_jsonl(recs, path) == 2
    back, stats = record_files.read_records(path)
    assert back == recs and stats["skipped"] == 0
