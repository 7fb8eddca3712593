"""No import in dypo_jax/ runs back up a layer: every module's imports (module-level and
function-level, absolute and relative) are checked against the layer table in BUILD_NOTES.md.

The table is the documentation: its first column is `<number> <name>`, its second lists the
module files and package folders of that layer in backticks (paths under `dypo_jax/`; `kernels/`
is the package `dypo_jax.kernels`). A module may import its own layer and the layers below it.
"""
import ast
import dataclasses
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dypo_jax"


@dataclasses.dataclass(frozen=True)
class Layer:
  number: int
  name: str

  def __str__(self) -> str:
    return f"layer {self.number} ({self.name})"


def layer_table(notes_text: str) -> dict[str, Layer]:
  """{path under dypo_jax/ ("rl/losses.py" or "models/"): Layer} from the table whose header
  row is `| layer | where | what |`."""
  lines = notes_text.splitlines()
  start = next((i for i, line in enumerate(lines)
                if re.fullmatch(r"\s*\|\s*layer\s*\|\s*where\s*\|\s*what\s*\|\s*", line)), None)
  assert start is not None, "BUILD_NOTES.md has no `| layer | where | what |` table"
  table = {}
  for line in lines[start + 2:]:
    if not line.strip().startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    head = re.fullmatch(r"(\d+)\s+(.+)", cells[0])
    assert head, f"BUILD_NOTES.md layer row {line!r}: the first cell is not '<number> <name>'"
    layer = Layer(int(head.group(1)), head.group(2))
    for path in re.findall(r"`([^`]+)`", cells[1]):
      assert path not in table, f"BUILD_NOTES.md lists `{path}` in two layers"
      table[path] = layer
  assert table, "BUILD_NOTES.md's layer table has no rows"
  return table


def module_files(repo: str) -> dict[str, str]:
  """{dotted module name: file path} of every module of the package (kernels/ included)."""
  out = {}
  for top, dotted in ((os.path.join(repo, PACKAGE), PACKAGE),
                      (os.path.join(repo, "kernels"), f"{PACKAGE}.kernels")):
    for folder, _, files in os.walk(top):
      rel = os.path.relpath(folder, top)
      prefix = dotted if rel == "." else dotted + "." + rel.replace(os.sep, ".")
      for f in files:
        if f.endswith(".py"):
          name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
          out[name] = os.path.join(folder, f)
  return out


def _table_key(module: str, path: str) -> list[str]:
  """The table entries that may hold `module`, most specific first."""
  parts = module.split(".")[1:]
  if parts[:1] == ["kernels"]:
    return ["kernels/"]
  keys = []
  if not path.endswith("__init__.py"):
    keys.append("/".join(parts) + ".py")
  for i in range(len(parts) - (0 if path.endswith("__init__.py") else 1), 0, -1):
    keys.append("/".join(parts[:i]) + "/")
  return keys


def imports(path: str, module: str, known: set[str]) -> list[tuple[int, str]]:
  """(line, imported dypo_jax module) of every import statement in the file, wherever it is."""
  is_package = path.endswith("__init__.py")
  package = module if is_package else module.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      for a in node.names:  # `from pkg import mod` imports the module pkg.mod.
        out.append((node.lineno, f"{source}.{a.name}" if f"{source}.{a.name}" in known
                    else source))
  return [(line, name) for line, name in out
          if name == PACKAGE or name.startswith(PACKAGE + ".")]


