"""Pallas kernels, each beside a plain-jnp reference of the same signature.

- `logprob`: LM head + log-softmax fused over vocab blocks (target log-probs and entropies), for
  TPU (Mosaic).
- `logprob_gpu`: the same for GPUs (Triton), with the same signature and reference.

Installed as `dypo_jax.kernels` (setup.py), the only name it answers to. PyPI has an unrelated
package `kernels` (transformers imports it). When the repository root is on `sys.path`
(`python -m ...` run from the root), `import kernels` would find this folder first and shadow it;
imported under any other name, this file hands the name to the next package of that name on the
path, or fails saying so.
"""
if __name__ != "dypo_jax.kernels":
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
  _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
  if _spec is None:
    raise ImportError(f"{os.path.dirname(__file__)} is dypo_jax's kernel folder: import it as "
                      f"dypo_jax.kernels, not {__name__!r} (no other package {__name__!r} is "
                      f"installed)")
  _module = importlib.util.module_from_spec(_spec)
  sys.modules[__name__] = _module  # An import returns what sys.modules holds once this file ran.
  _spec.loader.exec_module(_module)
