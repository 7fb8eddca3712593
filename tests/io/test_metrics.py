"""Tests for dypo_jax.io.metrics: JSONL round trip, truncation, TensorBoard, progress, plots."""
import glob
import json
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dypo_jax.io import metrics

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_jsonl_round_trip_with_nonfinite(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as w:
    w.write(1, {"reward/binary": 0.5, "queue/hard": np.int64(3), "grad/norm": np.float32(2.5),
                "loss/total": float("nan"), "lr": float("inf"), "policy/kl": -float("inf"),
                "flag": True})
    w.write(2, {"reward/binary": np.float64(0.75)})
  path = os.path.join(str(tmp_path), metrics.METRICS_FILENAME)
  for line in open(path):
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
  recs = metrics.read_jsonl(path)
  assert len(recs) == 2
  r = recs[0]
  assert r["step"] == 1 and r["reward/binary"] == 0.5 and r["grad/norm"] == 2.5
  assert r["queue/hard"] == 3 and isinstance(r["queue/hard"], int) and r["flag"] == 1
  assert math.isnan(r["loss/total"]) and r["lr"] == math.inf and r["policy/kl"] == -math.inf
  assert recs[1] == {"step": 2, "reward/binary": 0.75}


def test_write_rejects_bad_values(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as w:
    with pytest.raises(ValueError, match="'bad'"):
      w.write(0, {"bad": np.zeros(3)})
    with pytest.raises(ValueError, match="'name'"):
      w.write(0, {"name": "abc"})
    with pytest.raises(ValueError, match="step"):
      w.write(0, {"step": 1})


def test_disabled_writer_creates_nothing(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path / "run"), enabled=False)
  w.write(0, {"x": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()


def test_truncated_last_line_tolerated_middle_line_is_error(tmp_path, caplog):
  path = str(tmp_path / "m.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')  # Killed mid-write.
  with caplog.at_level("WARNING"):
    recs = metrics.read_jsonl(path)
  assert [r["step"] for r in recs] == [1, 2]
  assert "truncated last line" in caplog.text
  with open(path, "w") as f:
    f.write('{"step": 1, "a": 1.0}\n{"step": 2, "a\n{"step": 3, "a": 3.0}\n')
  with pytest.raises(ValueError, match=r"m\.jsonl:2"):
    metrics.read_jsonl(path)


def test_the_end_of_run_report_skips_a_damaged_line_and_names_it(tmp_path, caplog):
  from dypo_jax.io import report  # pylint: disable=g-import-not-at-top
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "reward/binary": 0.1}\n{"step": 2, "rew\n{"step": 3, "reward/binary": 0.3}\n')
  (tmp_path / "eval.jsonl").write_text(
      '{"step": 0, "id/pass@1": 0.25}\n[1, 2]\n{"step": 3, "id/pass@1": 0.5}\n')
  with caplog.at_level("WARNING"):
    text = report.write_report(str(tmp_path))
  assert "| id/pass@1 | 25.0% | 50.0% | +25.0 |" in text
  assert "metrics.jsonl:2: malformed JSON line" in caplog.text
  assert "eval.jsonl:2: expected a JSON object" in caplog.text
  assert (tmp_path / "plots" / "reward.png").exists()


def test_writer_reopen_after_kill_drops_partial_line_and_keeps_the_rest(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as w:
    w.write(1, {"a": 1.0})
  path = os.path.join(str(tmp_path), metrics.METRICS_FILENAME)
  with open(path, "a") as f:
    f.write('{"step": 2, "a": 2')  # A write interrupted by kill -9.
  with metrics.MetricsWriter(str(tmp_path)) as w:  # The restarted run appends.
    w.write(2, {"a": 2.5})
  assert metrics.read_jsonl(path) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.5}]


def test_merge_by_step_last_write_wins():
  recs = [{"step": 2, "a": 1.0, "b": 5.0}, {"step": 1, "a": 0.0}, {"step": 2, "a": 3.0}]
  assert metrics.merge_by_step(recs) == [{"step": 1, "a": 0.0}, {"step": 2, "a": 3.0, "b": 5.0}]


def test_tensorboard_event_file_has_the_scalars(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as w:
    w.write(5, {"reward/binary": 0.25})
  events = glob.glob(os.path.join(str(tmp_path), metrics.TB_DIRNAME, "events.out.tfevents.*"))
  assert len(events) == 1
  scalars = []
  with open(events[0], "rb") as f:  # TFRecord framing: u64 length, u32 crc, data, u32 crc.
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  assert scalars == [(5, "reward/binary", 0.25)]


def test_progress_line_has_eta_and_metrics():
  now = [100.0]
  p = metrics.Progress(100, start_step=10, window=3, clock=lambda: now[0])
  now[0] += 20.0  # 10 steps in 20 s: 0.5 steps/s.
  line = p.line(20, {"reward/binary": 0.123456, "queue/hard": 7, "other": 1.0},
                keys=("reward/binary", "queue/hard", "missing"))
  assert "step 20/100 (20.0%)" in line
  assert "ETA 0:02:40" in line  # 80 steps left / 0.5 steps/s = 160 s.
  assert "elapsed 0:00:20" in line and "0.5 steps/s" in line
  assert "reward/binary=0.1235" in line and "queue/hard=7" in line
  assert "other" not in line and "missing" not in line
  # The moving average forgets the slow start: 3 more reports at 1 step/s each.
  for step in (30, 40, 50):
    now[0] += 10.0
    line = p.line(step, {})
  assert "ETA 0:00:50" in line and "1 steps/s" in line


def test_progress_first_line_without_elapsed_time_has_unknown_eta():
  p = metrics.Progress(10, clock=lambda: 0.0)
  assert "ETA ?" in p.line(0, {})


def _write_run(path, keys, steps=5):
  with open(path, "w") as f:
    for s in range(steps):
      rec = {"step": s, **{k: 0.1 * (s + 1) for k in keys}}
      if s == 2 and "grad/norm" in rec:
        rec["grad/norm"] = "nan"  # Non-finite values must not break the plots.
      f.write(json.dumps(rec) + "\n")


def test_plot_run_writes_pngs_for_keys_present(tmp_path):
  run = str(tmp_path / "metrics.jsonl")
  _write_run(run, ["reward/binary", "reward/shaped", "batch/offline_ratio", "route/easy_frac",
                   "route/mid_frac", "route/hard_frac", "policy/entropy", "grad/norm",
                   "grad/norm_sft", "grad/norm_grpo", "grad/norm_gal"])
  evals = str(tmp_path / "eval.jsonl")
  with open(evals, "w") as f:
    for s in (0, 4):
      f.write(json.dumps({"step": s, "id/pass@1": 0.2 + s / 10, "ood/pass@1": 0.1}) + "\n")
  out = str(tmp_path / "plots")
  paths = metrics.plot_run(run, out, eval_path=evals)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(["reward.png", "offline_ratio.png", "routing.png", "entropy.png",
                          "grad_norm.png", "eval.png"])
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == _PNG_MAGIC, p
    assert os.path.getsize(p) > 1000
  assert sorted(os.listdir(out)) == names


def test_plot_run_skips_absent_keys(tmp_path):
  run = str(tmp_path / "metrics.jsonl")
  _write_run(run, ["policy/entropy"])
  paths = metrics.plot_run(run, str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in paths] == ["entropy.png"]


@pytest.mark.slow
def test_a_fresh_process_logs_tensorboard_without_loading_torch_and_can_load_it_after(tmp_path):
  import tiny_runs  # pylint: disable=g-import-not-at-top
  out = tiny_runs.run_python("""
      import glob, sys
      from dypo_jax.io import metrics
      with metrics.MetricsWriter(sys.argv[1]) as writer:
        writer.write(1, {"loss": 0.5})
      print("torch loaded by the writer:", "torch" in sys.modules)
      import torch
      print("torch after:", torch.ones(2).sum().item())
      print("events:", len(glob.glob(sys.argv[1] + "/tb/events.out.tfevents.*")))
      """, str(tmp_path))
  assert "torch loaded by the writer: False" in out
  assert "torch after: 2.0" in out and "events: 1" in out


def test_a_log_deleted_mid_run_is_recreated_with_one_warning(tmp_path, capsys):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0})
  path = tmp_path / metrics.METRICS_FILENAME
  os.remove(path)
  writer.write(2, {"loss": 2.0})
  writer.write(3, {"loss": 3.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(str(path))] == [2, 3]
  warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
  assert warnings == [f"metrics: WARNING {path} was deleted or replaced during the run; it is "
                      "written again from step 2 on (the lines before are not in it)"]
