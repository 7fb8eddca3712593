"""A thin Orbax wrapper: save / restore the train state, JSON extras and the DYPO queues.

One checkpoint is a step directory `<directory>/<step>/` written by `orbax.checkpoint.
CheckpointManager` with four items:
  * `state`  — a pytree of jax arrays (params, optimizer state, step, rng key *data*), saved with
    `StandardSave` and restored with `StandardRestore` onto an abstract target whose shardings may
    differ from the saved ones (restoring onto another mesh reshards);
  * `extras` — a JSON-serialisable dict (data iterator state, eval history, config, counters);
  * `queues` — optional opaque bytes (`QueueSet.to_bytes()`), stored as a JSON item
    `{"sha256", "nbytes", "base64"}`. It rides inside the same atomic step directory as the state
    it belongs to, and the checksum turns a damaged payload into a clear error;
  * `verify` — a fingerprint of every array (computed on device at save time) and the sha256 of
    the extras: `restore` checks both, and `restore_subtree` the arrays it reads, so truncated or
    altered data is `CheckpointCorrupt`, never restored silently. `quarantine` moves such a step
    aside.

Read failures come in two kinds (`read_failure`): `CheckpointCorrupt` when the damage is certain
(a checksum or fingerprint mismatch, a truncated or missing file, undecodable JSON), and
`errors.StorageError` for anything the store itself may cure (an I/O, permission or network
error, a timeout): only the first may be quarantined.

Quarantine is recorded first in a marker file `quarantine-<step>.json` (one object, written
atomically) that `all_steps` reads: a marked step is never listed, whatever state the move aside
is in. The move (a rename locally; copy, then delete, in a bucket) then completes and the marker
goes; a move cut short is finished by the next writable Checkpointer, or before that step number
is saved again.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames it to `<step>/`
only once every item is complete (on object stores it writes `commit_success.txt` instead). Step
listing (`latest_step`, `all_steps`) only returns finalised steps, so a save cut short by kill -9
is invisible on restart; `cleanup_tmp_directories=True` deletes such leftovers when a writable
Checkpointer opens the directory.

Multi-process: call `save` / `restore` on every process (they are collective); JSON items (extras,
queues) are written by the primary process only, so pass the same values everywhere.
"""
import base64
import functools
import hashlib
import json
import logging
import re
import signal
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dypo_jax import errors
from dypo_jax.io import paths
from dypo_jax.io import storage

_ITEMS = ("state", "extras", "queues", "verify")
_QUEUES_FORMAT = "dypo_jax.rl.queues.base64"
CORRUPT_PREFIX = "corrupt-"
QUARANTINE_PREFIX = "quarantine-"  # quarantine-<step>.json: the step is set aside (see above).


CheckpointCorrupt = storage.CheckpointCorrupt  # Certain damage: the only kind set aside.


# Version 1 multiplied word i by i * K + 1, which is even at odd i: a sign flip (a change of
# 2**31) at any odd index left the sum unchanged. Version 2's multiplier 2 * i * K + 1 is odd, so
# any change of one word changes the sum. Steps saved without a version are checked with 1.
FINGERPRINT_VERSION = 2
_K = 2654435761


