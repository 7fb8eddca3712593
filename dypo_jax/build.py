"""Builders for main's phases (data, tokenizer, model, summary): each reads the validated config
once and returns plain objects."""
import dataclasses
import glob
import os

import jax
from jax.experimental import multihost_utils
import ml_collections

from dypo_jax import errors
from dypo_jax import models
from dypo_jax.data import record_files
from dypo_jax.data import tokenizers
from dypo_jax.io import paths
from dypo_jax.models import builder
from dypo_jax.models import hf_config
from dypo_jax.parallel import sharding


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
  if d.source == "tfds":
    return _tfds_pools(d)
  pools = {}
  for name, files in (("train", (d.train_path,)), ("eval_id", tuple(d.eval_id_paths)),
                      ("eval_ood", tuple(d.eval_ood_paths))):
    recs = []
    for path in files:
      loaded, stats = record_files.read_records(path, on_error=d.on_error)
      if stats.get("skipped"):
        print(f"data: {path}: skipped {stats['skipped']} malformed records "
              f"(first: {stats['errors'][:1]})", flush=True)
      if not loaded:
        key = "data.train_path" if name == "train" else f"data.{name}_paths"
        skipped = f" ({stats['skipped']} malformed, skipped)" if stats.get("skipped") else ""
        raise errors.BadInput(f"{key}: {path} holds no records{skipped}")
      recs.extend(loaded)
    pools[name] = recs
  return pools


_TFDS_SPLIT_KEYS = (("train", "tfds_train_split"), ("eval_id", "tfds_eval_id_split"),
                   ("eval_ood", "tfds_eval_ood_split"))


def _tfds_pools(d: ml_collections.ConfigDict) -> dict[str, list]:
  """The pools read from a built TFDS dataset; its folder and every split checked before reading."""
  from dypo_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top  # Loads TFDS.
  try:
    held = tfds_builder.split_names(d.tfds_name, data_dir=d.tfds_data_dir)
  except ValueError as e:
    raise errors.BadInput(f"data.tfds_data_dir={d.tfds_data_dir!r}, data.tfds_name="
                          f"{d.tfds_name!r}: {e}") from None
  folder = tfds_builder.dataset_dir(d.tfds_name, data_dir=d.tfds_data_dir)
  for _, key in _TFDS_SPLIT_KEYS:
    if d[key] and d[key] not in held:
      empty = "" if key == "tfds_train_split" else f", or --config.data.{key}= for no such pool"
      raise errors.BadInput(f"data.{key}={d[key]!r}: the dataset at {folder} has no such split "
                            f"(it holds {held}){empty}")
  pools = {}
  for name, key in _TFDS_SPLIT_KEYS:
    if not d[key]:
      pools[name] = []
      continue
    recs, stats = tfds_builder.read_split(d.tfds_name, d[key], data_dir=d.tfds_data_dir,
                                          on_error=d.on_error)
    if stats["skipped"]:
      print(f"data: {folder} split {d[key]!r}: skipped {stats['skipped']} malformed records "
            f"(first: {stats['errors'][:1]})", flush=True)
    if not recs:
      raise errors.BadInput(f"data.{key}={d[key]!r}: {folder} holds no usable records in it "
                            f"({stats['skipped']} malformed, skipped)")
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
    prefix = paths.join(workdir, "tokenizer", "spm")
    # Process 0 trains (the workdir is shared); the others wait for its file. Training writes
    # under a temporary local name; the model file is put in place whole and last, so a run
    # killed meanwhile never leaves a half-written spm.model for the restart to read.
    if not paths.exists(prefix + ".model") and jax.process_index() == 0:
      local = (prefix if not paths.is_remote(prefix)
               else os.path.join(paths.staging_dir(workdir), "tokenizer", "spm"))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      for leftover in glob.glob(local + ".tmp-*"):
        os.remove(leftover)
      corpus = []
      for rec in pools["train"]:
        corpus.append(rec.prompt)
        corpus.extend(s.response for s in rec.teachers)
      tmp = f"{local}.tmp-{os.getpid()}"
      tokenizers.train_sentencepiece(corpus, vocab_size=t.train_vocab_size, out_prefix=tmp)
      for suffix in (".vocab", ".model"):  # The model last: its presence means complete.
        if paths.is_remote(prefix):
          paths.makedirs(paths.join(workdir, "tokenizer"))
          with open(tmp + suffix, "rb") as f:
            paths.write_bytes(prefix + suffix, f.read())
          os.remove(tmp + suffix)
        else:
          os.replace(tmp + suffix, prefix + suffix)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dypo_jax.build.build_tokenizer")
    tok = tokenizers.SentencePieceTokenizer(paths.local_copy(prefix + ".model"))
  if config.model.init == "random":
    tokenizers.check_vocab_fits(tok, config.model.vocab_size)
  return tok


def model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The ModelConfig a run builds: the config's fields, or with model.init="hf" the architecture
  of hf_path's config.json when that file is readable here (the schema-only fields, such as
  dtypes, remat, chunks and max_seq_len, always come from the config)."""
  mc = models.model_config_from_dict(config.model.to_dict())
  m = config.model
  if m.init == "hf" and os.path.exists(os.path.join(m.hf_path, hf_config.CONFIG_FILE)):
    from_file = hf_config.model_config_from_dir(m.hf_path, dtype=m.dtype,
                                                param_dtype=m.param_dtype,
                                                max_seq_len=m.max_seq_len)
    mc = dataclasses.replace(from_file, **{f.name: getattr(mc, f.name)
                                           for f in dataclasses.fields(mc)
                                           if f.name not in hf_config.ARCH_FIELDS})
  return mc


def model_options(config: ml_collections.ConfigDict) -> builder.ModelOptions:
  """The options of the model a run builds (`models.builder`): `model_config`, the mesh rules,
  and the residual stream pinned to the batch sharding, as `python -m dypo_jax.tools.aot`
  compiles it."""
  return builder.ModelOptions.for_run(model_config(config), sharding.mesh_rules(config))


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                tokenizer: tokenizers.Tokenizer | None = None) -> models.Transformer:
  """The run's sharded model (`model_options`): fresh weights, or a Hugging Face checkpoint.

  On a multi-device mesh the residual stream is pinned to the batch sharding
  (`Transformer.activation_sharding`, `sharding.activation_sharding`); on one device nothing is.
  """
  options = model_options(config)
  if config.model.init == "hf":
    model = models.load_pretrained(config.model.hf_path, options, mesh)
  else:
    model = builder.build(options, mesh, seed=config.seed)
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
      f"model     {mc.arch}  layers={mc.num_layers} ({'scanned' if mc.scan_layers else 'looped'})"
      f" embed={mc.embed_dim} heads={mc.num_heads}/"
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
