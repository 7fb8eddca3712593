"""The one prompt-record schema of dypo_jax: a record, its two on-disk layouts, and the checks
that name the file, line and field of a bad one (`record_files` reads and writes whole files).

A record is a prompt (plain question text, no chat template), its gold answer, where it came from,
and the m teacher solutions that multi-teacher SFT draws from.
"""
import dataclasses
from typing import Any, Mapping

from dypo_jax import errors


@dataclasses.dataclass(frozen=True)
class TeacherSolution:
  teacher: str  # Teacher name, e.g. "running_total" or "deepseek-r1".
  response: str  # The full solution text, ending in the final answer.


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  uid: str  # Unique within a dataset.
  prompt: str  # Question text, no template applied.
  answer: str  # Gold final answer (as text).
  source: str  # Task family or dataset name; the reward registry may key on it.
  teachers: tuple[TeacherSolution, ...] = ()


# --------------------------------------------------------------------------------------------------
# Two on-disk layouts are understood:
#
# * "dypo" (ours), one record per JSONL line or Parquet row:
#     {"uid": str, "prompt": str, "answer": str, "source": str,
#      "teachers": [{"teacher": str, "response": str}, ...]}
#   `prompt`, `answer` and `source` are required. `uid` may be absent: it is then derived as
#   f"{source}-{line}" with `line` the 1-based line (or row) number. `teachers` may be absent or
#   null (no teacher solutions, e.g. an eval set). Extra keys are ignored.
# * "verl" (verl / LUFFY Parquet): `prompt` is a list of chat messages {role, content}; the prompt
#   text is the content of the LAST message whose role is "user" (system messages and earlier turns
#   are ignored, because dypo_jax applies its own template); `reward_model.ground_truth` is the
#   answer; `data_source` the source; `extra_info.index`, when present, the uid (otherwise
#   f"{data_source}-{row}"); LUFFY's optional `target` (a list of {role, content} messages or of
#   strings) gives the teacher solutions. A teacher is named by `extra_info.teachers` (a list, one
#   name per target) or `extra_info.teacher` (one name for all), else "target" for a single target
#   and "target_0", "target_1", ... for several.
#
# In both layouts an integer answer (not a bool) is turned into its decimal text; any other
# non-string answer is an error.
# --------------------------------------------------------------------------------------------------

class RecordError(errors.BadInput):
  """A record (or the file holding it) is malformed.

  The message reads "<file> line|row <n>: field '<field>': <problem>" so that the bad spot can be
  found without a debugger. `where` and `field` are also kept as attributes.
  """

  def __init__(self, where: "Where | str", field: str | None, problem: str):
    self.where = str(where)
    self.field = field
    self.problem = problem
    if field is None:
      msg = f"{self.where}: {problem}"
    else:
      msg = f"{self.where}: field {field!r}: {problem}"
    super().__init__(msg)


@dataclasses.dataclass(frozen=True)
class Where:
  """Location of a record: file path plus 1-based line (JSONL) or row (Parquet) number."""
  path: str
  index: int | None = None
  unit: str = "line"  # "line" or "row".

  def __str__(self) -> str:
    if self.index is None:
      return self.path
    return f"{self.path} {self.unit} {self.index}"


def _type_name(value: Any) -> str:
  return "None" if value is None else type(value).__name__


