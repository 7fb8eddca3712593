"""dypo_jax: DYPO post-training for LLM reasoners in JAX."""
