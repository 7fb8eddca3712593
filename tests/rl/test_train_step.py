"""The pure DYPO update: micro-batching is exact, sharding changes nothing, one compile per run."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dypo_jax import models
from dypo_jax.rl import train_step as step_lib
from dypo_jax.rl import update_batch

_MODEL = models.ModelConfig(vocab_size=48, embed_dim=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64)
_U, _K, _P, _T = 4, 4, 6, 8


def make_batch(seed: int = 0, weights=(0.5, 0.25, 0.25)) -> dict[str, np.ndarray]:
  """Two Mid items (K rollouts, mixed rewards), one Hard slot (one teacher row), one LUFFY group."""
  rng = np.random.default_rng(seed)
  shapes = update_batch.spec_shapes(items=_U, k=_K, prompt_len=_P, max_len=_T)
  b = {n: np.zeros(s, np.dtype(d)) for n, (s, d) in shapes.items()}
  b["tokens"][:] = rng.integers(1, _MODEL.vocab_size, size=b["tokens"].shape)
  b["teacher_id"][:] = -1
  for u in range(_U):
    plen = int(rng.integers(2, _P + 1))
    for k in range(_K):
      rlen = int(rng.integers(1, _T + 1))
      b["input_mask"][u, k, _P - plen:_P + rlen] = True
      b["resp_mask"][u, k, :rlen] = 1.0
      b["old_logp"][u, k, :rlen] = -rng.uniform(0.5, 5.0, size=rlen)
  b["row_kind"][0:2] = update_batch.ROW_ROLLOUT
  b["rewards"][0] = [1, 0, 0, 1]
  b["rewards"][1] = [0, 1, 1, 1]
  b["row_kind"][2, 0] = update_batch.ROW_TEACHER_SFT
  b["teacher_id"][2, 0] = 1
  b["row_kind"][3, :_K - 1] = update_batch.ROW_ROLLOUT
  b["row_kind"][3, _K - 1] = update_batch.ROW_TEACHER_OFFPOLICY
  b["rewards"][3] = [0, 1, 0, 1]
  b["adv_rewards"][:] = b["rewards"]
  b["weights"][:] = weights
  return b


def step_config(**overrides) -> step_lib.StepConfig:
  base = dict(prompt_len=_P, temperature=1.0, clip_low=0.2, clip_high=0.2, kl_coef=0.01,
              kl_estimator="k3", agg_mode="token-mean", max_len=_T, scale_adv_by_std=True,
              adv_eps=1e-6, beta_gal=1.0, gal_length_norm="sum", offpolicy_shaping=0.1,
              micro_batches=1, num_teachers=3, logprob_impl="full", vocab_chunk=16,
              pallas_interpret=True, use_gal=True,
              per_term_grad_norms=True)
  base.update(overrides)
  return step_lib.StepConfig(**base)


def make_state(seed: int = 0, model_config: models.ModelConfig = _MODEL):
  model = models.Transformer(model_config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  # A perturbed reference so that KL and GAL's Δ are not zero.
  ref = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
  tx, sched = step_lib.make_optimizer(learning_rate=1e-3, schedule="constant", warmup_steps=0,
                                      total_steps=10, min_lr_ratio=0.1, weight_decay=0.0,
                                      b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), nonfinite_skipped=jnp.zeros((), jnp.int32))
  return graphdef, state, ref, tx, sched


def run_step(cfg, batch, seed=0, model_config=_MODEL):
  graphdef, state, ref, tx, sched = make_state(seed, model_config)
  fn = jax.jit(step_lib.build_train_step(graphdef, cfg, tx, sched))
  new_state, metrics = fn(state, ref, batch, jax.random.key(0))
  return new_state, jax.device_get(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"])
def test_micro_batches_equal_big_batch(agg_mode):
  batch = make_batch()
  big_state, big = run_step(step_config(agg_mode=agg_mode), batch)
  small_state, small = run_step(step_config(agg_mode=agg_mode, micro_batches=4), batch)
  for name in ("loss/total", "loss/sft", "loss/grpo", "loss/gal", "grad/norm", "grad/norm_sft",
               "grad/norm_grpo", "grad/norm_gal", "policy/entropy", "policy/kl", "gal/pairs"):
    np.testing.assert_allclose(small[name], big[name], rtol=2e-5, atol=1e-6, err_msg=name)
  # Adam divides by sqrt(v): a gradient entry near zero turns float-order noise into up to
  # ~1e-3 of a step (lr 1e-3), hence atol 5e-6 on the parameters.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),
               small_state.params, big_state.params)


@pytest.mark.slow
def test_weights_select_terms_and_update_moves_params():
  batch = make_batch(weights=(1.0, 0.0, 0.0))
  state0 = make_state()[1]
  state, m = run_step(step_config(), batch)
  np.testing.assert_allclose(m["loss/total"], m["loss/sft"], rtol=1e-6)
  # GAL pairs: item 0 [1,0,0,1] has 2x2, item 1 [0,1,1,1] 3x1, the LUFFY group's rollout rows
  # [0,1,0] 1x2 (its teacher row is not a rollout, so it is no GAL member): 9.
  assert m["loss/sft"] > 0 and np.isfinite(m["loss/grpo"]) and m["gal/pairs"] == 9
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params,
                                       state0.params))
  assert max(moved) > 0
  assert int(state.step) == 1 and int(state.nonfinite_skipped) == 0
  # Per-teacher SFT metrics: only teacher 1 has a trace in this batch.
  assert m["sft/teacher_tokens"][1] > 0 and m["sft/teacher_tokens"][0] == 0


def _overflowing_bf16_state():
  """A bfloat16-compute model whose logits overflow to inf. (bfloat16 keeps float32's exponent
  range, and RMSNorm maps an overflowed residual stream to zeros, so the overflow is put where no
  norm follows: the final norm's scale and the LM head.)"""
  graphdef, state, ref, tx, sched = make_state(model_config=dataclasses.replace(
      _MODEL, dtype="bfloat16"))
  huge = ("final_norm", "lm_head")
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1e30 if any(h in jax.tree_util.keystr(path) for h in huge) else x,
      state.params)
  return graphdef, state.replace(params=params), ref, tx, sched


