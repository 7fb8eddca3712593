"""Packed updates: several responses a row give the same loss, gradients and metrics as the rows
laid out one a row, for every method, with micro-batching and with shared prompts."""
import dataclasses
import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax import models
from dypo_jax.models import transformer
from dypo_jax.rl import program as program_lib
from dypo_jax.rl import queues as queues_lib
from dypo_jax.rl import routing
from dypo_jax.rl import train_step as step_lib
from dypo_jax.rl import update_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_train_step  # noqa: E402  pylint: disable=g-import-not-at-top  # Same folder.
import tiny_runs  # noqa: E402  pylint: disable=g-import-not-at-top

_MODEL = models.ModelConfig(vocab_size=48, embed_dim=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64)
_K, _P, _T = 4, 6, 12
_TEACHERS = {"a": 0, "b": 1}
METHODS = ("dypo", "grpo", "sft", "sft_then_rl", "luffy", "sft_plus_rl", "srft", "chord")
# experiments/baselines.py's variant of each method.
_VARIANTS = {**{m: m for m in METHODS}, "sft_plus_rl": "ladder_rl"}


def _items(seed: int, *, hard: int, mid: int, luffy: int):
  """Random Hard and Mid items of long-tailed response lengths (some empty, some full)."""
  rng = np.random.default_rng(seed)
  prompt = lambda: rng.integers(1, _MODEL.vocab_size, int(rng.integers(1, _P + 1)))
  length = lambda: int(min(rng.geometric(0.3) - 1, _T))
  hard_items = [queues_lib.HardItem(
      uid=f"h{i}", prompt_tokens=prompt(), teacher="ab"[i % 2], teacher_index=0,
      response_tokens=rng.integers(1, _MODEL.vocab_size, max(length(), 1)), step=0)
                for i in range(hard)]
  mid_items = []
  for i in range(mid):
    k = _K - 1 if i < luffy else _K
    rewards = (np.arange(k) + i) % 2
    mid_items.append(queues_lib.MidItem(
        uid=f"m{i}", prompt_tokens=prompt(),
        response_tokens=rng.integers(1, _MODEL.vocab_size, (k, _T)),
        response_lengths=np.array([length() for _ in range(k - 1)] + [_T]),
        rewards=rewards, shaped_rewards=rewards - 0.1 * (np.arange(k) == 0),
        logprobs=-rng.uniform(0.2, 4.0, (k, _T)), step=0,
        teacher_tokens=(rng.integers(1, _MODEL.vocab_size, max(length(), 1)) if i < luffy
                        else None), teacher="a" if i < luffy else None))
  return hard_items, mid_items


def _batch(seed: int, *, items: int, hard: int, mid: int, luffy: int = 0,
           weights=(0.4, 0.4, 0.2)):
  hard_items, mid_items = _items(seed, hard=hard, mid=mid, luffy=luffy)
  batch, _ = update_batch.layout(hard_items, mid_items, slot_buckets=[items], k=_K,
                                 prompt_len=_P, max_len=_T, pad_id=0, teacher_index=_TEACHERS)
  batch["weights"][:] = weights
  return batch


def _step_config(method: str, **overrides) -> step_lib.StepConfig:
  """The method's step as the trainer builds it (program.step_config of its tiny config)."""
  config = tiny_runs.tiny_config(_VARIANTS[method])
  config.sampler.max_new_tokens = _T
  config.rl.kl_coef = 0.02  # So that the KL term, metric and reference pass are all exercised.
  config.model.logprob_impl = "full"
  cfg = program_lib.step_config(config, prompt_len=_P, num_teachers=len(_TEACHERS))
  return dataclasses.replace(cfg, **overrides)


def _state(seed: int = 0):
  """test_train_step's state (a perturbed reference, the same optimizer) for this file's model."""
  return test_train_step.make_state(seed, _MODEL)


def _run(cfg, batch):
  graphdef, state, ref, tx, sched = _state()
  fn = jax.jit(step_lib.build_train_step(graphdef, cfg, tx, sched))
  new_state, metrics = fn(state, ref, batch, jax.random.key(0))
  return jax.device_get(new_state.params), jax.device_get(metrics)


def _packed(batch, *, micro_batches: int, share_prompts: bool = True):
  u, k, _ = batch["tokens"].shape
  buckets = update_batch.pack_row_buckets(rows=u // micro_batches * k, quantum=1)
  return update_batch.pack(batch, micro_batches=micro_batches, prompt_len=_P,
                           row_buckets=buckets, share_prompts=share_prompts)


def _assert_same(packed, unpacked):
  (p_params, p_metrics), (u_params, u_metrics) = packed, unpacked
  assert set(p_metrics) == set(u_metrics)
  for name in u_metrics:
    np.testing.assert_allclose(p_metrics[name], u_metrics[name], rtol=2e-5, atol=2e-6,
                               err_msg=name)
  # Adam divides by sqrt(v): a near-zero gradient entry turns float-order noise into up to ~1e-3
  # of a step (lr 1e-3), hence the absolute tolerance on the parameters.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),
               p_params, u_params)


