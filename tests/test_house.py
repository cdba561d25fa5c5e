"""The package's structure: folders are layers, imports point down, no cycles, small modules,
and a non-editable install whose console scripts run."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nanogptoss_jax"
# Bottom first: a module may import from its own layer and from the layers below it.
LAYERS = [
    {"errors", "o200k", "cpu_malloc", "progress"},
    {"kernels"},
    {"model"},
    {"parallel"},
    {"data"},
    {"chat"},
    {"interop", "pretrained"},
    {"sampling"},
    {"training"},
    {"evaluation"},
    {"experiments"},
    {"serving"},
    {"cli"},
    {"commands"},
    {"export"},  # nanogptoss_jax/export.py: `python -m nanogptoss_jax.export`
]
MAX_MODULE_LINES = 300
CONSOLE_SCRIPTS = ("nanogptoss-train", "nanogptoss-generate", "nanogptoss-compare",
                   "nanogptoss-export", "nanogptoss-serve", "nanogptoss-chat",
                   "nanogptoss-eval")


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
  """Every module `path` imports (absolute names; `from a import b` counts a.b when a module)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: relative import"
      names.add(node.module)
      names |= {f"{node.module}.{alias.name}" for alias in node.names}
  return names


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {imported for imported in _imports(path) if imported in MODULES}
         for name, path in MODULES.items()}


def _layer(module: str) -> int:
  room = module.split(".")[1] if "." in module else None
  matches = [i for i, rooms in enumerate(LAYERS) if room in rooms]
  assert matches, f"{module} is in no layer; add its folder to LAYERS"
  return matches[0]


def test_every_import_points_down_or_sideways():
  upward = [f"{module} -> {imported}" for module, imports in GRAPH.items() if "." in module
            for imported in imports if "." in imported and _layer(imported) > _layer(module)]
  assert not upward, upward


def test_no_import_cycles():
  state = {}

  def visit(module, path):
    if state.get(module) == "done":
      return
    assert state.get(module) != "open", "cycle: " + " -> ".join(path + [module])
    state[module] = "open"
    for imported in GRAPH[module]:
      if imported != module:
        visit(imported, path + [module])
    state[module] = "done"

  for module in GRAPH:
    visit(module, [])


def test_kernels_import_only_jax_and_the_standard_library():
  allowed = set(sys.stdlib_module_names) | {"jax", "nanogptoss_jax"}
  for name, path in MODULES.items():
    if name.startswith("nanogptoss_jax.kernels"):
      foreign = {imported for imported in _imports(path) if imported.split(".")[0] not in allowed
                 or (imported.startswith("nanogptoss_jax.")
                     and not imported.startswith("nanogptoss_jax.kernels"))}
      assert not foreign, (name, foreign)


def test_modules_stay_small():
  big = {name: n for name, path in MODULES.items()
         if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
  assert not big, big


def test_public_names_resolve():
  import nanogptoss_jax
  for name in nanogptoss_jax.__all__:
    assert getattr(nanogptoss_jax, name) is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """`pip install .` (not editable) into a fresh prefix: what a user of a wheel gets."""
  prefix = tmp_path_factory.mktemp("install")
  # A copy of what the build reads, so it writes nothing (build/, egg-info) into the checkout.
  source = tmp_path_factory.mktemp("source")
  shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--no-build-isolation", "--prefix", str(prefix), str(source)], check=True)
  site = next(prefix.glob("lib/python*/site-packages"))
  return prefix, site, {**os.environ, "PYTHONPATH": str(site)}


def test_a_non_editable_install_holds_every_module_and_runs_its_commands(installed, tmp_path):
  prefix, site, env = installed
  expected = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")}
  assert {p.relative_to(site / PACKAGE.name) for p in (site / PACKAGE.name).rglob("*.py")} == expected
  for script in CONSOLE_SCRIPTS:
    # From an empty directory, so nothing of the checkout can be imported by accident.
    result = subprocess.run([str(prefix / "bin" / script), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (script, result.stderr)
    assert "--config" in result.stdout or "--checkpoint" in result.stdout, result.stdout
  where = subprocess.run([sys.executable, "-c", "import nanogptoss_jax.model.gptoss as m; "
                          "print(m.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
  assert where.startswith(str(site)), where