@pytest.mark.parametrize("poison", ["nan_old_logp", "inf_weight",
                                    pytest.param("bf16_overflow", marks=pytest.mark.slow)])
def test_nonfinite_update_is_skipped_and_counted(poison):
  batch = make_batch()
  graphdef, state, ref, tx, sched = make_state()
  if poison == "nan_old_logp":  # A corrupted behaviour log-prob poisons the loss.
    batch["old_logp"][0, 0, 0] = np.nan
  elif poison == "inf_weight":  # An injected inf: loss and gradient are inf.
    batch["weights"][0] = np.inf
  else:
    graphdef, state, ref, tx, sched = _overflowing_bf16_state()
  before = jax.tree.map(np.asarray, state.params)
  fn = jax.jit(step_lib.build_train_step(graphdef, step_config(), tx, sched))
  new_state, m = fn(state, ref, batch, jax.random.key(0))
  assert int(m["train/update_skipped"]) == 1 and int(new_state.nonfinite_skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state.params), before)


@pytest.mark.slow
@pytest.mark.parametrize("learning_rate", [float("nan"), 1e39])
def test_an_update_that_would_write_nonfinite_params_is_skipped(learning_rate):
  """Loss and gradient finite, the update not (a nan learning rate; one so large that Adam's
  unit-sized step overflows float32): the parameters stay as they were and the skip counts."""
  graphdef, state, ref, _, _ = make_state()
  tx, sched = step_lib.make_optimizer(learning_rate=learning_rate, schedule="constant",
                                      warmup_steps=0, total_steps=10, min_lr_ratio=0.1,
                                      weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
  state = state.replace(opt_state=tx.init(state.params))
  before = jax.tree.map(np.asarray, state.params)
  fn = jax.jit(step_lib.build_train_step(graphdef, step_config(), tx, sched))
  new_state, m = fn(state, ref, make_batch(), jax.random.key(0))
  assert np.isfinite(float(m["loss/total"])) and np.isfinite(float(m["grad/norm"]))
  assert int(m["train/update_skipped"]) == 1 and int(new_state.nonfinite_skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state.params), before)


