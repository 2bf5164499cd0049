"""The house: pipetrain's packages are layers, imports only go down, and nothing goes round.

Reads the source with ``ast`` (no import side effects), so the test also covers modules that
only a subprocess loads. An import inside ``if TYPE_CHECKING:`` is for annotations and does not
count.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

SYSTEM = REPO / "system"
HARNESS = REPO / "harness"
# Bottom to top; a module may import its own layer and the layers below.
LAYERS = [
    {"pipetrain", "pipetrain.hooks", "pipetrain.status", "pipetrain.threads", "pipetrain.tracing"},
    {"pipetrain.nn"}, {"pipetrain.data"}, {"pipetrain.wire"}, {"pipetrain.pipeline"},
    {"pipetrain.run"}, {"pipetrain.config"}, {"pipetrain.runtime"}, {"pipetrain.training"},
    {"pipetrain.cli"}, {"pipetrain.__main__"},
]
MAX_MODULE_LINES = 400
# The environment variables the system reads: BLAS threads for a worker, MPI polling knobs.
ALLOWED_ENV = {"PIPETRAIN_BLAS_THREADS", "PIPETRAIN_MPI_POLL"}


def modules(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


# The package's PEP 562 facade (``pipetrain.train(...)``, ``pipetrain.reference``): imports in a
# module-level ``__getattr__`` run at attribute access, never at import, and only these may.
FACADE = {"pipetrain": {"pipetrain.training", "pipetrain.training.api", "pipetrain.config",
                        "pipetrain.status"}}


def _lazy_nodes(tree: ast.Module) -> set[int]:
    return {id(n) for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            for n in ast.walk(node)}


def imports(path: Path, known: set[str], *, lazy: bool = False) -> set[str]:
    """The modules of ``known`` that ``path`` imports, outside TYPE_CHECKING blocks (and, unless
    ``lazy``, outside a module-level ``__getattr__``; with ``lazy``, only those inside it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    facade = _lazy_nodes(tree)
    if lazy:
        typing_only |= {id(n) for n in ast.walk(tree) if id(n) not in facade}
    else:
        typing_only |= facade
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in layer
               if name != "pipetrain") or module in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


SYSTEM_MODULES = modules(SYSTEM, "pipetrain")
GRAPH = {name: imports(path, set(SYSTEM_MODULES)) - {name}
         for name, path in SYSTEM_MODULES.items()}


def test_every_import_goes_down_or_stays_in_its_layer():
    upward = [f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
              if layer_of(target) > layer_of(name)]
    assert upward == []


def test_only_the_package_facade_imports_lazily_and_only_the_api():
    lazy = {name: imports(path, set(SYSTEM_MODULES), lazy=True) - {name}
            for name, path in SYSTEM_MODULES.items()}
    assert {name: targets for name, targets in lazy.items() if targets} == FACADE


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("root", [SYSTEM, HARNESS], ids=["system", "harness"])
def test_no_module_is_longer_than_one_sitting(root):
    long = {str(path.relative_to(REPO)): n for path in root.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_the_system_never_imports_the_harness_or_reads_a_test_switch():
    offenders = []
    for name, path in SYSTEM_MODULES.items():
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from|import) pipetrain_harness", text, re.MULTILINE):
            offenders.append(f"{name} imports the harness")
        if "PIPETRAIN_TEST" in text or re.search(r"\bplanted\b", text):
            offenders.append(f"{name} mentions a test switch or a planted bug")
        for variable in re.findall(r"\bPIPETRAIN_[A-Z_]+", text):
            if variable not in ALLOWED_ENV:
                offenders.append(f"{name} names {variable}")
    assert offenders == []


def test_the_package_list_is_every_package_on_disk():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    on_disk = {name for name, path in {**SYSTEM_MODULES, **modules(HARNESS, "pipetrain_harness")}
               .items() if path.name == "__init__.py"}
    # Shipped inside the harness from top-level folders: the scenario files (data only) and
    # the benchmark suite.
    data = {"pipetrain_harness.scenarios": "scenarios", "pipetrain_harness.bench": "bench"}
    assert listed == on_disk | set(data)
    assert project["package-dir"] == {"pipetrain": "system", "pipetrain_harness": "harness",
                                      **data}
    assert project["package-data"]["pipetrain_harness.scenarios"] == ["*.toml"]
