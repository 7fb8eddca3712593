"""Builders for main's phases: each reads the (validated) config once and returns plain objects."""
import ctypes
import ctypes.util
import glob
import math
import os
import platform

from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections

from dypo_jax import models
from dypo_jax import sharding
from dypo_jax import tokenizers
from dypo_jax.data import records as records_lib


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when asked, or when the environment is a multi-host job.

  On a TPU pod slice JAX finds the coordinator itself, so no arguments are needed there.
  """
  mode = cfg.initialize
  env_says = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)
  if mode == "never" or (mode == "auto" and not env_says and not cfg.coordinator_address):
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  jax.distributed.initialize(**kwargs)


def configure_host_devices(count: int) -> None:
  """Splits a CPU host into `count` XLA devices (`mesh.host_devices`; 0 leaves XLA's default).

  JAX reads the count once, when its CPU backend starts, so this runs before anything asks JAX
  for devices; a backend already started with another count is an error, not a silent no-op.
  """
  if not count:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # The backend has started: fine if it has the count asked for.
    have = len(jax.devices("cpu"))
    if have != count:
      raise ValueError(f"mesh.host_devices={count}, but JAX already started with {have} CPU "
                       "device(s); set it before the first JAX call") from None


# Whether `configure_host` set synchronous CPU dispatch before JAX started its backends.
_sync_dispatch = False


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (no public API says it)
  return xla_bridge.backends_are_initialized()


def configure_host(cfg: ml_collections.ConfigDict) -> None:
  """Before the first JAX call: the CPU host as `mesh.host_devices` devices, and with
  `mesh.host_reuse_memory` XLA:CPU programs run on the calling thread (see `keep_host_heap`).

  JAX reads the dispatch mode once, when its CPU backend starts: asking for it later is an
  error, not a silent no-op. Calling again once it is set does nothing.
  """
  global _sync_dispatch
  configure_host_devices(cfg.host_devices)
  if not cfg.host_reuse_memory or _sync_dispatch:
    return
  if _backends_started():
    raise ValueError("mesh.host_reuse_memory=True, but JAX already started its backend with "
                     "asynchronous CPU dispatch; call runtime.configure_host before the first JAX "
                     "call, or set mesh.host_reuse_memory=False")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _sync_dispatch = True


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_host_heap(cfg: ml_collections.ConfigDict) -> bool:
  """With `mesh.host_reuse_memory` on a CPU backend: glibc serves large blocks from the heap and
  keeps up to 2 GiB of freed memory instead of returning it to the OS (`mallopt` takes an int;
  a program with more temporaries than that is trimmed and regrown each call, slower than
  without: BUILD_NOTES). Returns whether it was applied.

  XLA:CPU allocates each execution's temporaries as one block and frees it after. glibc maps
  such a block afresh (mmap) and unmaps it on free, so every step faulted in and zeroed ~100 MB
  of new pages (27k faults a W1 step; the update's first writes ran at a third of their speed).
  From the heap, the freed block is reused by the next step as it is. The heap is per thread
  arena and only the main one can grow past 64 MB, hence the synchronous dispatch
  (`configure_host`): programs then allocate on the main thread. Peak memory is unchanged; what
  the process freed is kept for reuse rather than returned.
  """
  if not (cfg.host_reuse_memory and _sync_dispatch) or jax.default_backend() != "cpu":
    return False  # Without synchronous dispatch the block is a pool thread's: mmap regardless.
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False  # mallopt is glibc's (macOS, musl: nothing to set).
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def build_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The training mesh: all devices, or with `mesh.rollout_data` set, the first ones its sizes
  name (the others may serve the rollout mesh alone)."""
  shape = {a: cfg[a] for a in sharding.MESH_AXES}
  devices = jax.devices()
  if cfg.rollout_data and -1 not in shape.values():
    devices = devices[:math.prod(shape.values())]
  return sharding.make_mesh(shape, devices)


def build_rollout_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """The sampler's own data-parallel mesh (`mesh.rollout_data` devices), or None: the training
  mesh samples."""
  n = cfg.rollout_data
  if not n:
    return None
  if jax.process_count() > 1:
    raise ValueError(f"mesh.rollout_data={n} is for one process; with {jax.process_count()} "
                     "processes the sampler runs on the training mesh (set mesh.rollout_data=0)")
  devices = jax.devices()
  if n > len(devices):
    raise ValueError(f"mesh.rollout_data={n}, but only {len(devices)} device(s) are here "
                     "(on CPU, mesh.host_devices splits the host into more)")
  return sharding.make_mesh({"data": n}, devices[:n])


def mesh_rules(config: ml_collections.ConfigDict):
  return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in config.mesh.rules)


def build_data(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
  """The prompt pools {"train", "eval_id", "eval_ood"} as lists of PromptRecord."""
  d = config.data
  if d.source == "procedural":
    from dypo_jax.data import tasks  # pylint: disable=g-import-not-at-top
    for name in tuple(d.id_tasks) + tuple(d.ood_tasks):
      if name not in tasks.ALL_TASKS:
        raise ValueError(f"data.id_tasks / data.ood_tasks: unknown task {name!r}; allowed: "
                         f"{sorted(tasks.ALL_TASKS)}")
    gen = lambda names, num, split: tasks.generate(list(names), num=num, seed=config.seed,
                                                   split=split)
    return {"train": gen(d.id_tasks, d.num_train, "train"),
            "eval_id": gen(d.id_tasks, d.num_eval_id, "eval"),
            "eval_ood": gen(d.ood_tasks, d.num_eval_ood, "eval")}
  del workdir
  pools = {}
  for name, paths in (("train", (d.train_path,)), ("eval_id", tuple(d.eval_id_paths)),
                      ("eval_ood", tuple(d.eval_ood_paths))):
    recs = []
    for path in paths:
      loaded, stats = records_lib.read_records(path, on_error=d.on_error)
      if stats.get("skipped"):
        print(f"data: {path}: skipped {stats['skipped']} malformed records "
              f"(first: {stats['errors'][:1]})", flush=True)
      recs.extend(loaded)
    pools[name] = recs
  return pools


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                    pools: dict[str, list]) -> tokenizers.Tokenizer:
  """Loads the configured tokenizer, or trains a SentencePiece model on the training pool."""
  t = config.tokenizer
  if t.path:
    tok = tokenizers.load_tokenizer(t.kind, t.path)
  else:
    if t.kind != "sentencepiece":
      raise ValueError(f"tokenizer.path is empty; only kind='sentencepiece' can be trained "
                       f"here (got kind={t.kind!r})")
    prefix = os.path.join(workdir, "tokenizer", "spm")
    # Process 0 trains (the workdir is shared); the others wait for its file. Training writes
    # under a temporary name that is renamed when complete, so a run killed meanwhile never
    # leaves a half-written spm.model for the restart to read.
    if not os.path.exists(prefix + ".model") and jax.process_index() == 0:
      os.makedirs(os.path.dirname(prefix), exist_ok=True)
      for leftover in glob.glob(prefix + ".tmp-*"):
        os.remove(leftover)
      corpus = []
      for rec in pools["train"]:
        corpus.append(rec.prompt)
        corpus.extend(s.response for s in rec.teachers)
      tmp = f"{prefix}.tmp-{os.getpid()}"
      tokenizers.train_sentencepiece(corpus, vocab_size=t.train_vocab_size, out_prefix=tmp)
      os.replace(tmp + ".vocab", prefix + ".vocab")
      os.replace(tmp + ".model", prefix + ".model")  # Last: its presence means complete.
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dypo_jax.runtime.build_tokenizer")
    tok = tokenizers.SentencePieceTokenizer(prefix + ".model")
  if config.model.init == "random":
    tokenizers.check_vocab_fits(tok, config.model.vocab_size)
  return tok


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  return models.model_config_from_dict(config.model.to_dict())


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                tokenizer: tokenizers.Tokenizer | None = None) -> models.Transformer:
  """A sharded model: fresh weights, or a Hugging Face checkpoint.

  On a multi-device mesh the residual stream is pinned to the batch sharding
  (`Transformer.activation_sharding`, `sharding.activation_sharding`), exactly as
  `python -m dypo_jax.aot` compiles it, so a run builds the program whose memory that check proved.
  On one device nothing is pinned.
  """
  m = config.model
  rules = mesh_rules(config)
  if m.init == "hf":
    model = models.from_pretrained(
        m.hf_path, dtype=m.dtype, param_dtype=m.param_dtype, max_seq_len=m.max_seq_len,
        mesh=mesh, rules=rules,
        compute_options=dict(remat=m.remat, attention_chunk=m.attention_chunk,
                             mlp_chunk=m.mlp_chunk))
  else:
    mc = model_config(config)
    model = sharding.create_sharded(lambda: models.Transformer(mc, rngs=nnx.Rngs(config.seed)),
                                    mesh, rules)
  model.activation_sharding = sharding.activation_sharding(mesh, sharding.activation_axes(rules))
  if tokenizer is not None:
    tokenizers.check_vocab_fits(tokenizer, model.config.vocab_size)
  return model


