"""dypo_jax.io.fileio: a reader sees the old file or the new one, never a mix or a temp file."""
import os

import pytest

from dypo_jax.io import fileio


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
  path = str(tmp_path / "state.bin")
  fileio.atomic_write_bytes(path, b"old")
  fileio.atomic_write_bytes(path, b"new contents")
  assert open(path, "rb").read() == b"new contents"
  assert os.listdir(tmp_path) == ["state.bin"]


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = str(tmp_path / "state.bin")
  fileio.atomic_write_bytes(path, b"previous")

  def failing_replace(src, dst):
    raise OSError("simulated crash before rename")

  monkeypatch.setattr(fileio.os, "replace", failing_replace)
  with pytest.raises(OSError, match="simulated crash"):
    fileio.atomic_write_bytes(path, b"never seen")
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["state.bin"]  # The temp file was cleaned up.
  assert open(path, "rb").read() == b"previous"


@pytest.fixture
def umask_027():
  previous = os.umask(0o027)
  yield
  os.umask(previous)


def _mode(path) -> int:
  return os.stat(path).st_mode & 0o777


def test_atomic_writes_and_the_final_table_take_the_umasks_mode(tmp_path, umask_027):
  """Not mkstemp's owner-only 0600: 0666 less the umask, as `open` gives."""
  from dypo_jax.io import report  # pylint: disable=g-import-not-at-top
  assert fileio.umask() == 0o027
  fileio.atomic_write_bytes(str(tmp_path / "a.bin"), b"x")
  report.write_report(str(tmp_path))
  assert {n: _mode(tmp_path / n) for n in ("a.bin", "final_table.md", "final_table.json")} == {
      "a.bin": 0o640, "final_table.md": 0o640, "final_table.json": 0o640}
  os.umask(0o022)
  fileio.atomic_write_bytes(str(tmp_path / "a.bin"), b"y")
  assert _mode(tmp_path / "a.bin") == 0o644


@pytest.mark.slow  # ~10 s: the model's initialisation.
def test_an_exported_model_takes_the_umasks_mode(tmp_path, umask_027):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  import tiny_runs  # pylint: disable=g-import-not-at-top
  out = tmp_path / "hf"
  models.save_pretrained(models.Transformer(tiny_runs.model_config(), rngs=nnx.Rngs(0)), str(out))
  assert _mode(out) == 0o750
  assert {n: _mode(out / n) for n in os.listdir(out)} == {
      n: 0o640 for n in ("config.json", "model.safetensors")}
