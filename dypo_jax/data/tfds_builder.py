"""Packages prompt records (JSONL / Parquet files, or the procedural tasks) as a TFDS dataset.

No TensorFlow is involved: the builder writes ArrayRecord files, and reading goes through
`tfds.data_source` (random access, for grain). Layout under `data_dir`:

    <data_dir>/<name>/<VERSION>/<name>-<split>.array_record-00000-of-00001, dataset_info.json,
                                features.json, metadata.json ({"read_stats": {split: stats}})

Splits: "train" (required), "eval_id", "eval_ood" (optional), each from one file read by
`record_files.read_records`, or generated from the procedural tasks (`--procedural`). Examples
keep the order of their file (TFDS shuffling is disabled).
Features: uid, prompt, answer, source (text) and teachers, a sequence of {teacher, response}
(text). TFDS gives text back as bytes; `example_to_record` decodes it.

The dataset name is chosen per call: one builder class per name is made on the fly and kept out
of TFDS's global registry, so any number of datasets can be built in one process. Reading needs
no builder class at all (TFDS reads dataset_info.json from `data_dir`). A run reads a built
dataset with `data.source="tfds"` (`read_split`: through grain, each example validated as a
record file's line is).

CLI:
    python -m dypo_jax.data.tfds_builder --name=arith --data_dir=/data/tfds \\
        --train=train.jsonl [--eval_id=eval_id.jsonl] [--eval_ood=eval_ood.jsonl] \\
        [--on_error=skip] [--overwrite]
    python -m dypo_jax.data.tfds_builder --name=arith --data_dir=/data/tfds --procedural \\
        [--id_tasks=add,mul] [--ood_tasks=add_long] [--num_train=2000] [--num_eval_id=200] \\
        [--num_eval_ood=200] [--seed=0]
"""
import argparse
import json
import os
import re
import sys
import tempfile
import types
from typing import Any, Mapping, Sequence

import grain
import tensorflow_datasets as tfds

from dypo_jax.data import record_files
from dypo_jax.data import records as records_lib
from dypo_jax.data import tasks
from dypo_jax.io import paths

__all__ = [
    "SPLITS", "VERSION", "build_dataset", "build_from_records", "data_source", "dataset_dir",
    "example_to_record", "load_split", "main", "read_build_stats", "read_split",
    "record_to_example", "records_dataset", "split_names",
]

SPLITS = ("train", "eval_id", "eval_ood")
VERSION = "1.0.0"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TEXT_FIELDS = ("uid", "prompt", "answer", "source")


def _check_name(name: str) -> None:
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise ValueError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")


def dataset_dir(name: str, *, data_dir: str | os.PathLike) -> str:
  """The folder that holds the built dataset `name` (version VERSION)."""
  _check_name(name)
  return os.path.join(os.fspath(data_dir), name, VERSION)


def record_to_example(rec: records_lib.PromptRecord) -> dict[str, Any]:
  """A PromptRecord as a TFDS example (a dict matching the builder's features)."""
  return {"uid": rec.uid, "prompt": rec.prompt, "answer": rec.answer, "source": rec.source,
          "teachers": [{"teacher": t.teacher, "response": t.response} for t in rec.teachers]}


def _text(value: Any, where: str, field: str) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise records_lib.RecordError(where, field, f"not valid UTF-8 ({e.reason})") from None
  if isinstance(value, str):
    return value
  if hasattr(value, "item") and getattr(value, "shape", None) == ():  # A numpy scalar.
    return _text(value.item(), where, field)
  raise records_lib.RecordError(where, field, f"expected text, got {type(value).__name__}")


def example_to_record(example: Mapping[str, Any], *,
                      where: str = "TFDS example") -> records_lib.PromptRecord:
  """Decodes a TFDS example (bytes) back into a validated PromptRecord.

  Raises:
    RecordError: naming `where` and the field when the example is not one of ours.
  """
  if not isinstance(example, Mapping):
    raise records_lib.RecordError(where, None,
                                  f"expected a feature dict, got {type(example).__name__}")
  for key in (*_TEXT_FIELDS, "teachers"):
    if key not in example:
      raise records_lib.RecordError(where, key, "is missing")
  fields = {key: _text(example[key], where, key) for key in _TEXT_FIELDS}
  teachers = example["teachers"]
  if not isinstance(teachers, Mapping) or not {"teacher", "response"} <= set(teachers):
    raise records_lib.RecordError(where, "teachers",
                                  "expected a dict of 'teacher' and 'response' sequences")
  names, responses = list(teachers["teacher"]), list(teachers["response"])
  if len(names) != len(responses):
    raise records_lib.RecordError(where, "teachers", f"{len(names)} teacher names but "
                                  f"{len(responses)} responses")
  sols = tuple(
      records_lib.TeacherSolution(teacher=_text(n, where, f"teachers[{i}].teacher"),
                                  response=_text(r, where, f"teachers[{i}].response"))
      for i, (n, r) in enumerate(zip(names, responses)))
  return records_lib.validate_record(records_lib.PromptRecord(**fields, teachers=sols),
                                     where=where)