def summary(config, mesh, tokenizer, model, pools) -> str:
  mc = model.config
  lines = [
      "=" * 100,
      f"dypo_jax  method={config.rl.method}  seed={config.seed}",
      f"devices   {sharding.devices_summary(mesh)}  (process {jax.process_index()} of "
      f"{jax.process_count()})",
      f"model     {mc.arch}  layers={mc.num_layers} embed={mc.embed_dim} heads={mc.num_heads}/"
      f"{mc.num_kv_heads} head_dim={mc.head_dim} mlp={mc.mlp_dim} vocab={mc.vocab_size} "
      f"tied={mc.tie_embeddings} params={models.param_count(model):,} "
      f"dtype={mc.param_dtype}/{mc.dtype}",
      f"tokenizer {type(tokenizer).__name__} vocab={tokenizer.vocab_size} bos={tokenizer.bos_id} "
      f"eos={tokenizer.eos_id} pad={tokenizer.pad_id} template={config.tokenizer.template}",
      "data      " + "  ".join(f"{k}={len(v)}" for k, v in pools.items()),
      "shardings (parameter, shape, dtype, logical axes, partition spec):",
  ]
  lines += ["  " + line for line in sharding.sharding_report(model)]
  lines.append("=" * 100)
  return "\n".join(lines)
