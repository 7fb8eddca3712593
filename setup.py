"""Installs dypo_jax; the top-level kernels/ folder becomes the subpackage dypo_jax.kernels.

PyPI has an unrelated package importable as `kernels`, so the folder is never put on the path
under its own name.
"""
import setuptools

_RUNTIME = [
    # Sharding APIs move between JAX releases: pin what was verified (BUILD_NOTES.md).
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "sentencepiece>=0.2.3",
    "numpy>=2.0",
    "absl-py>=2.5.1",
    "tensorflow-datasets>=4.9.10",
    "ml-collections>=1.1.0",
    "safetensors>=0.8.0",
    "tokenizers>=0.23.3",
    "tensorboardX>=2.6.5",
    "matplotlib>=3.11",
    "math-verify>=0.9.0",
    "pyarrow>=26.0",
    "array-record>=0.8.6",
    # dypo_jax.io.paths: one path type for local folders and buckets.
    "etils[epath]>=1.15.0",
]

# gs:// workdirs (dypo_jax.io.paths; Orbax writes arrays through TensorStore itself).
_GCS = ["gcsfs>=2026.10.1"]

# The versions CI ran (transformers pulls PyPI's `kernels`, which the top-level kernels/ folder
# must not shadow: tests/kernels/test_kernels_name.py).
_TEST = [
    "pytest==9.0.3",
    "pytest-xdist==3.8.0",
    "filelock==4.3.2",  # tests/conftest.py: one reference run shared by the xdist workers.
    # A CPU wheel of exactly this torch lies on local disk; anything else pulls a CUDA build.
    "torch==2.13.0",
    "transformers==5.25.0",
    # tests/io/test_gcs.py runs a workdir in a GCS API served on loopback.
    "gcsfs==2026.10.1",
    "gcp-storage-emulator==2026.7.19",
]

_PACKAGES = setuptools.find_packages(include=["dypo_jax", "dypo_jax.*"])

setuptools.setup(
    name="dypo_jax",
    version="0.1.0",
    description="DYPO (Dynamic Policy Optimization) post-training for LLM reasoners in JAX.",
    python_requires=">=3.11",
    packages=_PACKAGES + ["dypo_jax.kernels"],
    package_dir={"dypo_jax.kernels": "kernels"},
    install_requires=_RUNTIME,
    extras_require={"test": _TEST, "gcs": _GCS, "tpu": ["jax[tpu]==0.10.2"], "cuda": ["jax[cuda12]==0.10.2"]},
)