def _weights(method: str, *, hard: int, mid: int):
  policy = routing.Policy.from_config(tiny_runs.tiny_config(_VARIANTS[method]).rl)
  return routing.loss_weights(policy, 0, n_hard=hard, n_mid=mid)


@pytest.mark.parametrize("method", [m if m == "dypo" else pytest.param(
    m, marks=pytest.mark.slow) for m in METHODS])
def test_packed_update_equals_unpacked_for_every_method(method):
  """A batch of a packed Hard slot, groups and a LUFFY group, two micro-batches: every logged
  metric (per-term gradient norms included) and the updated parameters agree."""
  hard, mid = (8, 0) if method == "sft" else (4, 3)
  batch = _batch(1, items=4, hard=hard, mid=mid, luffy=1 if mid else 0,
                 weights=_weights(method, hard=hard, mid=mid))
  # Per-term gradient norms (three backwards) on the DYPO batch, where all three terms are live.
  cfg = _step_config(method, micro_batches=2, per_term_grad_norms=method == "dypo")
  packed = _packed(batch, micro_batches=2)
  assert packed["pack_tokens"].shape[0] < 4 * _K  # The rows did pack.
  # Attention over windows of the keys each 4-query block sees (train.pack_attention_block).
  _assert_same(_run(dataclasses.replace(cfg, packed=True, pack_attention_block=4), packed),
               _run(cfg, batch))


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_packed_groups_equal_the_shared_prompt_path(micro_batches):
  """Groups alone: packed with each slot's prompt shared in its rows, against the unpacked
  shared-prompt path and against packing every row whole."""
  batch = _batch(2, items=4, hard=0, mid=4, luffy=1)
  assert update_batch.slots_share_prompts(batch, _P)
  cfg = _step_config("dypo", micro_batches=micro_batches, per_term_grad_norms=False)
  shared = _run(dataclasses.replace(cfg, shared_prompt=True), batch)
  packed_cfg = dataclasses.replace(cfg, packed=True)
  _assert_same(_run(packed_cfg, _packed(batch, micro_batches=micro_batches)), shared)
  _assert_same(_run(packed_cfg, _packed(batch, micro_batches=micro_batches,
                                        share_prompts=False)), shared)


def test_pack_layout_holds_every_token_once_with_restarting_positions():
  batch = _batch(3, items=4, hard=4, mid=3, luffy=1)
  packed = _packed(batch, micro_batches=2)
  u, k, t = batch["resp_mask"].shape
  rows, l = packed["pack_tokens"].shape
  assert l == _P + _T and rows % 2 == 0
  for j in range(2):
    mine = packed["pack_targets"][j::2].reshape(-1)
    owner = packed["pack_row"][j::2].reshape(-1)
    for ul, uu in enumerate(range(j, u, 2)):
      for kk in range(k):
        n = int(batch["resp_mask"][uu, kk].sum())
        at = packed["pack_index"][uu, kk, :n]
        # Each response token is predicted once, at a position that targets it for its row.
        np.testing.assert_array_equal(mine[at], batch["tokens"][uu, kk, _P:_P + n])
        assert (owner[at] == ul * k + kk).all()
    assert (owner >= 0).sum() == batch["resp_mask"][j::2].sum()
  segments, positions = packed["pack_segments"], packed["pack_positions"]
  starts = (segments != np.pad(segments, ((0, 0), (1, 0)))[:, :-1]) & (segments > 0)
  # A segment's positions count up from its start (0, or the prompt's end for a shared response).
  steps = np.diff(positions, axis=1)
  assert ((steps == 1) | starts[:, 1:] | (segments[:, 1:] == 0)).all()
  assert (positions[starts & (packed["pack_prefix"] == 0)] == 0).all()


