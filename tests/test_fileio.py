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