@pytest.mark.slow
def test_step_compiles_once_over_a_run():
  graphdef, state, ref, tx, sched = make_state()
  traces = []
  step_fn = step_lib.build_train_step(graphdef, step_config(), tx, sched)

  def counted(*args):
    traces.append(1)
    return step_fn(*args)

  fn = jax.jit(counted, donate_argnums=(0,))
  for i in range(4):
    state, _ = fn(state, ref, make_batch(seed=i, weights=(i / 4, 1 - i / 4, 0.0)),
                  jax.random.key(i))
  assert len(traces) == 1


def sharded_run(mesh, *, activation_sharding: bool, **cfg_overrides):
  """`run_step` on `mesh`: params, reference and batch placed by the default rules (and, if
  asked, the model's residual stream pinned as `build.build_model` pins it). Returns
  (new state, metrics on the host)."""
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  rules = sharding.DEFAULT_RULES
  batch = make_batch()
  graphdef, state, ref, tx, sched = make_state()
  model = nnx.merge(graphdef, state.params)
  if activation_sharding:
    model.activation_sharding = sharding.activation_sharding(
        mesh, sharding.activation_axes(rules))
  graphdef = nnx.split(model, nnx.Param)[0]
  shardings = sharding.param_shardings(nnx.state(model, nnx.Param), mesh, rules)
  params = jax.device_put(state.params, shardings)
  ref = jax.device_put(ref, shardings)
  state = step_lib.TrainState(step=state.step, params=params, opt_state=tx.init(params),
                              nonfinite_skipped=state.nonfinite_skipped)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  dbatch = {k: jax.device_put(v, replicated if k == "weights"
                              else sharding.batch_sharding(mesh, rules, v.ndim))
            for k, v in batch.items()}
  fn = jax.jit(step_lib.build_train_step(graphdef, step_config(**cfg_overrides), tx, sched))
  new_state, metrics = fn(state, ref, dbatch, jax.random.key(0))
  return new_state, jax.device_get(metrics)


@pytest.mark.slow
def test_sharded_step_equals_single_device(fake_devices):
  out = fake_devices("""
    import jax, numpy as np
    from flax import nnx
    from dypo_jax.parallel import sharding
    import tests.rl.test_train_step as t
    from dypo_jax.rl import train_step as step_lib
    from dypo_jax.rl import update_batch
    batch = t.make_batch()
    _, single = t.run_step(t.step_config(), batch)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    new_state, sharded = t.sharded_run(mesh, activation_sharding=False)
    for k in ("loss/total", "grad/norm", "loss/gal", "policy/kl"):
      np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
    spec = new_state.params["blocks"]["attn"]["q_proj"].value.sharding.spec
    print("OK", spec)
  """)
  assert "OK" in out and "fsdp" in out


def test_micro_batch_rows_may_be_fewer_items_than_batch_shards():
  # 8 shards: a micro-batch of one item is fine when its K = 8 rows divide over them.
  assert update_batch.micro_batch_error(items=64, micro_batches=64, k=8, batch_shards=8) is None
  assert update_batch.slot_buckets(update_prompts=64, micro_batches=64, k=8, batch_shards=8) == [64]
  assert update_batch.slot_buckets(update_prompts=64, micro_batches=16, k=8,
                               batch_shards=8) == [16, 32, 64]
  assert update_batch.slot_buckets(update_prompts=64, micro_batches=8, k=8,
                               batch_shards=8) == [16, 32, 64]
  assert "12 rows, which must be a multiple of the 8" in update_batch.micro_batch_error(
      items=16, micro_batches=4, k=3, batch_shards=8)
  assert "multiple of the 8 batch shards" in update_batch.micro_batch_error(
      items=4, micro_batches=4, k=8, batch_shards=8)
  assert "multiple of train.micro_batches=3" in update_batch.micro_batch_error(
      items=8, micro_batches=3, k=8, batch_shards=1)
  for u, m, k, s in ((32, 4, 8, 8), (24, 2, 4, 4), (8, 1, 8, 2), (64, 32, 8, 8)):
    for b in update_batch.slot_buckets(update_prompts=u, micro_batches=m, k=k, batch_shards=s):
      assert update_batch.micro_batch_error(items=b, micro_batches=m, k=k, batch_shards=s) is None