@pytest.mark.parametrize("block", [3, 8, 64])
def test_windowed_attention_equals_dense_on_packed_rows(block):
  """Each query block over the smallest window holding the keys it sees: same outputs and
  gradients as the dense masked attention, on the queries of real tokens."""
  rng = np.random.default_rng(block)
  b, t, kv, g, h = 3, 40, 2, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, kv, g, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32) for _ in range(2))
  segments, prefix = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for row in range(b):
    at, seg = 0, 1
    while at < t - 4:
      n = int(rng.integers(1, 16))
      segments[row, at:at + n] = seg
      prefix[row, at:at + n] = seg - 1 if seg % 3 == 2 else 0  # Some share the one before.
      at, seg = at + n, seg + 1
  mask = models.segment_mask(jnp.asarray(segments), jnp.asarray(prefix))
  real = jnp.asarray(segments > 0)[:, :, None, None, None]
  weight = jnp.arange(h, dtype=jnp.float32)
  loss = lambda fn: lambda *a: (jnp.where(real, fn(*a), 0.0) * weight).sum()
  dense = lambda q, k, v: transformer._attention(q, k, v, mask)  # pylint: disable=protected-access
  windowed = lambda q, k, v: transformer._windowed_attention(  # pylint: disable=protected-access
      q, k, v, mask, block)
  np.testing.assert_allclose(jnp.where(real, windowed(q, k, v), 0.0),
                             jnp.where(real, dense(q, k, v), 0.0), atol=1e-6)
  for got, want in zip(jax.grad(loss(windowed), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_segment_mask_is_block_diagonal_causal_with_shared_prefix():
  segments = jnp.array([[1, 1, 2, 2, 3, 0]])
  prefix = jnp.array([[0, 0, 1, 1, 1, 0]])
  mask = np.asarray(models.segment_mask(segments, prefix)[0])
  want = np.array([[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0],
                   [1, 1, 0, 0, 1, 0],
                   [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, want)
  np.testing.assert_array_equal(np.asarray(models.segment_mask(segments)[0]),
                                want & (np.asarray(segments)[0][:, None]
                                        == np.asarray(segments)[0][None, :]))


def test_packed_rows_follow_the_tokens_and_buckets_are_fixed():
  """A long-tailed batch packs into fewer rows; a batch of full-length rows needs them all; the
  row count is always one of the buckets (one program each, whatever the lengths)."""
  buckets = update_batch.pack_row_buckets(rows=16, quantum=2)
  assert buckets == [2, 4, 6, 8, 10, 12, 14, 16]
  short = _batch(4, items=4, hard=0, mid=4)
  full = _batch(4, items=4, hard=0, mid=4)
  full["input_mask"][:] = True
  full["resp_mask"][:] = 1.0
  full["row_kind"][:] = update_batch.ROW_ROLLOUT
  pack = lambda b, share: update_batch.pack(b, micro_batches=1, prompt_len=_P,
                                            row_buckets=buckets, share_prompts=share)
  assert pack(short, True)["pack_tokens"].shape[0] < 16
  assert pack(full, False)["pack_tokens"].shape[0] == 16
  with pytest.raises(ValueError, match="more than the largest bucket"):
    update_batch.pack(full, micro_batches=1, prompt_len=_P, row_buckets=[8],
                      share_prompts=False)


@pytest.mark.slow
def test_trainer_packed_update_equals_unpacked_and_compiles_once_per_bucket(tmp_path):
  """Through the Trainer (train.pack_updates): the same queued items give the same update, and
  a second batch of the same packed bucket compiles nothing."""
  def trainer(pack: bool):
    config = tiny_runs.tiny_config("dypo", **{"train.pack_updates": pack})
    return tiny_runs.build_trainer(config, str(tmp_path / f"pack{int(pack)}"))

  def mid(tr, i, length):
    rng = np.random.default_rng(i)
    k, t = tr.k, tr.max_len
    return queues_lib.MidItem(
        uid=f"mid/{i}", prompt_tokens=tr.pool.prompt_tokens[i],
        response_tokens=rng.integers(3, 30, (k, t)),
        response_lengths=np.minimum(rng.geometric(1 / length, k), t),
        rewards=np.arange(k) % 2, shaped_rewards=np.arange(k) % 2,
        logprobs=np.full((k, t), -1.0), step=0)

  packed, plain = trainer(True), trainer(False)
  assert packed.program.slot_buckets == [packed.config.train.update_prompts]
  items = lambda tr, seed: [mid(tr, seed + i, 4) for i in range(4)]
  batch, info = packed.build_batch([], items(packed, 0))
  assert info["batch/packed_rows"] < 4 * packed.k
  # pylint: disable=protected-access
  got = packed._host_metrics(jax.device_get(packed.update(batch)))
  want = plain._host_metrics(jax.device_get(
      plain.update(plain.build_batch([], items(plain, 0))[0])))
  # pylint: enable=protected-access
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  compiles = packed.update_trace_count
  again, _ = packed.build_batch([], items(packed, 0))
  packed.update(again)
  assert packed.update_trace_count == compiles
