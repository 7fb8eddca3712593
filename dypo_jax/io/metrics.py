"""Run logging: a JSONL + TensorBoard writer, a tolerant JSONL reader, console progress, plots.

`workdir/metrics.jsonl` holds one JSON object per logged step, `{"step": s, "<key>": value, ...}`,
with non-finite values written as the strings "nan", "inf", "-inf" (so every line is valid JSON);
`read_jsonl` turns them back into floats. The metric keys the trainer logs are listed in
`METRIC_KEYS` (METHOD.md §6); per-teacher keys follow `sft/teacher_<name>_count|_loss`.

After a restart from a checkpoint the trainer re-logs the steps after that checkpoint; readers that
need one value per step use `merge_by_step` (the line written last wins, key by key).
"""
import collections
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dypo_jax.io import fileio
from dypo_jax.io import paths

METRICS_FILENAME = "metrics.jsonl"
TB_DIRNAME = "tb"

METRIC_KEYS = (
    "reward/binary", "reward/shaped", "reward/timeouts", "reward/errors",
    "route/easy_frac", "route/mid_frac", "route/hard_frac",
    "batch/offline_ratio", "queue/hard", "queue/mid",
    "policy/entropy", "policy/kl", "policy/clip_frac",
    "response/len_mean", "response/len_max", "response/truncated_frac",
    "grad/norm", "grad/norm_sft", "grad/norm_grpo", "grad/norm_gal",
    "gal/pairs", "gal/pair_acc", "gal/margin", "gal/eta",
    "sft/loss", "sft/no_teacher_skipped",  # Plus sft/teacher_<name>_count, sft/teacher_<name>_loss.
    "loss/total", "loss/grpo", "loss/gal", "loss/sft",
    "perf/rollout_tok_s", "perf/update_tok_s",
    "time/rollout_s", "time/reward_s", "time/update_s", "time/step_s",
    "train/nonfinite_skipped", "lr",
)

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_number(key: str, value: Any) -> int | float | str:
  """A metric value as an int, a finite float or "nan"/"inf"/"-inf"; ValueError names the key."""
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  try:
    arr = np.asarray(value)  # Python / numpy floats and 0-d (jax) arrays.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"metric {key!r}: value {value!r} is not a number") from e
  if arr.shape != () or arr.dtype.kind in "USOM":
    raise ValueError(f"metric {key!r}: value of type {type(value).__name__}, shape {arr.shape}, "
                     f"dtype {arr.dtype} is not a scalar number")
  if arr.dtype.kind in "biu":
    return int(arr)
  try:
    x = float(arr)  # Also bfloat16 and other ml_dtypes floats.
  except (TypeError, ValueError) as e:
    raise ValueError(f"metric {key!r}: dtype {arr.dtype} is not a number") from e
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return x


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without torch when torch is not loaded yet: tensorboardX
  imports torch (when installed) only to accept its tensors, 1.3 s of a tiny run's 9-second
  start on a CPU (measured), and this writer logs Python floats."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX.SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]  # Whoever imports torch later gets it.
  return tensorboardX.SummaryWriter


class MetricsWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`).

  With `enabled=False` (non-zero processes) every call is a no-op and nothing is created. A
  bucket has no append: for a remote workdir both files are written in a local staging folder
  (started from the bucket's copy) and uploaded whole by `sync()`, which the trainer calls with
  every checkpoint, and which `write` calls itself every `sync_every_s` seconds. A resumed run
  logs again from its checkpoint's step, so nothing a checkpoint covers is ever missing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, sync_every_s: float = 60.0):
    self.enabled = enabled
    self.path = paths.join(workdir, METRICS_FILENAME)
    self._file = None
    self._tb = None
    self._remote = paths.is_remote(workdir)
    self._workdir, self._sync_every_s, self._synced = workdir, sync_every_s, time.monotonic()
    if not enabled:
      return
    paths.makedirs(workdir)
    local_dir = paths.staging_dir(workdir) if self._remote else workdir
    self._local = os.path.join(local_dir, METRICS_FILENAME)
    self._local_tb = os.path.join(local_dir, TB_DIRNAME)
    if self._remote:  # The bucket's copy is the truth; the staging folder may be stale.
      data = paths.read_bytes(self.path) if paths.exists(self.path) else b""
      fileio.atomic_write_bytes(self._local, data)
      shutil.rmtree(self._local_tb, ignore_errors=True)
      if paths.isdir(paths.join(workdir, TB_DIRNAME)):
        paths.download_tree(paths.join(workdir, TB_DIRNAME), self._local_tb)
    _drop_partial_last_line(self._local)
    self._file = open(self._local, "a", encoding="utf-8")
    self._tb = _summary_writer_class()(logdir=self._local_tb)

  def sync(self) -> None:
    """Uploads the staged files of a remote workdir (a no-op for a local one)."""
    if not self.enabled or not self._remote or self._file is None:
      return
    self._file.flush()
    self._tb.flush()
    with open(self._local, "rb") as f:
      paths.write_bytes(self.path, f.read())
    paths.upload_tree(self._local_tb, paths.join(self._workdir, TB_DIRNAME))
    self._synced = time.monotonic()

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **metrics}` as one line (flushed) and as TensorBoard scalars."""
    if not self.enabled:
      return
    if self._file is None:
      raise ValueError(f"MetricsWriter for {self.path} is closed")
    record = {"step": int(step)}
    for key, value in metrics.items():
      if not isinstance(key, str) or key == "step":
        raise ValueError(f"metric key {key!r}: keys must be strings other than 'step'")
      record[key] = _json_number(key, value)
    self._reopen_if_gone(record["step"])
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key != "step":
        self._tb.add_scalar(key, _NONFINITE.get(value, value), global_step=record["step"])
    self._tb.flush()
    if self._remote and time.monotonic() - self._synced >= self._sync_every_s:
      self.sync()

  def _reopen_if_gone(self, step: int) -> None:
    """A log file deleted (or replaced) under the run is recreated, and said once, instead of
    taking every later line into the deleted file's inode."""
    try:
      same = os.path.samestat(os.fstat(self._file.fileno()), os.stat(self._local))
    except FileNotFoundError:
      same = False
    if same:
      return
    self._file.close()
    self._file = open(self._local, "a", encoding="utf-8")
    print(f"metrics: WARNING {self._local} was deleted or replaced during the run; it is "
          f"written again from step {step} on (the lines before are not in it)",
          file=sys.stderr, flush=True)

  def close(self, *, sync: bool = True) -> None:
    """`sync=False`: leaves a remote workdir's copy as it is (a run that lost the workdir's lock
    must not replace the new holder's logs with its own)."""
    if sync:
      self.sync()
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _drop_partial_last_line(path: str) -> None:
  """Cuts an unterminated last line (a write killed midway) so appends start on a fresh line.

  The fragment is logged, so what it held stays on record.
  """
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    logging.warning("%s: dropping an unterminated last line (a write was interrupted): %r",
                    path, data[keep:][:500])
    f.truncate(keep)


def _decode(value: Any) -> Any:
  if isinstance(value, str) and value in _NONFINITE:
    return _NONFINITE[value]
  return value


def read_jsonl(path: str, *, skip_malformed: bool = False) -> list[dict[str, Any]]:
  """Reads a metrics / eval JSONL file; "nan"/"inf"/"-inf" strings become floats.

  An unterminated last line that does not parse (the process was killed mid-write) is skipped with
  a warning; any other line that does not parse to a JSON object raises ValueError naming it, or
  with `skip_malformed` (a run's end-of-run report: a damaged log line must not lose the rest) is
  skipped with a warning naming it too.
  """
  if not paths.exists(path):
    raise FileNotFoundError(f"metrics file {path} does not exist")
  lines = paths.read_bytes(path).decode("utf-8", errors="replace").split("\n")
  # After split, a terminated file ends with "", so lines[-1] is the unterminated tail if any.
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        logging.warning("%s: skipping truncated last line %d: %r", path, i + 1, line[:200])
        continue
      obj, problem = None, f"malformed JSON line ({e}): {line[:200]!r}"
    else:
      problem = (None if isinstance(obj, dict)
                 else f"expected a JSON object, got {type(obj).__name__}")
    if problem is not None:
      if not skip_malformed:
        raise ValueError(f"{path}:{i + 1}: {problem}")
      logging.warning("skipped %s:%d: %s", path, i + 1, problem)
      continue
    records.append({k: _decode(v) for k, v in obj.items()})
  return records