@functools.partial(jax.jit, static_argnames="version")
def _fingerprints(leaves: list[jax.Array], version: int) -> jax.Array:
  """[n] uint32: per array, sum over its 32/16/8-bit words w_i of w_i * (2 * i * K + 1)
  (version 2), wrapping. Computed where the arrays live (one small result a save), it changes
  when any one word changes."""
  step = jnp.uint32({1: _K, 2: (2 * _K) % 2**32}[version])
  out = []
  for x in leaves:
    bits = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x.reshape(-1), bits).astype(jnp.uint32)
    index = jnp.arange(words.size, dtype=jnp.uint32)
    out.append(jnp.sum(words * (index * step + jnp.uint32(1)), dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def state_fingerprints(state: Any, version: int = FINGERPRINT_VERSION) -> dict[str, int]:
  """{key path: fingerprint} of every array of a state pytree (see `_fingerprints`)."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  values = np.asarray(jax.device_get(_fingerprints([x for _, x in flat], version=version)))
  return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(flat, values)}


def _plain_path(keystr: str) -> str:
  """A key path with attribute steps written as dict keys (`.params` -> `['params']`): a saved
  dataclass state and the dict that names a part of it for `restore_subtree` then agree."""
  return re.sub(r"\.([A-Za-z_]\w*)", r"['\1']", keystr)


plain_path = _plain_path


def _check_arrays(where: str, state: Any, verify: dict[str, Any], *, partial: bool) -> None:
  """Raises CheckpointCorrupt unless every array of the restored `state` has the fingerprint
  saved for it in `verify`. `partial`: only some of the saved arrays were read (key paths are
  compared with attribute and dict steps alike, `_plain_path`)."""
  got = {_plain_path(k): v
         for k, v in state_fingerprints(state, verify.get("version", 1)).items()}
  want = {_plain_path(k): v for k, v in verify.get("arrays", {}).items()}
  odd = set(got) - set(want) if partial else set(got) ^ set(want)
  if odd:
    raise CheckpointCorrupt(f"{where}: the restored arrays {sorted(odd)[:3]} differ from those "
                            f"saved")
  bad = [path for path in got if got[path] != want[path]]
  if bad:
    raise CheckpointCorrupt(f"{where}: {len(bad)} array(s) fail their checksum, first {bad[0]}")


def _json_sha256(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def abstract_like(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct`s (with each array's sharding) mirroring a pytree of arrays."""

  def one(path, x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    raise ValueError(f"abstract_like: leaf {jax.tree_util.keystr(path)} is a "
                     f"{type(x).__name__}, not an array")

  return jax.tree_util.tree_map_with_path(one, tree)


def _json_problem(value: Any, path: str = "extras") -> str | None:
  """The path of the first value json cannot encode, or None."""
  if isinstance(value, dict):
    for k, v in value.items():
      if not isinstance(k, str):
        return f"{path}[{k!r}] (key is a {type(k).__name__}, not a str)"
      problem = _json_problem(v, f"{path}[{k!r}]")
      if problem:
        return problem
    return None
  if isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      problem = _json_problem(v, f"{path}[{i}]")
      if problem:
        return problem
    return None
  if value is None or isinstance(value, (str, bool, int, float)):
    return None
  return f"{path} (a {type(value).__name__})"


class Checkpointer:
  """Saves and restores DYPO checkpoints under `directory` (see the module docstring)."""

  def __init__(self, directory: str, *, keep: int | None, async_save: bool = True,
               read_only: bool = False):
    """`keep`: how many most recent steps to keep (None keeps all).

    `read_only`: for evaluation / export; the directory must exist and nothing is written.
    """
    if keep is not None and keep < 1:
      raise ValueError(f"Checkpointer(keep={keep}): keep must be >= 1 or None")
    self.directory = paths.absolute(directory)  # A local folder or a bucket URL.
    self._read_only = read_only
    if read_only and not paths.isdir(self.directory):
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._pending: int | None = None  # The step of the save `wait_saved` has not checked yet.
    self.save_errors: dict[int, BaseException] = {}  # Step -> why its background save failed.
    if not read_only:
      _SaveFailures.attach(self)
      for step in sorted(self.quarantined()):
        self._finish_quarantine(step, strict=False)

  def step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def save(self, step: int, *, state: Any, extras: dict[str, Any], queues: bytes | None = None,
           force: bool = False) -> bool:
    """Saves `step` (asynchronously when `async_save`); the caller decides when to save.

    Returns False without writing if `step` is already saved (a finished checkpoint is never
    overwritten), else what Orbax returns (True when a save was started).
    `queues`: e.g. `QueueSet.to_bytes()`; `restore_queues` gives it back.
    """
    if self._read_only:
      raise ValueError(f"Checkpointer({self.directory}) is read-only; cannot save step {step}")
    if not isinstance(extras, dict):
      raise ValueError(f"extras for step {step} must be a dict, got {type(extras).__name__}")
    problem = _json_problem(extras)
    if problem:
      raise ValueError(f"extras for step {step} are not JSON-serialisable at {problem}")
    if step in self.quarantined():  # Its number is free again once the move aside is done.
      self._finish_quarantine(step, strict=True)
    if step in self.all_steps():
      return False
    verify = {"version": FINGERPRINT_VERSION, "arrays": state_fingerprints(state),
              "extras_sha256": _json_sha256(extras)}
    items = {"state": ocp.args.StandardSave(state), "extras": ocp.args.JsonSave(extras),
             "verify": ocp.args.JsonSave(verify)}
    if queues is not None:
      data = bytes(queues)
      items["queues"] = ocp.args.JsonSave({
          "format": _QUEUES_FORMAT, "nbytes": len(data),
          "sha256": hashlib.sha256(data).hexdigest(),
          "base64": base64.b64encode(data).decode("ascii")})
    try:
      started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    except Exception as e:  # pylint: disable=broad-except
      if errors.disk_full(e):  # The step is named: the failure is this save's, not a later one's.
        raise errors.SaveFailed(f"checkpoint step {step} in {self.directory} was not saved: "
                                f"{storage.first_line(e, 2000)}") from e
      raise
    if started:
      self._pending = step
    return started

  def check(self) -> None:
    """Raises the error of a finished background save that failed (e.g. no space left)."""
    self._manager.check_for_errors()

  def wait_saved(self) -> None:
    """Waits for the save started last and raises `errors.SaveFailed` (its cause chained: a full
    disk stays recognisable) when that step was not finalised. Orbax's own finalisation logs a
    failed background save and drops its error, so this is where it is noticed."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self.save_errors.setdefault(step, e)
    try:
      self._manager.reload()
      if step in self._manager.all_steps():
        return
    except Exception as e:  # pylint: disable=broad-except
      if not storage.store_failed(e):
        raise
      self.save_errors.setdefault(step, e)
    cause = self.save_errors.pop(step, None)
    why = f": {storage.first_line(cause, 2000)}" if cause is not None else ""
    if cause is not None and storage.store_failed(cause) and not errors.disk_full(cause):
      raise errors.StorageUnavailable(f"checkpoint step {step} in {self.directory} was not "
                                      f"saved: the storage failed{why}") from cause
    raise errors.SaveFailed(f"checkpoint step {step} in {self.directory} was not saved{why}") \
        from cause

  def wait(self) -> None:
    """Blocks until an asynchronous save has been finalised."""
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    """The finalised steps, ascending, less those set aside (`quarantine`)."""
    if self._read_only:
      self._manager.reload()  # A writer elsewhere may have added steps.
    aside = self.quarantined()
    return sorted(s for s in self._manager.all_steps() if s not in aside)

  def quarantined(self) -> set[int]:
    """Steps whose quarantine marker exists (set aside, maybe not yet moved)."""
    found = set()
    for name in paths.listdir(self.directory) if paths.isdir(self.directory) else []:
      match = re.fullmatch(rf"{QUARANTINE_PREFIX}(\d+)\.json", name)
      if match:
        found.add(int(match.group(1)))
    return found

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _resolve(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f"checkpoint step {step} not found in {self.directory} (available: {steps})")
    return step

  def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `(state, extras)` of `step` (default: the latest).

    `abstract_state`: a pytree of `jax.ShapeDtypeStruct` with the target shardings (e.g.
    `abstract_like(state)` or `jax.eval_shape` plus shardings). A missing step raises
    FileNotFoundError; an unreadable one ValueError naming its directory.
    """
    step = self._resolve(step)
    has_verify = paths.isdir(paths.join(self.step_dir(step), "verify"))
    args = {"state": ocp.args.StandardRestore(abstract_state), "extras": ocp.args.JsonRestore()}
    if has_verify:
      args["verify"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise storage.read_failure(f"checkpoint {self.step_dir(step)}", e) from e
    if has_verify:  # Steps written before checksums existed are read as they are.
      self._verify(step, restored["state"], restored["extras"], restored["verify"])
    return restored["state"], restored["extras"]

  def _verify(self, step: int, state: Any, extras: dict[str, Any], verify: dict[str, Any]):
    """Raises CheckpointCorrupt unless every array and the extras read back as saved."""
    where = f"checkpoint {self.step_dir(step)}"
    if _json_sha256(extras) != verify.get("extras_sha256"):
      raise CheckpointCorrupt(f"{where}: item 'extras' fails its sha256 check")
    _check_arrays(where, state, verify, partial=False)

  def _marker(self, step: int) -> str:
    return paths.join(self.directory, f"{QUARANTINE_PREFIX}{step}.json")

  def quarantine(self, step: int, reason: str = "") -> str:
    """Sets a corrupt step aside as `<directory>/corrupt-<step>` (never deletes it); returns
    that path. The marker is written first, so the step is no longer listed even if the move is
    cut short (the next writable Checkpointer finishes it)."""
    if self._read_only:
      raise ValueError(f"Checkpointer({self.directory}) is read-only; cannot move step {step}")
    self.wait()
    target = paths.join(self.directory, f"{CORRUPT_PREFIX}{step}")
    n = 1
    while paths.exists(target):
      n += 1
      target = paths.join(self.directory, f"{CORRUPT_PREFIX}{step}.{n}")
    if jax.process_index() == 0:
      paths.write_bytes(self._marker(step), json.dumps(
          {"step": step, "target": target, "reason": reason}).encode("utf-8"))
    self._finish_quarantine(step, strict=False)
    return target

  def _finish_quarantine(self, step: int, *, strict: bool) -> None:
    """Moves a marked step to its target and removes the marker. A failure leaves the marker
    (the step stays unlisted); `strict` raises it, else one warning line."""
    if jax.process_index() == 0:
      try:
        target = json.loads(paths.read_bytes(self._marker(step)))["target"]
        if paths.exists(self.step_dir(step)):
          paths.move_tree(self.step_dir(step), target)  # Copies overwrite: safe to repeat.
        paths.remove(self._marker(step))
      except Exception as e:  # pylint: disable=broad-except
        if strict:
          raise errors.StorageError(f"cannot finish moving checkpoint step {step} aside "
                                    f"({self._marker(step)}): {storage.first_line(e)}") from e
        print(f"checkpoint: WARNING step {step} is set aside ({self._marker(step)}) but could "
              f"not be moved yet: {storage.first_line(e)}", file=sys.stderr, flush=True)
    self._manager.reload()

  def restore_extras(self, step: int | None = None) -> dict[str, Any]:
    """The JSON extras of `step` (default: the latest), without reading any array."""
    step = self._resolve(step)
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))["extras"]
    except Exception as e:  # pylint: disable=broad-except
      raise storage.read_failure(f"checkpoint {self.step_dir(step)} item 'extras'", e) from e

  def restore_subtree(self, step: int | None = None, *, abstract_subtree: Any) -> Any:
    """Restores only the arrays of the saved state that `abstract_subtree` names.

    `abstract_subtree`: `jax.ShapeDtypeStruct`s (with target shardings) at a subset of the saved
    state's key paths, e.g. `{"train": {"params": abstract_params}}` for the policy alone: the
    rest (optimizer state, reference) is neither read nor allocated. Use it on a Checkpointer
    that has not restored `state` with `restore` (the two use different Orbax handlers).
    """
    step = self._resolve(step)
    args = {"state": ocp.args.PyTreeRestore(
        item=abstract_subtree,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_subtree),
        partial_restore=True)}
    has_verify = paths.isdir(paths.join(self.step_dir(step), "verify"))
    if has_verify:
      args["verify"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise storage.read_failure(f"checkpoint {self.step_dir(step)}", e) from e
    if has_verify:  # The arrays read are checked as `restore` checks the whole state.
      _check_arrays(f"checkpoint {self.step_dir(step)}", restored["state"], restored["verify"],
                    partial=True)
    return restored["state"]

  def restore_queues(self, step: int | None = None) -> bytes | None:
    """The `queues` bytes saved with `step` (default: the latest), or None if none were saved."""
    step = self._resolve(step)
    if not paths.isdir(paths.join(self.step_dir(step), "queues")):
      return None
    where = f"checkpoint {self.step_dir(step)} item 'queues'"
    try:
      payload = self._manager.restore(
          step, args=ocp.args.Composite(queues=ocp.args.JsonRestore()))["queues"]
      if payload.get("format") != _QUEUES_FORMAT:
        raise ValueError(f"format {payload.get('format')!r}, expected {_QUEUES_FORMAT!r}")
      data = base64.b64decode(payload["base64"], validate=True)
    except Exception as e:  # pylint: disable=broad-except
      failure = storage.read_failure(where, e)
      if isinstance(e, (ValueError, KeyError, TypeError)) and not isinstance(
          failure, errors.StorageError):  # A payload of the wrong layout: damage.
        failure = CheckpointCorrupt(str(failure))
      raise failure from e
    if len(data) != payload["nbytes"] or hashlib.sha256(data).hexdigest() != payload["sha256"]:
      raise CheckpointCorrupt(f"{where} fails its size / sha256 check")
    return data

  def item_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{key path (dict steps, `_plain_path`): shape} of the arrays saved in `step`'s state,
    from its metadata alone (no array is read)."""
    step = self._resolve(step)
    try:
      meta = ocp.PyTreeCheckpointer().metadata(
          paths.join(self.step_dir(step), "state")).item_metadata.tree
    except Exception as e:  # pylint: disable=broad-except
      raise storage.read_failure(f"checkpoint {self.step_dir(step)} item 'state' metadata",
                                 e) from e
    flat = jax.tree_util.tree_flatten_with_path(
        meta, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    return {_plain_path(jax.tree_util.keystr(p)): tuple(x.shape) for p, x in flat
            if hasattr(x, "shape")}

  def close(self) -> None:
    """Waits for a pending save and releases Orbax's resources."""
    _SaveFailures.detach(self)
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _SaveFailures(logging.Filter):
  """Catches the error Orbax's finalisation thread logs for a failed background save
  ("[step=N] Checkpointer failed"), for `Checkpointer.wait_saved` to raise; the record is kept."""
  _owners: list["Checkpointer"] = []

  @classmethod
  def attach(cls, owner: "Checkpointer") -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, cls) for f in logger.filters):
      logger.addFilter(cls())
    cls._owners.append(owner)

  @classmethod
  def detach(cls, owner: "Checkpointer") -> None:
    if owner in cls._owners:
      cls._owners.remove(owner)

  def filter(self, record: logging.LogRecord) -> bool:
    match = re.match(r"\[step=(\d+)\] Checkpointer failed", str(record.msg % record.args
                                                                  if record.args else record.msg))
    if match and record.exc_info and record.exc_info[1] is not None:
      for owner in self._owners:
        owner.save_errors.setdefault(int(match.group(1)), record.exc_info[1])
    return True


def install_stop_handlers(callback: Callable[[], None]) -> dict[int, Any]:
  """Calls `callback()` when the process receives SIGTERM or SIGINT; returns the previous handlers
  ({signal: handler}, for `signal.signal` to put back).

  The callback runs between two Python bytecodes of the main thread, possibly in the middle of a
  step: let it set a flag that the training loop checks at the step boundary (then save, `wait`,
  exit) rather than save from inside the handler. Must be called from the main thread.
  """

  def handler(signum, frame):
    del signum, frame
    callback()

  return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