def validate_record(rec: PromptRecord, *, where: Where | str) -> PromptRecord:
  """Checks the types and contents of one record; returns it unchanged.

  Args:
    rec: the record.
    where: its location (file and line), used in error messages.

  Returns:
    `rec`.

  Raises:
    RecordError: naming `where`, the record's uid and the field at fault.
  """
  if not isinstance(rec, PromptRecord):
    raise RecordError(where, None, f"expected a PromptRecord, got {_type_name(rec)}")
  if not isinstance(rec.uid, str) or not rec.uid.strip():
    raise RecordError(where, "uid", f"must be a non-empty str, got {rec.uid!r}")
  tag = f"record {rec.uid!r}"
  if not isinstance(rec.prompt, str):
    raise RecordError(where, "prompt", f"{tag}: must be a str, got {_type_name(rec.prompt)}")
  if not rec.prompt.strip():
    raise RecordError(where, "prompt", f"{tag}: is empty (or whitespace only)")
  if not isinstance(rec.answer, str):
    raise RecordError(where, "answer", f"{tag}: must be a str, got {_type_name(rec.answer)}")
  if not rec.answer.strip():
    raise RecordError(where, "answer", f"{tag}: is empty (or whitespace only)")
  if not isinstance(rec.source, str):
    raise RecordError(where, "source", f"{tag}: must be a str, got {_type_name(rec.source)}")
  if not isinstance(rec.teachers, tuple):
    raise RecordError(where, "teachers",
                      f"{tag}: must be a tuple of TeacherSolution, got {_type_name(rec.teachers)}")
  for i, sol in enumerate(rec.teachers):
    field = f"teachers[{i}]"
    if not isinstance(sol, TeacherSolution):
      raise RecordError(where, field,
                        f"{tag}: teacher {i} must be a TeacherSolution, got {_type_name(sol)}")
    if not isinstance(sol.teacher, str) or not sol.teacher.strip():
      raise RecordError(where, field + ".teacher",
                        f"{tag}: teacher {i} name must be a non-empty str, got {sol.teacher!r}")
    if not isinstance(sol.response, str):
      raise RecordError(
          where, field + ".response",
          f"{tag}: teacher {i} ({sol.teacher!r}) trace is not text: {_type_name(sol.response)}")
    if not sol.response.strip():
      raise RecordError(where, field + ".response",
                        f"{tag}: teacher {i} ({sol.teacher!r}) trace is empty")
  texts = [("uid", rec.uid), ("prompt", rec.prompt), ("answer", rec.answer),
           ("source", rec.source)]
  for i, sol in enumerate(rec.teachers):
    texts += [(f"teachers[{i}].teacher", sol.teacher), (f"teachers[{i}].response", sol.response)]
  for field, text in texts:
    _check_unicode(text, where=where, field=field, tag=tag)
  return rec