def merge_by_step(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One record per step, sorted by step; for a step logged twice the later value of a key wins."""
  merged: dict[int, dict[str, Any]] = {}
  for rec in records:
    if "step" not in rec:
      continue
    merged.setdefault(int(rec["step"]), {}).update(rec)
  return [merged[s] for s in sorted(merged)]


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _fmt(value: Any) -> str:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return str(int(value))
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)


class Progress:
  """A one-line console progress report with an ETA from a moving average of the step time."""

  def __init__(self, total_steps: int, *, start_step: int = 0, window: int = 20,
               clock=time.monotonic):
    """`start_step`: the step the run (re)starts from; `window`: reports in the moving average."""
    if total_steps <= 0:
      raise ValueError(f"Progress(total_steps={total_steps}): must be positive")
    if window < 1:
      raise ValueError(f"Progress(window={window}): must be at least 1")
    self.total_steps = total_steps
    self._clock = clock
    self._t0 = clock()
    # (time, step) of the last `window` + 1 reports; the first is the construction point.
    self._points = collections.deque([(self._t0, start_step)], maxlen=window + 1)

  def line(self, step: int, metrics: Mapping[str, Any] | None = None, *,
           keys: Sequence[str] = ("reward/binary", "route/hard_frac", "loss/total")) -> str:
    """E.g. `step 120/1000 (12.0%) | elapsed 0:01:23 | ETA 0:10:02 | 1.45 steps/s | k=v ...`."""
    now = self._clock()
    if step > self._points[-1][1]:
      self._points.append((now, step))
    (t_first, s_first), (t_last, s_last) = self._points[0], self._points[-1]
    rate = (s_last - s_first) / (t_last - t_first) if t_last > t_first else math.nan
    eta = (self.total_steps - step) / rate if rate > 0 else math.nan
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)",
             f"elapsed {_hms(now - self._t0)}", f"ETA {_hms(max(eta, 0.0))}",
             f"{rate:.3g} steps/s"]
    metrics = metrics or {}
    shown = [f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics]
    if shown:
      parts.append(" ".join(shown))
    return " | ".join(parts)


# (file name, title, y label, keys, log y) of each plot `plot_run` makes from the keys present.
_PLOTS = (
    ("reward.png", "Reward", "mean reward", ("reward/binary", "reward/shaped"), False),
    ("offline_ratio.png", "Offline data ratio (Hard fraction of the update batch)", "ratio",
     ("batch/offline_ratio",), False),
    ("routing.png", "Difficulty routing", "fraction of prompts",
     ("route/easy_frac", "route/mid_frac", "route/hard_frac"), False),
    ("queues.png", "Queue depths", "items", ("queue/hard", "queue/mid"), False),
    ("entropy.png", "Policy entropy", "nats / token", ("policy/entropy",), False),
    ("grad_norm.png", "Gradient norm by term", "L2 norm",
     ("grad/norm", "grad/norm_sft", "grad/norm_grpo", "grad/norm_gal"), True),
    ("loss.png", "Losses", "loss", ("loss/total", "loss/sft", "loss/grpo", "loss/gal"), False),
    ("response_len.png", "Response length", "tokens", ("response/len_mean", "response/len_max"),
     False),
)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  steps, values = [], []
  for rec in records:
    value = rec.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      steps.append(rec["step"])
      values.append(float(value))
  return np.asarray(steps), np.asarray(values, np.float64)


def _plot(path: str, title: str, ylabel: str, series: dict[str, tuple[np.ndarray, np.ndarray]],
          logy: bool) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, (x, y) in series.items():
    ax.plot(x, y, label=label, marker="." if len(x) < 30 else None)
  finite = np.concatenate([y[np.isfinite(y)] for _, y in series.values()])
  if logy and finite.size and (finite > 0).all():
    ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  paths.write_bytes(path, png.getvalue())


def _eval_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """Aggregate eval keys (`id/<metric>`, `ood/<metric>`), else every numeric key."""
  keys = []
  for rec in records:
    for k, v in rec.items():
      if k != "step" and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
        keys.append(k)
  split = [k for k in keys if k.count("/") == 1 and k.split("/")[0] in ("id", "ood")]
  return split or keys


def plot_run(metrics_path: str, out_dir: str, *, eval_path: str | None = None,
             skip_malformed: bool = False) -> list[str]:
  """Writes PNG plots of a run (each only if some of its keys were logged); returns their paths.

  Plots: reward, offline data ratio, routing fractions, queue depths, entropy, gradient norm by
  term, losses, response length, and eval accuracy from `eval_path` (lines like
  `{"step": s, "id/pass@1": x, "ood/pass@1": y}`).
  """
  records = merge_by_step(read_jsonl(metrics_path, skip_malformed=skip_malformed))
  paths.makedirs(out_dir)
  written = []
  for filename, title, ylabel, keys, logy in _PLOTS:
    series = {k: _series(records, k) for k in keys}
    series = {k: v for k, v in series.items() if v[0].size}
    if series:
      path = paths.join(out_dir, filename)
      _plot(path, title, ylabel, series, logy)
      written.append(path)
  if eval_path is not None:
    evals = merge_by_step(read_jsonl(eval_path, skip_malformed=skip_malformed))
    series = {k: _series(evals, k) for k in _eval_keys(evals)}
    series = {k: v for k, v in series.items() if v[0].size}
    if series:
      path = paths.join(out_dir, "eval.png")
      _plot(path, "Evaluation accuracy", "accuracy", series, False)
      written.append(path)
  return written
