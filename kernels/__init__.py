"""Pallas kernels, each beside a plain-jnp reference of the same signature.

Installed as `dypo_jax.kernels` (see setup.py); import it under that name.
"""