class _PromptsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes in-memory PromptRecords, one list per split; subclassed per dataset name."""

  RELEASE_NOTES = {VERSION: "PromptRecords: uid, prompt, answer, source, teachers."}
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, splits: Mapping[str, Sequence[records_lib.PromptRecord]],
               read_stats: Mapping[str, Any], **kwargs):
    self._records = dict(splits)
    self._read_stats = dict(read_stats)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    features = tfds.features.FeaturesDict({
        "uid": text(doc="Unique within the dataset."),
        "prompt": text(doc="Question text, no template applied."),
        "answer": text(doc="Gold final answer."),
        "source": text(doc="Task family or dataset name."),
        "teachers": tfds.features.Sequence(
            {"teacher": text(doc="Teacher name."), "response": text(doc="Solution text.")}),
    })
    return tfds.core.DatasetInfo(
        builder=self, description="dypo_jax prompt records (dypo_jax.data.records.PromptRecord).",
        features=features, disable_shuffling=True,
        metadata=tfds.core.MetadataDict(read_stats=self._read_stats))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local and already read.
    return {split: self._generate_examples(recs) for split, recs in self._records.items()}

  def _generate_examples(self, recs):
    for i, rec in enumerate(recs):
      yield i, record_to_example(rec)


def _builder_class(name: str) -> type:
  return types.new_class("DypoPrompts", (_PromptsBuilder,), {"skip_registration": True},
                         lambda ns: ns.update(name=name))


def build_dataset(name: str, *, data_dir: str | os.PathLike, train_path: str | os.PathLike,
                  eval_id_path: str | os.PathLike | None = None,
                  eval_ood_path: str | os.PathLike | None = None,
                  on_error: record_files.OnError = "raise",
                  layout: record_files.Layout = "auto", overwrite: bool = False) -> str:
  """Reads the split files and writes them as the TFDS dataset `name` under `data_dir`.

  Every file is read (and validated) before anything is written.

  Args:
    name: dataset name, snake_case.
    data_dir: TFDS data folder.
    train_path: records of the "train" split (.jsonl, .jsonl.gz, .json.gz, .parquet).
    eval_id_path: records of "eval_id", optional.
    eval_ood_path: records of "eval_ood", optional.
    on_error: "raise" stops at the first bad record; "skip" skips bad records and counts them in
      metadata.json (see `read_build_stats`).
    layout: passed to `record_files.read_records` ("auto", "dypo" or "verl").
    overwrite: replace an existing build of `name`; without it an existing build is an error.

  Returns:
    The folder of the built dataset (`dataset_dir(name, data_dir=data_dir)`).

  Raises:
    RecordError: naming the file, the line (or row) and the field of a bad record, or a file
      that holds no usable record.
    ValueError: on a bad name, or an existing build without `overwrite`.
  """
  out = dataset_dir(name, data_dir=data_dir)
  if paths.exists(paths.join(out, "dataset_info.json")) and not overwrite:  # Before any read.
    raise ValueError(f"dataset {name!r} already exists at {out}; pass overwrite=True "
                     "(CLI: --overwrite) to rebuild it")
  files = {"train": train_path, "eval_id": eval_id_path, "eval_ood": eval_ood_path}
  splits, stats = {}, {}
  for split, path in files.items():
    if path is None:
      continue
    path = os.fspath(path)
    recs, st = record_files.read_records(path, layout=layout, on_error=on_error)
    if not recs:
      raise records_lib.RecordError(path, None, f"holds no usable record for split {split!r} "
                                    f"({st['skipped']} skipped)")
    splits[split], stats[split] = recs, {"path": path, **st}
  return build_from_records(name, data_dir=data_dir, splits=splits, read_stats=stats,
                            overwrite=overwrite)


def build_from_records(name: str, *, data_dir: str | os.PathLike,
                       splits: Mapping[str, Sequence[records_lib.PromptRecord]],
                       read_stats: Mapping[str, Any] | None = None,
                       overwrite: bool = False) -> str:
  """Writes in-memory records, {split: records} ("train" required), as the TFDS dataset `name`.

  `read_stats` ({split: stats}) goes to metadata.json; by default each split's count, with no
  source file. Returns the dataset folder; raises ValueError as `build_dataset` does, and on a
  split outside SPLITS, a missing or empty "train", or a duplicate uid within a split.
  """
  out = dataset_dir(name, data_dir=data_dir)
  if paths.exists(paths.join(out, "dataset_info.json")) and not overwrite:
    raise ValueError(f"dataset {name!r} already exists at {out}; pass overwrite=True "
                     "(CLI: --overwrite) to rebuild it")
  unknown = sorted(set(splits) - set(SPLITS))
  if unknown or not splits.get("train"):
    raise ValueError(f"splits {sorted(splits)}: need a non-empty 'train', and only {SPLITS}")
  for split, recs in splits.items():  # A reader would refuse the duplicate: refuse it now.
    seen = set()
    for i, rec in enumerate(recs):
      if rec.uid in seen:
        raise records_lib.RecordError(f"split {split!r} record {i}", "uid",
                                      f"duplicate uid {rec.uid!r}")
      seen.add(rec.uid)
  if read_stats is None:
    read_stats = {s: {"path": None, "read": len(r), "skipped": 0, "errors": []}
                  for s, r in splits.items()}
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder = _builder_class(name)(splits=splits, read_stats=read_stats,
                                 data_dir=os.fspath(data_dir), file_format="array_record")
  # Nothing is downloaded; keep TFDS's download folder out of data_dir.
  with tempfile.TemporaryDirectory(prefix="dypo_tfds_dl_") as download_dir:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(download_mode=mode))
  return os.fspath(builder.data_dir)


def read_build_stats(name: str, *, data_dir: str | os.PathLike) -> dict[str, Any]:
  """{split: {"path", "read", "skipped", "errors"}} recorded by `build_dataset`."""
  path = paths.join(dataset_dir(name, data_dir=data_dir), "metadata.json")
  try:
    return json.loads(paths.read_bytes(path))["read_stats"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path}: no build stats ({e!r}); was the dataset built by "
                     "dypo_jax.data.tfds_builder?") from e


def data_source(name: str, split: str, data_dir: str | os.PathLike):
  """A random-access source (len, [i]) of the split's raw TFDS examples, for grain.

  Raises:
    ValueError: naming the dataset folder when the dataset or the split is absent.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  builder = _open(name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"dataset {name!r} at {builder.data_dir} has no split {split!r} "
                     f"(splits: {sorted(builder.info.splits)})")
  return builder.as_data_source(split=split)