@pytest.mark.slow
def test_one_item_micro_batches_split_by_rows_equal_single_device(fake_devices):
  # 4 batch shards (fsdp) x tensor 2; micro-batches of one item, whose K = 4 rows are split over
  # the 4 shards by the model's activation sharding (as build.build_model sets it).
  out = fake_devices("""
    import jax, numpy as np
    from flax import nnx
    from dypo_jax.parallel import sharding
    import tests.rl.test_train_step as t
    from dypo_jax.rl import train_step as step_lib
    from dypo_jax.rl import update_batch
    batch = t.make_batch()
    _, single = t.run_step(t.step_config(), batch)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    assert update_batch.micro_batch_error(items=t._U, micro_batches=t._U, k=t._K,
                                      batch_shards=4) is None
    assert tuple(sharding.activation_sharding(
        mesh, sharding.activation_axes(sharding.DEFAULT_RULES)).spec) == ("fsdp", None, None)
    new_state, sharded = t.sharded_run(mesh, activation_sharding=True, micro_batches=t._U)
    for k in ("loss/total", "loss/sft", "loss/grpo", "loss/gal", "grad/norm", "policy/kl",
              "policy/entropy", "grad/norm_gal"):
      np.testing.assert_allclose(sharded[k], single[k], rtol=2e-5, atol=1e-6, err_msg=k)
    spec = new_state.params["blocks"]["attn"]["q_proj"].value.sharding.spec
    print("OK", spec)
  """)
  assert "OK" in out and "fsdp" in out


@pytest.mark.slow
def test_per_term_grad_norms_equal_each_terms_own_gradient_on_a_large_batch():
  # 128 rows: at this size jax 0.10.2 miscompiled `jax.vmap` over the step's VJP under jit (a
  # zero cotangent gave a non-zero gradient), so the step takes one VJP per term instead.
  tiled = {k: (v if k == "weights" else np.concatenate([v] * 8)) for k, v in make_batch().items()}
  cfg = step_config()
  graphdef, state, ref, _, _ = make_state()
  _, got = run_step(cfg, tiled)
  denoms = step_lib._denominators(tiled, cfg)  # pylint: disable=protected-access
  mb = {k: jnp.asarray(v) for k, v in tiled.items() if k != "weights"}
  for i, name in enumerate(update_batch.TERMS):
    term = lambda p, i=i: step_lib._loss_terms(p, ref, graphdef, mb, denoms, cfg)[0][i]  # pylint: disable=protected-access
    want = optax.global_norm(jax.jit(jax.grad(term))(state.params))
    np.testing.assert_allclose(got[f"grad/norm_{name}"], want, rtol=1e-5, err_msg=name)


def test_term_gradients_are_each_terms_gradient():
  # experiments/variance.py reads the terms apart; the update descends `weights @ grads`.
  batch = make_batch()
  cfg = step_config()
  graphdef, state, ref, _, _ = make_state()
  terms, grads, metrics = jax.jit(step_lib.build_term_gradients(graphdef, cfg, with_metrics=True))(
      state.params, ref, batch)
  denoms = step_lib._denominators(batch, cfg)  # pylint: disable=protected-access
  mb = {k: jnp.asarray(v) for k, v in batch.items() if k != "weights"}
  loss_terms = lambda p: step_lib._loss_terms(p, ref, graphdef, mb, denoms, cfg)[0]  # pylint: disable=protected-access
  # The metric sums of the same forward pass (GAL's pairs and η = mean (1 − σ(βd))² in (0, 1)).
  want_terms, want_m = step_lib._loss_terms(state.params, ref, graphdef, mb, denoms, cfg)  # pylint: disable=protected-access
  for key in ("gal/pairs", "gal/pair_acc_sum", "gal/eta_sum"):
    np.testing.assert_allclose(metrics[key], want_m[key], rtol=1e-5, err_msg=key)
  assert float(metrics["gal/pairs"]) > 0 and 0 < float(metrics["gal/eta_sum"]) < float(
      metrics["gal/pairs"])
  # Every term's own gradient in one program (one compile).
  want = jax.jit(lambda p: [jax.grad(lambda q, i=i: loss_terms(q)[i])(p)
                            for i in range(len(update_batch.TERMS))])(state.params)
  np.testing.assert_allclose(terms, want_terms, rtol=1e-5)
  for i, name in enumerate(update_batch.TERMS):
    jax.tree.map(lambda g, w, i=i: np.testing.assert_allclose(g[i], w, rtol=1e-4, atol=1e-6,
                                                              err_msg=name), grads, want[i])
    assert float(optax.global_norm(want[i])) > 0, name  # Every term of this batch moves weights.


