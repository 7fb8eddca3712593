"""Atomic file writes: a reader sees the old file or the new one, never half of either."""
import os
import tempfile


def fsync_dir(directory: str) -> None:
  """Makes a rename inside `directory` durable (no-op where directories cannot be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes a temp file beside `path`, fsyncs it, renames it over `path`; cleans up on failure."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fsync_dir(folder)