def _open(name: str, data_dir: str | os.PathLike):
  folder = dataset_dir(name, data_dir=data_dir)
  if not paths.exists(paths.join(folder, "dataset_info.json")):
    raise ValueError(f"no dataset {name!r} in {os.fspath(data_dir)} (looked for {folder}); "
                     "build it with python -m dypo_jax.data.tfds_builder")
  return tfds.builder_from_directory(folder)


def split_names(name: str, *, data_dir: str | os.PathLike) -> list[str]:
  """The splits the built dataset `name` holds; ValueError naming the folder when it is absent."""
  return sorted(_open(name, data_dir).info.splits)


def read_split(name: str, split: str, *, data_dir: str | os.PathLike,
               on_error: record_files.OnError = "raise"
               ) -> tuple[list[records_lib.PromptRecord], dict[str, Any]]:
  """The split's records read through grain, checked as `record_files.read_records` checks a file.

  Every example is decoded and validated (`example_to_record`), and uids must be unique; a bad
  one is named by dataset folder, split and 0-based example index.

  Returns:
    (records, stats), stats = {"read", "skipped", "errors"} as for a record file.

  Raises:
    RecordError: (on_error="raise") at the first bad example.
    ValueError: when the dataset or the split is absent (see `data_source`).
  """
  where = f"{dataset_dir(name, data_dir=data_dir)} split {split!r}"
  examples = grain.MapDataset.source(data_source(name, split, data_dir))
  col = record_files.Collector(where, on_error, "example")
  for i in range(len(examples)):
    try:
      rec = example_to_record(examples[i], where=f"{where} example {i}")
    except records_lib.RecordError as e:
      col.fail(e)
      continue
    col.add(rec, i)
  return col.finish(None)


