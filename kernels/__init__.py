"""Pallas kernels, each beside a plain-jnp reference of the same signature.

- `logprob`: LM head + log-softmax fused over vocab blocks (target log-probs and entropies), for
  TPU (Mosaic).
- `logprob_gpu`: the same for GPUs (Triton), with the same signature and reference.

Installed as `dypo_jax.kernels` (see setup.py); import it under that name.
"""
