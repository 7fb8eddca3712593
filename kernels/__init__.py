"""Pallas kernels, each beside a plain-jnp reference of the same signature.

- `logprob`: LM head + log-softmax fused over vocab blocks (target log-probs and entropies).

Installed as `dypo_jax.kernels` (see setup.py); import it under that name.
"""