def _check_unicode(text: str, *, where: Where | str, field: str, tag: str) -> None:
  """A lone surrogate (a JSON "\\ud83d" escape without its pair, a file decoded with
  surrogateescape) is no character: the tokenizer would fail on it with no file or record named."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RecordError(where, field, f"{tag}: character {e.start} is a lone surrogate "
                      f"{text[e.start]!r}, which is not valid Unicode (a \\u escape of half a "
                      "pair?)") from None


def _answer_text(value: Any) -> Any:
  """Integer answers become their decimal text; everything else is left to validation."""
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  return value


def _derived_uid(source: Any, where: Where | str, field: str) -> str:
  if not isinstance(where, Where) or where.index is None:
    raise RecordError(where, field, "is missing and there is no line number to derive it from")
  if not isinstance(source, str):
    raise RecordError(where, "source", f"must be a str, got {_type_name(source)}")
  return f"{source}-{where.index}"


def record_from_dict(d: Mapping[str, Any], *, where: Where | str) -> PromptRecord:
  """Builds and validates a record from our own layout (see the comment above RecordError).

  Args:
    d: the decoded JSON object / Parquet row.
    where: its location; a missing uid is derived as f"{source}-{where.index}".

  Returns:
    The validated PromptRecord.

  Raises:
    RecordError: on a missing or malformed field, naming `where` and the field.
  """
  if not isinstance(d, Mapping):
    raise RecordError(where, None, f"expected a JSON object, got {_type_name(d)}")
  for key in ("prompt", "answer", "source"):
    if key not in d:
      raise RecordError(where, key, "is missing")
  uid = d.get("uid")
  if uid is None:
    uid = _derived_uid(d["source"], where, "uid")
  raw_teachers = d.get("teachers")
  if raw_teachers is None:
    raw_teachers = []
  if not isinstance(raw_teachers, (list, tuple)):
    raise RecordError(where, "teachers", f"must be a list, got {_type_name(raw_teachers)}")
  teachers = []
  for i, t in enumerate(raw_teachers):
    if not isinstance(t, Mapping):
      raise RecordError(where, f"teachers[{i}]",
                        f"record {uid!r}: teacher {i} must be an object, got {_type_name(t)}")
    for key in ("teacher", "response"):
      if key not in t:
        raise RecordError(where, f"teachers[{i}].{key}", f"record {uid!r}: is missing")
    teachers.append(TeacherSolution(teacher=t["teacher"], response=t["response"]))
  rec = PromptRecord(uid=uid, prompt=d["prompt"], answer=_answer_text(d["answer"]),
                     source=d["source"], teachers=tuple(teachers))
  return validate_record(rec, where=where)


def _message_content(msg: Any, where: Where | str, field: str) -> Any:
  if isinstance(msg, str):
    return msg
  if isinstance(msg, Mapping):
    if "content" not in msg:
      raise RecordError(where, field + ".content", "is missing")
    return msg["content"]
  raise RecordError(where, field, f"must be a chat message or a str, got {_type_name(msg)}")


def record_from_verl(row: Mapping[str, Any], *, where: Where | str) -> PromptRecord:
  """Builds and validates a record from a verl / LUFFY row (see the comment above RecordError).

  Args:
    row: one row as a dict (e.g. from `pyarrow.Table.to_pylist()`).
    where: its location, used in errors and to derive a uid when `extra_info.index` is absent.

  Returns:
    The validated PromptRecord.

  Raises:
    RecordError: on a missing or malformed field, naming `where` and the field.
  """
  if not isinstance(row, Mapping):
    raise RecordError(where, None, f"expected a row object, got {_type_name(row)}")
  for key in ("prompt", "reward_model", "data_source"):
    if key not in row or row[key] is None:
      raise RecordError(where, key, "is missing")
  source = row["data_source"]

  messages = row["prompt"]
  if isinstance(messages, str):
    prompt = messages
  elif isinstance(messages, (list, tuple)):
    prompt = None
    for i, msg in enumerate(messages):
      if not isinstance(msg, Mapping):
        raise RecordError(where, f"prompt[{i}]",
                          f"must be a chat message {{role, content}}, got {_type_name(msg)}")
      if msg.get("role") == "user":
        prompt = _message_content(msg, where, f"prompt[{i}]")
    if prompt is None:
      raise RecordError(where, "prompt", "has no message with role 'user'")
  else:
    raise RecordError(where, "prompt",
                      f"must be a list of chat messages, got {_type_name(messages)}")

  reward_model = row["reward_model"]
  if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
    raise RecordError(where, "reward_model.ground_truth", "is missing")
  answer = reward_model["ground_truth"]
  if isinstance(answer, (list, tuple)):
    if len(answer) != 1:
      raise RecordError(where, "reward_model.ground_truth",
                        f"holds {len(answer)} answers; a record holds exactly one")
    answer = answer[0]
  answer = _answer_text(answer)

  extra = row.get("extra_info") or {}
  if not isinstance(extra, Mapping):
    raise RecordError(where, "extra_info", f"must be an object, got {_type_name(extra)}")
  if extra.get("index") is not None:
    uid = str(extra["index"])
  else:
    uid = _derived_uid(source, where, "extra_info.index")

  targets = row.get("target")
  if targets is None:
    targets = []
  elif isinstance(targets, (str, Mapping)):
    targets = [targets]
  if not isinstance(targets, (list, tuple)):
    raise RecordError(where, "target", f"must be a list, got {_type_name(targets)}")
  names = extra.get("teachers")
  if names is not None:
    if not isinstance(names, (list, tuple)) or len(names) != len(targets):
      raise RecordError(where, "extra_info.teachers",
                        f"record {uid!r}: must list one name per target ({len(targets)})")
  elif extra.get("teacher") is not None:
    names = [extra["teacher"]] * len(targets)
  elif len(targets) == 1:
    names = ["target"]
  else:
    names = [f"target_{i}" for i in range(len(targets))]
  teachers = tuple(
      TeacherSolution(teacher=name, response=_message_content(t, where, f"target[{i}]"))
      for i, (name, t) in enumerate(zip(names, targets)))
  # validate_record names these teachers[i]; say which verl field they came from.
  try:
    return validate_record(
        PromptRecord(uid=uid, prompt=prompt, answer=answer, source=source, teachers=teachers),
        where=where)
  except RecordError as e:
    if e.field and e.field.startswith("teachers["):
      raise RecordError(where, "target" + e.field[len("teachers"):], e.problem) from None
    if e.field == "answer":
      raise RecordError(where, "reward_model.ground_truth", e.problem) from None
    if e.field == "source":
      raise RecordError(where, "data_source", e.problem) from None
    raise


def record_to_dict(rec: PromptRecord) -> dict[str, Any]:
  """The record in our JSONL layout."""
  return {"uid": rec.uid, "prompt": rec.prompt, "answer": rec.answer, "source": rec.source,
          "teachers": [{"teacher": t.teacher, "response": t.response} for t in rec.teachers]}
