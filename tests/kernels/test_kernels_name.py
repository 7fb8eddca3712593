"""The repository's top-level kernels/ folder is `dypo_jax.kernels` and never the top-level
`kernels` (an unrelated PyPI package that transformers imports), even with the repository root
first on sys.path, as `python -m pytest` or `python -c` run from the root put it."""
import pytest
import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.slow
def test_import_kernels_from_the_root_is_never_the_repository_folder():
  # `python -c` from the root puts the root ('') first on sys.path: the case that shadowed.
  proc = _python("import os, kernels; print(os.path.realpath(kernels.__file__))")
  pypi_kernels = any(
      importlib.util.find_spec("kernels", [p]) is not None for p in sys.path
      if p and os.path.isdir(p) and os.path.realpath(p) != os.path.realpath(REPO))
  if pypi_kernels:
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip().startswith(os.path.realpath(REPO)), proc.stdout
  else:
    assert proc.returncode != 0 and "dypo_jax.kernels" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_with_only_the_repository_on_the_path_the_folder_refuses_the_name():
  proc = _python(f"import sys; sys.path[:] = [{REPO!r}] + [p for p in sys.path if 'lib/python' "
                 f"in p and 'site-packages' not in p]; import kernels")
  assert proc.returncode != 0
  assert "import it as dypo_jax.kernels" in proc.stderr, proc.stderr


def test_the_package_name_works():
  from dypo_jax.kernels import logprob  # pylint: disable=g-import-not-at-top
  assert logprob.__name__ == "dypo_jax.kernels.logprob"
  assert os.path.realpath(logprob.__file__).startswith(os.path.realpath(REPO))