def violations(repo: str, notes_text: str) -> list[str]:
  """One sentence per import that runs up a layer, per module the table does not place, and
  per table entry that names no module."""
  table = layer_table(notes_text)
  files = module_files(repo)
  problems, layer_of, used = [], {}, set()
  for module, path in files.items():
    key = next((k for k in _table_key(module, path) if k in table), None)
    if key is not None:
      layer_of[module] = table[key]
      used.add(key)
    elif not path.endswith("__init__.py"):
      problems.append(f"{os.path.relpath(path, repo)} is in no layer of BUILD_NOTES.md's table")
  problems += [f"BUILD_NOTES.md's layer table lists `{k}`, which is no module or package of "
               f"{PACKAGE}/" for k in sorted(set(table) - used)]
  for module, path in sorted(files.items()):
    rel = os.path.relpath(path, repo)
    found = imports(path, module, set(files))
    if module not in layer_of:
      # A package whose modules sit in several layers (dypo_jax/, rl/): importing any of its
      # modules runs its __init__, so it may import nothing of dypo_jax.
      problems += [f"{rel}:{line} imports {name}: the __init__ of a package spread over "
                   "layers must import nothing of dypo_jax" for line, name in found]
      continue
    for line, name in found:
      target = name
      while target not in files and "." in target:
        target = target.rpartition(".")[0]
      if target not in layer_of:
        continue  # The __init__ of a package spread over layers (checked empty above).
      if layer_of[target].number > layer_of[module].number:
        problems.append(f"{rel}:{line} ({module}, {layer_of[module]}) imports {name} "
                        f"({layer_of[target]}): a lower layer imports a higher one")
  return problems


def _notes() -> str:
  with open(os.path.join(REPO, "BUILD_NOTES.md"), encoding="utf-8") as f:
    return f.read()


def test_no_import_runs_back_up_a_layer():
  problems = violations(REPO, _notes())
  assert not problems, "\n".join(problems)


def _tree(tmp_path, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(tmp_path)


_NOTES = """
| layer | where | what |
|---|---|---|
| 0 low | `errors.py`, `io/`, `kernels/` | x |
| 1 mid | `rl/losses.py`, `models/` | y |
| 2 high | `config.py`, `rl/trainer.py` | z |
"""

_TREE = {
    "dypo_jax/__init__.py": "", "dypo_jax/errors.py": "", "dypo_jax/config.py": "",
    "dypo_jax/io/__init__.py": "",
    "dypo_jax/io/paths.py": "def f():\n  from dypo_jax import config\n",
    "dypo_jax/models/__init__.py": "from dypo_jax.models.hf import load\n",
    "dypo_jax/models/hf.py": "from dypo_jax.io import paths\nfrom .. import errors\n",
    "dypo_jax/rl/__init__.py": "", "dypo_jax/rl/losses.py": "from . import trainer\n",
    "dypo_jax/rl/trainer.py": "from dypo_jax import config, errors\nimport dypo_jax.models\n",
    "kernels/__init__.py": ""}


def test_an_import_up_a_layer_is_named_with_both_layers(tmp_path):
  problems = violations(_tree(tmp_path, _TREE), _NOTES)
  assert problems == [
      "dypo_jax/io/paths.py:2 (dypo_jax.io.paths, layer 0 (low)) imports dypo_jax.config "
      "(layer 2 (high)): a lower layer imports a higher one",
      "dypo_jax/rl/losses.py:1 (dypo_jax.rl.losses, layer 1 (mid)) imports dypo_jax.rl.trainer "
      "(layer 2 (high)): a lower layer imports a higher one"]


def test_an_unplaced_module_a_stale_entry_and_a_busy_spread_init_are_named(tmp_path):
  tree = dict(_TREE, **{"dypo_jax/rl/queues.py": "",
                        "dypo_jax/rl/__init__.py": "import dypo_jax.rl.losses\n"})
  del tree["dypo_jax/config.py"]  # paths.py's import of it then names the package: no layer.
  assert sorted(violations(_tree(tmp_path, tree), _NOTES)) == sorted([
      "dypo_jax/rl/queues.py is in no layer of BUILD_NOTES.md's table",
      "BUILD_NOTES.md's layer table lists `config.py`, which is no module or package of dypo_jax/",
      "dypo_jax/rl/__init__.py:1 imports dypo_jax.rl.losses: the __init__ of a package spread "
      "over layers must import nothing of dypo_jax",
      "dypo_jax/rl/losses.py:1 (dypo_jax.rl.losses, layer 1 (mid)) imports dypo_jax.rl.trainer "
      "(layer 2 (high)): a lower layer imports a higher one"])