def test_layout_batch_packs_hard_items_and_lays_out_groups():
  from dypo_jax.rl import queues  # pylint: disable=g-import-not-at-top
  k, p, t, pad = 4, 5, 6, 0
  hard = [queues.HardItem(uid=f"h{i}", prompt_tokens=np.array([7, 8 + i], np.int32),
                          teacher="b" if i % 2 else "a", teacher_index=0,
                          response_tokens=np.array([9, 10, 11], np.int32), step=0)
          for i in range(5)]
  responses = np.arange(1, 1 + k * t, dtype=np.int32).reshape(k, t)
  mid = [queues.MidItem(uid="m0", prompt_tokens=np.array([5, 6, 7], np.int32),
                        response_tokens=responses, response_lengths=np.array([6, 2, 3, 1]),
                        rewards=np.array([1, 0, 0, 1], np.float32),
                        shaped_rewards=np.array([1, -0.5, 0, 1], np.float32),
                        logprobs=-np.ones((k, t), np.float32), step=0),
         queues.MidItem(uid="m1", prompt_tokens=np.array([4], np.int32),
                        response_tokens=responses, response_lengths=np.array([2, 2, 2, 2]),
                        rewards=np.array([0, 1, 0, 0], np.float32),
                        shaped_rewards=np.array([0, 1, 0, 0], np.float32),
                        logprobs=-np.ones((k, t), np.float32), step=0,
                        teacher_tokens=np.array([3, 3], np.int32), teacher="a")]
  batch, offline = update_batch.layout(hard, mid, slot_buckets=(2, 4, 8), k=k, prompt_len=p,
                                         max_len=t, pad_id=pad, teacher_index={"a": 0, "b": 1})
  assert batch["tokens"].shape == (4, k, p + t) and offline == 1  # 2 Hard slots + 2 Mid = 4.
  # Hard items 0-3 fill slot 0, item 4 starts slot 1; left-padded prompt, then the trace.
  np.testing.assert_array_equal(batch["tokens"][1, 0], [0, 0, 0, 7, 12, 9, 10, 11, 0, 0, 0])
  sft = update_batch.ROW_TEACHER_SFT
  np.testing.assert_array_equal(batch["row_kind"][:2], [[sft] * 4, [sft, 0, 0, 0]])
  np.testing.assert_array_equal(batch["teacher_id"][:2], [[0, 1, 0, 1], [0, -1, -1, -1]])
  # Mid item 0 in slot 2: its rollouts with their own lengths, old log-probs and rewards.
  np.testing.assert_array_equal(batch["resp_mask"][2].sum(-1), [6, 2, 3, 1])
  np.testing.assert_array_equal(batch["input_mask"][2, 1], [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["adv_rewards"][2], [1, -0.5, 0, 1])
  assert batch["old_logp"][2, 0].sum() == -6
  # Mid item 1 (LUFFY-style): K - 1 rollouts, then the teacher as an off-policy row, reward 1.
  np.testing.assert_array_equal(batch["row_kind"][3], [1, 1, 1, update_batch.ROW_TEACHER_OFFPOLICY])
  np.testing.assert_array_equal(batch["rewards"][3], [0, 1, 0, 1])
  np.testing.assert_array_equal(batch["tokens"][3, 3, p:p + 3], [3, 3, 0])
  assert not batch["weights"].any()  # The trainer sets the term weights.



def shared_prompt_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """`make_batch` with every slot's rows holding its first row's prompt (groups only)."""
  b = make_batch(seed)
  b["tokens"][:, :, :_P] = b["tokens"][:, :1, :_P]
  b["input_mask"][:, :, :_P] = b["input_mask"][:, :1, :_P]
  return b


def test_slots_share_prompts_tells_groups_from_packed_rows():
  assert update_batch.slots_share_prompts(shared_prompt_batch(), _P)
  assert not update_batch.slots_share_prompts(make_batch(), _P)  # Each row its own prompt.
  b = shared_prompt_batch()
  b["input_mask"][1, 2, _P - 1] = False  # Same tokens, one row's prompt a token shorter.
  assert not update_batch.slots_share_prompts(b, _P)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_shared_prompt_path_equals_row_path(micro_batches):
  # One prompt pass per slot into a KV cache read by its K responses: the same losses, metrics
  # and update as running every row whole (left-padded prompts of different lengths per slot).
  batch = shared_prompt_batch(seed=3)
  rows_state, rows = run_step(step_config(micro_batches=micro_batches), batch)
  shared_state, shared = run_step(
      step_config(micro_batches=micro_batches, shared_prompt=True), batch)
  for name, value in rows.items():
    np.testing.assert_allclose(shared[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),  # As above.
               shared_state.params, rows_state.params)


def test_a_loop_over_layers_updates_as_the_scan_does_with_a_shared_prompt_cache():
  # model.scan_layers=False: the same update, through the per-layer KV cache of the prompt pass.
  batch = shared_prompt_batch(seed=3)
  cfg = step_config(shared_prompt=True)
  scan_state, scanned = run_step(cfg, batch)
  loop_state, looped = run_step(cfg, batch, model_config=dataclasses.replace(
      _MODEL, scan_layers=False))
  for name, value in scanned.items():
    np.testing.assert_allclose(looped[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),
               loop_state.params, scan_state.params)


@pytest.mark.slow
def test_shared_prompt_logprobs_equal_row_logprobs_with_chunked_vocabulary():
  batch = shared_prompt_batch(seed=5)
  graphdef, state, _, _, _ = make_state()
  temp = jnp.full((_U * _K,), 0.7, jnp.float32)
  out = {}
  for shared in (False, True):
    cfg = step_config(shared_prompt=shared, logprob_impl="chunked")
    out[shared] = jax.jit(lambda p, cfg=cfg: step_lib._response_logprobs(  # pylint: disable=protected-access
        graphdef, p, batch["tokens"], batch["input_mask"], temp, cfg))(state.params)
  mask = batch["resp_mask"].reshape(_U * _K, _T) > 0
  for a, b in zip(out[True], out[False]):
    np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# One scale for the three terms, and the logged metrics are the losses' own (METHOD.md §2, §6).

_LONG_T = 24


def _on_policy_groups(graphdef, params, cfg, rewards, seed=0):
  """Mid groups of long responses (16-24 tokens) whose old_logp is the policy's own (ρ = 1)."""
  rng = np.random.default_rng(seed)
  u, k = rewards.shape
  shapes = update_batch.spec_shapes(items=u, k=k, prompt_len=_P, max_len=_LONG_T)
  b = {n: np.zeros(s, np.dtype(d)) for n, (s, d) in shapes.items()}
  b["tokens"][:] = rng.integers(1, _MODEL.vocab_size, size=b["tokens"].shape)
  b["teacher_id"][:] = -1
  for i in range(u):
    for j in range(k):
      rlen = int(rng.integers(16, _LONG_T + 1))
      b["input_mask"][i, j, :_P + rlen] = True
      b["resp_mask"][i, j, :rlen] = 1.0
  b["row_kind"][:] = update_batch.ROW_ROLLOUT
  b["rewards"][:] = rewards
  b["adv_rewards"][:] = rewards
  temp = jnp.ones((u * k,), jnp.float32)
  logp, _ = jax.jit(lambda p: step_lib._response_logprobs(  # pylint: disable=protected-access
      graphdef, p, jnp.asarray(b["tokens"]), jnp.asarray(b["input_mask"]), temp, cfg))(params)
  b["old_logp"][:] = np.asarray(logp).reshape(u, k, _LONG_T) * b["resp_mask"]
  return b


@pytest.mark.slow
def test_default_scale_puts_gal_and_grpo_gradients_within_4x_and_legacy_does_not():
  # Policy == reference (Δ = 0, σ = 1/2) and on-policy rows (ρ = 1): each term's gradient scale
  # is its normalisation alone. GAL's per-token weight is β/2 over a group's successes; GRPO's
  # Â over its token count; 'legacy' leaves GAL ~ the mean length (here ~20) times larger.
  rewards = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], np.float32)
  graphdef, state, _, _, _ = make_state()
  ratios = {}
  for scale, agg in (("token", "token-mean"), ("sequence", "seq-mean-token-sum-norm"),
                     ("legacy", "token-mean")):
    cfg = step_config(loss_scale=scale, agg_mode=agg, max_len=_LONG_T, kl_coef=0.0)
    batch = _on_policy_groups(graphdef, state.params, cfg, rewards)
    _, grads = jax.jit(step_lib.build_term_gradients(graphdef, cfg))(state.params, state.params,
                                                                     batch)
    w_grpo, w_gal = 0.5, 0.5  # routing.loss_weights of an all-Mid batch at α = 0.5.
    norm = lambda i: float(optax.global_norm(jax.tree.map(lambda g, i=i: g[i], grads)))
    ratios[scale] = w_gal * norm(2) / (w_grpo * norm(1))
  print("weighted grad/norm_gal / grad/norm_grpo:", ratios)
  assert 0.25 < ratios["token"] < 4, ratios
  assert 0.25 < ratios["sequence"] < 4, ratios
  assert ratios["legacy"] > 4, ratios


