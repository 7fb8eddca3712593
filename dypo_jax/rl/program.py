"""The update program: optimizer, train state, shardings and the jitted step, built in one place
for the Trainer (real arrays) and for `tools.aot` (abstract ones), so both compile the same
program.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dypo_jax import errors
from dypo_jax.parallel import sharding
from dypo_jax.rl import routing
from dypo_jax.rl import train_step as step_lib
from dypo_jax.rl import update_batch


def step_config(config: ml_collections.ConfigDict, *, prompt_len: int,
                num_teachers: int) -> step_lib.StepConfig:
  """The plain values the update step needs, read from the config once."""
  rl, tr, sp, m = config.rl, config.train, config.sampler, config.model
  policy = routing.Policy.from_config(rl)
  return step_lib.StepConfig(
      prompt_len=prompt_len, temperature=max(sp.temperature, 1e-6),
      clip_low=rl.clip_low, clip_high=rl.clip_high, kl_coef=rl.kl_coef,
      kl_estimator=rl.kl_estimator, agg_mode=rl.agg_mode, max_len=sp.max_new_tokens,
      scale_adv_by_std=rl.scale_adv_by_std, adv_eps=rl.adv_eps, beta_gal=rl.beta_gal,
      gal_length_norm=rl.gal_length_norm, offpolicy_shaping=rl.offpolicy_shaping,
      micro_batches=tr.micro_batches, num_teachers=max(num_teachers, 1),
      logprob_impl=m.logprob_impl, vocab_chunk=m.vocab_chunk, pallas_interpret=m.pallas_interpret,
      use_gal=routing.uses_gal(policy), per_term_grad_norms=tr.per_term_grad_norms,
      loss_scale=rl.loss_scale, sft_token_weight=routing.sft_token_weight(policy),
      positive_nll_coef=routing.positive_nll_coef(policy))


def optimizer(config: ml_collections.ConfigDict):
  """(tx, schedule) of `config.optim` over `train.num_steps` updates."""
  o = config.optim
  return step_lib.make_optimizer(
      learning_rate=o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
      total_steps=config.train.num_steps, min_lr_ratio=o.min_lr_ratio,
      weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip)


@dataclasses.dataclass
class UpdateProgram:
  """What the jitted update is made of; `build` reads the config, `jit` makes a variant."""
  graphdef: Any
  step_cfg: step_lib.StepConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  param_shardings: Any
  state_shardings: step_lib.TrainState
  batch_shardings: dict[str, jax.sharding.NamedSharding]
  slot_buckets: list[int]  # The update batch's slot counts (update_batch.slot_buckets).
  k: int
  # train.pack_updates: the batch always holds update_prompts slots, and its packed rows (per
  # micro-batch) come in these counts (update_batch.pack_row_buckets); empty: not packed.
  pack_row_buckets: list[int] = dataclasses.field(default_factory=list)

  @property
  def packed(self) -> bool:
    return bool(self.pack_row_buckets)

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, *, graphdef, params, mesh, rules,
            prompt_len: int, num_teachers: int) -> "UpdateProgram":
    """`params`: the policy's Param state, real arrays or ShapeDtypeStructs with shardings.

    Optimizer leaves shaped like a parameter (Adam's moments) take its sharding
    (`optax.tree_utils.tree_map_params`); counters are replicated. Propagation through a jitted
    `tx.init` is not enough: it leaves the counters, and the moments of replicated parameters,
    on one device, which a multi-device jit and Orbax refuse.
    """
    tr, k = config.train, config.rl.num_samples
    shards = sharding.batch_shards(mesh, rules)
    split = dict(micro_batches=tr.micro_batches, k=k, batch_shards=shards)
    error = update_batch.micro_batch_error(items=tr.update_prompts, **split)
    if error:
      raise errors.BadInput(error)  # The config asks for a split the mesh cannot make.
    tx, schedule = optimizer(config)
    replicated = sharding.replicated(mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: replicated)
    state_shardings = step_lib.TrainState(step=replicated, params=param_shardings,
                                          opt_state=opt_shardings, nonfinite_skipped=replicated)
    shapes = update_batch.spec_shapes(items=tr.update_prompts, k=k, prompt_len=prompt_len,
                                      max_len=config.sampler.max_new_tokens,
                                      pack_rows=0 if tr.pack_updates else None)
    batch_shardings = {
        name: (sharding.batch_sharding(mesh, rules, len(shape)) if name != "weights"
               else replicated) for name, (shape, _) in shapes.items()}
    # The most slots an update of this method needs (routing.update_slots), in buckets.
    slots = update_batch.slot_buckets(update_prompts=routing.update_slots(
        routing.Policy.from_config(config.rl), tr.update_prompts, k), **split)
    pack_rows = []
    if tr.pack_updates:
      # Empty slots pack into no row, so one slot count serves; the rows are what vary.
      slots = slots[-1:]
      pack_rows = update_batch.pack_row_buckets(rows=slots[0] // tr.micro_batches * k,
                                                quantum=shards)
    step_cfg = dataclasses.replace(
        step_config(config, prompt_len=prompt_len, num_teachers=num_teachers),
        packed=bool(tr.pack_updates), pack_attention_block=tr.pack_attention_block)
    return cls(graphdef=graphdef, step_cfg=step_cfg,
               tx=tx, schedule=schedule, mesh=mesh, param_shardings=param_shardings,
               state_shardings=state_shardings, batch_shardings=batch_shardings,
               slot_buckets=slots, k=k, pack_row_buckets=pack_rows)

  def init_state(self, params) -> step_lib.TrainState:
    """A fresh train state, born sharded."""
    make = lambda p: step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                         opt_state=self.tx.init(p),
                                         nonfinite_skipped=jnp.zeros((), jnp.int32))
    return jax.jit(make, out_shardings=self.state_shardings)(params)

  def abstract_state(self, params) -> step_lib.TrainState:
    """The train state as ShapeDtypeStructs with their shardings (no array is made)."""
    shaped = jax.eval_shape(self.init_state, params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shaped, self.state_shardings)

  def abstract_batch(self, items: int,
                     pack_rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The update batch as ShapeDtypeStructs; a packed program's with `pack_rows` rows per
    micro-batch (default: its largest bucket, the batch that needs every row)."""
    rows = None
    if self.packed:
      rows = self.step_cfg.micro_batches * (pack_rows or max(self.pack_row_buckets))
    shapes = update_batch.spec_shapes(items=items, k=self.k, prompt_len=self.step_cfg.prompt_len,
                                      max_len=self.step_cfg.max_len, pack_rows=rows)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[name])
            for name, (shape, dtype) in shapes.items()}

  def pack(self, batch: dict, *, share_prompts: bool) -> dict:
    """A host batch of `update_batch.layout` with its packed arrays (for a packed program)."""
    return update_batch.pack(batch, micro_batches=self.step_cfg.micro_batches,
                             prompt_len=self.step_cfg.prompt_len,
                             row_buckets=self.pack_row_buckets, share_prompts=share_prompts)

  def abstract_key(self) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(self.mesh))

  def jit(self, *, shared_prompt: bool, term_norms: bool,
          on_trace: Callable[[], None] | None = None):
    """The jitted `(state, ref_params, batch, rng) -> (state, metrics)`, state donated.

    `shared_prompt`: the batch holds groups alone (each prompt runs once; ignored by a packed
    program, whose packer shares prompts); `term_norms`: one backward per loss term for the
    per-term gradient norms (logged updates only).
    """
    cfg = dataclasses.replace(self.step_cfg, shared_prompt=shared_prompt and not self.packed,
                              per_term_grad_norms=term_norms and self.step_cfg.per_term_grad_norms)
    step_fn = step_lib.build_train_step(self.graphdef, cfg, self.tx, self.schedule)

    def traced_step(*args):
      if on_trace is not None:
        on_trace()
      return step_fn(*args)

    replicated = sharding.replicated(self.mesh)
    return jax.jit(traced_step, donate_argnums=(0,),
                   in_shardings=(self.state_shardings, self.param_shardings,
                                 self.batch_shardings, replicated),
                   out_shardings=(self.state_shardings, replicated))
