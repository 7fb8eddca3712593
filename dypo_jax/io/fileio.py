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


def umask() -> int:
  """The process's umask, read without changing it (Linux: /proc), else by setting it back."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)  # Not atomic: a file another thread creates meanwhile gets 022.
  os.umask(mask)
  return mask


def created_mode(*, directory: bool = False) -> int:
  """The mode `open` / `mkdir` give a new file / folder: 0666 / 0777 less the umask.

  `tempfile.mkstemp` and `mkdtemp` create 0600 / 0700 whatever the umask; a temp file renamed
  into place takes this mode first, or exported models and reports end up owner-only.
  """
  return (0o777 if directory else 0o666) & ~umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes a temp file beside `path`, fsyncs it, renames it over `path`; cleans up on failure.
  The file gets the mode a plain `open` gives (the umask's), not mkstemp's 0600."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), created_mode())
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fsync_dir(folder)