@pytest.mark.slow
@pytest.mark.parametrize("loss_scale,agg_mode", [("token", "token-mean"),
                                                 ("sequence", "seq-mean-token-sum-norm")])
def test_micro_batches_equal_big_batch_for_the_loss_scales(loss_scale, agg_mode):
  batch = make_batch()
  cfg = dict(loss_scale=loss_scale, agg_mode=agg_mode, per_term_grad_norms=False)
  big_state, big = run_step(step_config(**cfg), batch)
  small_state, small = run_step(step_config(micro_batches=4, **cfg), batch)
  for name in ("loss/total", "loss/sft", "loss/grpo", "loss/gal", "grad/norm", "policy/kl",
               "policy/clip_frac", "policy/ratio_mean", "gal/margin"):
    np.testing.assert_allclose(small[name], big[name], rtol=2e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6),
               small_state.params, big_state.params)


@pytest.mark.slow
def test_logged_clip_frac_ratio_and_kl_follow_method_md():
  # METHOD.md §6: policy/clip_frac is the share of rollout tokens where the clipped branch is
  # the min (ρ > 1 + ε_high with Â > 0, or ρ < 1 - ε_low with Â < 0); ratio and KL are means
  # over the same tokens. ρ = exp(offset) per token, offsets far from the clip edges.
  rewards = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], np.float32)
  graphdef, state, ref, tx, sched = make_state()
  cfg = step_config(max_len=_LONG_T, per_term_grad_norms=False, micro_batches=2)
  batch = _on_policy_groups(graphdef, state.params, cfg, rewards, seed=1)
  rng = np.random.default_rng(5)
  offsets = rng.choice([-0.5, -0.1, 0.0, 0.1, 0.5], size=batch["old_logp"].shape)
  mask = batch["resp_mask"] > 0
  batch["old_logp"] = np.where(mask, batch["old_logp"] - offsets, 0.0).astype(np.float32)
  ratio = np.exp(offsets)
  adv_sign = np.sign(rewards - rewards.mean(-1, keepdims=True))[..., None]  # Group 2: Â = 0.
  clipped = ((adv_sign > 0) & (ratio > 1.2)) | ((adv_sign < 0) & (ratio < 0.8))
  want_clip = clipped[mask].mean()
  assert 0.05 < want_clip < 0.5  # The batch exercises both outcomes.
  _, m = jax.device_get(jax.jit(step_lib.build_train_step(graphdef, cfg, tx, sched))(
      state, ref, batch, jax.random.key(0)))
  np.testing.assert_allclose(m["policy/clip_frac"], want_clip, rtol=1e-6)
  np.testing.assert_allclose(m["policy/ratio_mean"], ratio[mask].mean(), rtol=1e-5)
  # KL (k3) to the reference over the rollout tokens, from the policy's log-probs.
  temp = jnp.ones((batch["tokens"].shape[0] * batch["tokens"].shape[1],), jnp.float32)
  lp = lambda p: np.asarray(step_lib._response_logprobs(  # pylint: disable=protected-access
      graphdef, p, jnp.asarray(batch["tokens"]), jnp.asarray(batch["input_mask"]), temp,
      cfg)[0]).reshape(mask.shape)
  d = lp(state.params) - lp(ref)
  np.testing.assert_allclose(m["policy/kl"], (np.exp(-d) + d - 1)[mask].mean(), rtol=1e-4)
