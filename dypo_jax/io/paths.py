"""Where a run's files live: a local folder, or a bucket (`gs://...`, any URL `etils.epath` reads).

Every file a run writes and reads back goes through these functions. Local paths keep their POSIX
guarantees (atomic rename, exclusive create, append). An object store has no rename and no
append, so there: writing an object is atomic (a reader sees the old object or the new one), an
exclusive create is the store's "only if absent" precondition, append-only logs are kept in a
local staging folder and uploaded whole (`staging_dir`), and files that a library must open from
disk (a SentencePiece model) are read through a local copy.
"""
import errno
import hashlib
import os
import posixpath
import shutil
import tempfile

from etils import epath

from dypo_jax.io import fileio

try:  # Another process (or host) writes the same bucket: a cached listing would go stale.
  import fsspec  # pylint: disable=g-import-not-at-top
  for _protocol in ("gs", "gcs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
except ImportError:  # Local workdirs only.
  pass


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL (`gs://bucket/run`), False for a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *names: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *names) if is_remote(path) else os.path.join(path, *names)


def _epath(path: str | os.PathLike) -> epath.Path:
  return epath.Path(os.fspath(path))


def exists(path: str | os.PathLike) -> bool:
  return os.path.exists(path) if not is_remote(path) else _epath(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return os.path.isdir(path) if not is_remote(path) else _epath(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
  return os.path.isfile(path) if not is_remote(path) else _epath(path).is_file()


def makedirs(path: str | os.PathLike) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)  # Folders are name prefixes; no error.
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in a folder (empty if it does not exist)."""
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  p = _epath(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def read_bytes(path: str | os.PathLike) -> bytes:
  if not is_remote(path):
    with open(path, "rb") as f:
      return f.read()
  return _epath(path).read_bytes()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces `path` whole: a reader sees the old content or the new, never part of either."""
  if is_remote(path):
    _epath(path).write_bytes(data)  # One object upload: atomic.
  else:
    fileio.atomic_write_bytes(os.fspath(path), data)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str | os.PathLike) -> None:
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a folder (a rename locally; copy, then delete, in a bucket)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  for name in listdir(src):
    child = join(src, name)
    if isdir(child):
      move_tree(child, join(dst, name))
    else:
      _epath(child).copy(_epath(join(dst, name)), overwrite=True)
  _epath(src).rmtree(missing_ok=True)


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
  """Creates `path` holding `data` only if it does not exist; False if it did.

  Locally a hard link of a complete temporary file (atomic, fails if `path` exists); in a
  bucket, the store's "create only if absent" precondition (fsspec's exclusive mode "xb": GCS's
  ifGenerationMatch=0), one upload of the whole content. Either way of two simultaneous
  creators exactly one wins, and a reader never sees the file partly written. The existence check first serves stores that ignore the precondition (emulators).
  """
  if not is_remote(path):
    # Written whole beside it, then hard-linked into place (fails if the name exists): a reader
    # sees no file or all of `data`, never the empty file an O_EXCL create shows until written.
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".new")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, 0o644)
      try:
        os.link(tmp, path)
      except FileExistsError:
        return False
      except OSError as e:  # A file system without hard links: O_EXCL, then write.
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        return _create_exclusive_unlinked(path, data)
    finally:
      os.remove(tmp)
    fileio.fsync_dir(folder)
    return True
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
  if fs.exists(fs_path):
    return False
  try:
    with fs.open(fs_path, "xb") as f:
      f.write(data)
  except FileExistsError:
    return False
  except OSError as e:  # A failed precondition surfaces as an HTTP 412.
    if "412" in str(e) or "recondition" in str(e):
      return False
    raise
  return True


def _create_exclusive_unlinked(path: str, data: bytes) -> bool:
  """O_EXCL create, then write: a reader may see the file empty for a moment (`io.lock` waits
  for an empty lock file to fill)."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return True


def staging_dir(workdir: str) -> str:
  """A local folder that stands in for a remote workdir's append-only files (`MetricsWriter`)."""
  digest = hashlib.sha256(workdir.encode("utf-8")).hexdigest()[:16]
  path = os.path.join(tempfile.gettempdir(), "dypo_jax_staging", digest)
  os.makedirs(path, exist_ok=True)
  return path


def upload_tree(local_dir: str, dst: str, *, last: tuple[str, ...] = ()) -> None:
  """Copies a local folder's files to `dst` (a URL or a local folder), replacing each; the files
  named in `last` go after all others (a reader takes their presence to mean "complete")."""
  files = []
  for root, _, names in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dst if rel == "." else join(dst, *rel.split(os.sep))
    makedirs(target)
    files += [(os.path.join(root, n), join(target, n), n in last and rel == ".") for n in names]
  for src, target, _ in sorted(files, key=lambda f: f[2]):
    with open(src, "rb") as f:
      write_bytes(target, f.read())


def download_tree(src: str, local_dir: str) -> None:
  """Copies the files of `src` (a URL) into a local folder."""
  os.makedirs(local_dir, exist_ok=True)
  for name in listdir(src):
    child = join(src, name)
    if isdir(child):
      download_tree(child, os.path.join(local_dir, name))
    else:
      fileio.atomic_write_bytes(os.path.join(local_dir, name), read_bytes(child))


def local_copy(path: str, *, cache: str | None = None) -> str:
  """`path` itself when local; else a copy of the file (or folder) under `cache`."""
  if not is_remote(path):
    return path
  digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
  target = os.path.join(cache or os.path.join(tempfile.gettempdir(), "dypo_jax_copies"), digest,
                        posixpath.basename(path.rstrip("/")))
  if isdir(path):
    shutil.rmtree(target, ignore_errors=True)
    download_tree(path, target)
  else:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fileio.atomic_write_bytes(target, read_bytes(path))
  return target