def records_dataset(name: str, split: str, *, data_dir: str | os.PathLike) -> grain.MapDataset:
  """The split as a grain MapDataset of PromptRecords (decoded on access)."""
  where = f"{dataset_dir(name, data_dir=data_dir)} split {split!r}"
  return grain.MapDataset.source(data_source(name, split, data_dir)).map(
      lambda ex: example_to_record(ex, where=where))


def load_split(name: str, split: str, *,
               data_dir: str | os.PathLike) -> list[records_lib.PromptRecord]:
  """All records of the split, in file order, text decoded to str.

  Raises:
    RecordError: naming the dataset folder, split and example of an undecodable example.
  """
  return read_split(name, split, data_dir=data_dir)[0]


def _task_names(text: str, known: Mapping[str, Any], flag: str) -> list[str]:
  names = [n for n in text.split(",") if n]
  unknown = [n for n in names if n not in known]
  if not names or unknown:
    raise ValueError(f"{flag}={text!r}: expected comma-separated task names from "
                     f"{sorted(known)}")
  return names


def _procedural_splits(args) -> dict[str, list[records_lib.PromptRecord]]:
  """The procedural tasks' records (what data.source="procedural" generates for the same seed)."""
  id_names = _task_names(args.id_tasks, tasks.ID_TASKS, "--id_tasks")
  ood_names = _task_names(args.ood_tasks, tasks.OOD_TASKS, "--ood_tasks")
  gen = lambda names, num, split: tasks.generate(names, num=num, seed=args.seed, split=split)
  splits = {"train": gen(id_names, args.num_train, "train"),
            "eval_id": gen(id_names, args.num_eval_id, "eval"),
            "eval_ood": gen(ood_names, args.num_eval_ood, "eval")}
  return {split: recs for split, recs in splits.items() if recs}


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI (see the module docstring); prints the dataset folder and per-split counts."""
  parser = argparse.ArgumentParser(prog="python -m dypo_jax.data.tfds_builder",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="dataset name, snake_case")
  parser.add_argument("--data_dir", required=True, help="TFDS data folder")
  parser.add_argument("--train", default=None, help="train split file (.jsonl / .parquet)")
  parser.add_argument("--eval_id", default=None, help="in-distribution eval split file")
  parser.add_argument("--eval_ood", default=None, help="out-of-distribution eval split file")
  parser.add_argument("--on_error", choices=("raise", "skip"), default="raise")
  parser.add_argument("--layout", choices=("auto", "dypo", "verl"), default="auto")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
  parser.add_argument("--procedural", action="store_true",
                      help="generate the splits from dypo_jax.data.tasks instead of files")
  parser.add_argument("--id_tasks", default="add", help="--procedural: train / eval_id tasks")
  parser.add_argument("--ood_tasks", default="add_long", help="--procedural: eval_ood tasks")
  parser.add_argument("--num_train", type=int, default=2000)
  parser.add_argument("--num_eval_id", type=int, default=200)
  parser.add_argument("--num_eval_ood", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.procedural == (args.train is not None) or (
      args.procedural and (args.eval_id or args.eval_ood)):
    parser.error("give either --train (and optional --eval_id / --eval_ood) or --procedural")
  try:
    if args.procedural:
      path = build_from_records(args.name, data_dir=args.data_dir,
                                splits=_procedural_splits(args), overwrite=args.overwrite)
    else:
      path = build_dataset(args.name, data_dir=args.data_dir, train_path=args.train,
                           eval_id_path=args.eval_id, eval_ood_path=args.eval_ood,
                           on_error=args.on_error, layout=args.layout, overwrite=args.overwrite)
  except ValueError as e:  # RecordError included: its message names file, line and field.
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(path)
  for split, st in read_build_stats(args.name, data_dir=args.data_dir).items():
    origin = f" ({st['path']})" if st["path"] else ""
    print(f"{split}: {st['read']} records, {st['skipped']} skipped{origin}")
    for msg in st["errors"]:
      print(f"  skipped: {msg}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
