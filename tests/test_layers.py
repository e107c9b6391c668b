"""The layers (issue "Renovate into layers"): every project import points down or sideways, never up or in a circle.

Every .py under harness/, models/ and baselines/ is parsed with ``ast``, never imported, so this file is fast and
sees every import statement, function-local ones included. Project imports (``harness.*``, ``models.*``,
``baselines.*`` and relative imports) are resolved to the module they load; third-party and standard-library
imports are ignored. Dynamic loading (the registry's ``importlib`` plugin discovery, ``harness.cli`` loading
``harness.commands.<name>``) is by design not a static import and is not seen here.

The checks are plain functions over a scanned tree, so the self-tests at the bottom run each of them on a small
synthetic tree and show that it fails where it should.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "models", "baselines")

# Bottom to top. A module may import modules of its own layer or of a lower one, never of a higher one.
# A key "a.b" is that module only; "a.b.*" is the module or package a.b and everything under it.
# An exact key wins over a "*" key; of two "*" keys, the longer one wins. A module in no layer fails
# test_every_module_has_a_layer: place new modules here on purpose.
LAYERS: dict[str, float] = {
    # 0: the core (registry, compute ledger, configs, errors, IO). It imports nothing of the project; the
    #    registry finds the models/baselines plugins at run time by package name, like entry points.
    "harness": 0,  # the package's __init__: a docstring, nothing else
    "harness.core.*": 0,
    # 1: model building blocks and PonderLM-2/3
    "models.*": 1,
    # 2: baselines, each on its own (test_no_baseline_imports_another_baseline)
    "baselines.*": 2,
    # 3: data and checkpoints
    "harness.data.*": 3,
    "harness.checkpoint": 3,
    # 3.5: Hugging Face Llama checkpoints in and out (reads the registry; a job's make_model uses it)
    "harness.hf": 3.5,
    # 4: a job: config, model, corpus and checkpoint together
    "harness.job": 4,
    # 5: evaluation; inside lmeval, tasks < model < runner
    "harness.evaluate": 5,
    "harness.lmeval": 5,  # the package's __init__: a docstring, nothing else
    "harness.lmeval.tasks": 5.1,
    "harness.lmeval.model": 5.2,
    "harness.lmeval.runner": 5.3,
    # 5.5: training logs for a tracking tool (TensorBoard, W&B offline), called by the trainer only
    "harness.tracking": 5.5,
    # 6: training
    "harness.train": 6,
    # 6.5: one job on several devices (Ray Train, DDP/FSDP): the step loop of train.py on every rank
    "harness.distributed": 6.5,
    # 7: planning (and studies), the results store, analysis
    "harness.plan.*": 7,
    "harness.results": 7,
    "harness.analyze": 7,
    "harness.stats": 7,  # paired statistics (numpy, scipy): under claims and the report, written once
    "harness.check": 7,  # the plugin contract's checks (python -m harness check), shipped for plugin authors
    # 8: reports, the benchmark, claims (studies are plans: harness.plan.study)
    "harness.report.*": 8,  # the package harness/report/ (runs, tables, plots, html, style)
    "harness.bench.*": 8,  # the package harness/bench/
    "harness.claims": 8,
    # 9: the sweep driver
    "harness.sweep": 9,
    # 10: one module per command
    "harness.commands.*": 10,
    # 11: the entry points
    "harness.cli": 11,
    "harness.__main__": 11,
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: str  # file, relative to the scanned root
    line: int
    target: str  # dotted name of the project module it loads
    local: bool  # inside a function body

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Tree:
    modules: dict[str, str]  # dotted name -> file, relative to the scanned root
    imports: list[Import]


# ---------------------------------------------------------------------------------------------- scanning


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_project(name: str, packages: Iterable[str] = PACKAGES) -> bool:
    return name.split(".")[0] in packages


def resolve(name: str, modules: Mapping[str, object]) -> str:
    """The longest known module that ``name`` starts with (``a.b.C`` -> ``a.b``); ``name`` if none is known."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return name


def _from_base(node: ast.ImportFrom, module: str, path: Path) -> str | None:
    """The absolute module that ``from <base> import ...`` names; None if a relative import climbs too far."""
    if not node.level:
        return node.module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts) - 1:
        return None
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, rel: str, modules: Mapping[str, object], packages: Iterable[str]):
        self.module, self.path, self.rel, self.modules = module, path, rel, modules
        self.packages = tuple(packages)
        self.depth = 0  # how many function bodies deep
        self.found: list[Import] = []

    def _add(self, node: ast.stmt, name: str) -> None:
        if is_project(name, self.packages):
            imp = Import(self.module, self.rel, node.lineno, resolve(name, self.modules), self.depth > 0)
            if imp not in self.found:  # `from a import x, y` is one import of a
                self.found.append(imp)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _from_base(node, self.module, self.path)
        if base is None:
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            # `from harness import checkpoint` loads the module harness.checkpoint; `from a.b import f` loads a.b
            self._add(node, submodule if submodule in self.modules else base)


def scan(root: Path, packages: Iterable[str] = PACKAGES) -> Tree:
    packages = tuple(packages)
    modules = {
        module_name(path, root): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }
    imports: list[Import] = []
    for module, path in modules.items():
        collector = _ImportCollector(module, path, path.relative_to(root).as_posix(), modules, packages)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports.extend(collector.found)
    return Tree({module: path.relative_to(root).as_posix() for module, path in modules.items()}, imports)


# ---------------------------------------------------------------------------------------------- layers


def layer_of(module: str, layers: Mapping[str, float]) -> float | None:
    if module in layers:
        return layers[module]
    packages = [key.removesuffix(".*") for key in layers if key.endswith(".*")]
    enclosing = [prefix for prefix in packages if module == prefix or module.startswith(prefix + ".")]
    return layers[max(enclosing, key=len) + ".*"] if enclosing else None


def _fmt(layer: float | None) -> str:
    return "no layer" if layer is None else f"layer {layer:g}"


# ---------------------------------------------------------------------------------------------- the checks
# Each returns one readable line per problem; an empty list means the check passes.


def unplaced_modules(tree: Tree, layers: Mapping[str, float]) -> list[str]:
    return [
        f"{path}: {module} is in no layer: add it to LAYERS in tests/test_layers.py"
        for module, path in tree.modules.items()
        if layer_of(module, layers) is None
    ]


def upward_imports(tree: Tree, layers: Mapping[str, float]) -> list[str]:
    problems = []
    for imp in tree.imports:
        own, other = layer_of(imp.importer, layers), layer_of(imp.target, layers)
        if own is not None and other is not None and other > own:
            problems.append(
                f"{imp.where()}: {imp.importer} ({_fmt(own)}) imports {imp.target} ({_fmt(other)}), a higher layer"
            )
    return problems


def local_project_imports(tree: Tree) -> list[str]:
    return [
        f"{imp.where()}: {imp.importer} imports the project module {imp.target} inside a function; "
        "import it at the top of the module (lazy imports are for heavy third-party packages only)"
        for imp in tree.imports
        if imp.local
    ]


def baseline_peer_imports(tree: Tree, layers: Mapping[str, float] = LAYERS) -> list[str]:
    return [
        f"{imp.where()}: the baseline {imp.importer} ({_fmt(layer_of(imp.importer, layers))}) imports the baseline "
        f"{imp.target} ({_fmt(layer_of(imp.target, layers))}); shared pieces belong in models/"
        for imp in tree.imports
        if imp.importer.startswith("baselines.") and (imp.target == "baselines" or imp.target.startswith("baselines."))
    ]


def core_project_imports(tree: Tree, layers: Mapping[str, float] = LAYERS) -> list[str]:
    def in_core(name: str) -> bool:
        return name == "harness.core" or name.startswith("harness.core.")

    return [
        f"{imp.where()}: {imp.importer} ({_fmt(layer_of(imp.importer, layers))}) is in harness.core and imports "
        f"{imp.target} ({_fmt(layer_of(imp.target, layers))}); the core imports nothing of the project"
        for imp in tree.imports
        if in_core(imp.importer) and not in_core(imp.target)
    ]


def _strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _cycle_through(start: str, edges: Mapping[tuple[str, str], Import], members: set[str]) -> list[Import]:
    """A shortest cycle from ``start`` back to itself inside one strongly connected component."""
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for (a, b), imp in edges.items():
                if a != node or b not in members:
                    continue
                if b == start:
                    path = [imp]
                    while path[0].importer != start:
                        path.insert(0, came_from[path[0].importer])
                    return path
                if b not in came_from:
                    came_from[b] = imp
                    following.append(b)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def import_cycles(tree: Tree) -> list[str]:
    edges: dict[tuple[str, str], Import] = {}
    for imp in tree.imports:
        edges.setdefault((imp.importer, imp.target), imp)
    graph: dict[str, list[str]] = {module: [] for module in tree.modules}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    problems = []
    for component in _strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and (component[0], component[0]) not in edges:
            continue
        cycle = _cycle_through(min(component), edges, members)
        chain = " -> ".join([cycle[0].importer] + [imp.target for imp in cycle])
        lines = "; ".join(f"{imp.where()} imports {imp.target}" for imp in cycle)
        problems.append(f"import cycle {chain} ({lines})")
    return problems


# ---------------------------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def project() -> Tree:
    return scan(ROOT)


def _report(problems: list[str]) -> str:
    return "\n" + "\n".join(problems)


def test_the_scan_sees_the_project(project):
    # A guard against a vacuous pass (a wrong root, a parser that sees nothing).
    assert {"harness.core.registry", "models.base", "baselines.vanilla", "harness.cli"} <= set(project.modules)
    edges = {(imp.importer, imp.target) for imp in project.imports}
    assert ("harness.train", "harness.job") in edges
    assert ("harness.job", "harness.checkpoint") in edges  # `from harness import checkpoint`: the module
    assert ("models.ponderlm3", "models.ponderlm2") in edges


def test_every_module_has_a_layer(project):
    problems = unplaced_modules(project, LAYERS)
    assert not problems, _report(problems)


def test_imports_point_down(project):
    problems = upward_imports(project, LAYERS)
    assert not problems, _report(problems)


def test_no_import_cycles(project):
    problems = import_cycles(project)
    assert not problems, _report(problems)


def test_project_imports_are_at_module_top_level(project):
    problems = local_project_imports(project)
    assert not problems, _report(problems)


def test_no_baseline_imports_another_baseline(project):
    problems = baseline_peer_imports(project)
    assert not problems, _report(problems)


def test_core_imports_nothing_of_the_project(project):
    problems = core_project_imports(project)
    assert not problems, _report(problems)


# ---------------------------------------------------------------------------------------------- self-tests

FAKE_LAYERS = {
    "harness": 0,
    "harness.core.*": 0,
    "models.*": 1,
    "baselines.*": 2,
    "harness.job": 4,
    "harness.sub.*": 5,
    "harness.sub.top": 5.5,
    "harness.cli": 11,
}

# A small tree that passes every check; each case below adds or replaces files to break one check.
CLEAN = {
    "harness/__init__.py": '"""docstring only"""\n',
    "harness/core/__init__.py": "",
    "harness/core/errors.py": "class Error(Exception):\n    pass\n",
    "harness/core/config.py": "from harness.core.errors import Error\nfrom . import errors\n",
    "models/__init__.py": "",
    "models/base.py": "import torch\nfrom harness.core import config\n",
    "baselines/__init__.py": "",
    "baselines/a.py": "from models.base import torch\n",
    "baselines/b.py": "from harness.core.errors import Error\n",
    "harness/job.py": "from harness.core import config\nfrom models import base\n\n\ndef f():\n    import scipy\n",
    "harness/sub/__init__.py": "from .low import x\n",
    "harness/sub/low.py": "from harness import job\nx = 1\n",
    "harness/sub/top.py": "from harness.sub.low import x\nfrom .. import job\n",
    "harness/cli.py": "from harness.sub import top\n",
}

CHECKS = {
    "unplaced": lambda tree: unplaced_modules(tree, FAKE_LAYERS),
    "upward": lambda tree: upward_imports(tree, FAKE_LAYERS),
    "cycle": import_cycles,
    "local": local_project_imports,
    "baseline peers": lambda tree: baseline_peer_imports(tree, FAKE_LAYERS),
    "core": lambda tree: core_project_imports(tree, FAKE_LAYERS),
}

BROKEN = {
    # case: (the check that must fail, files added to or replaced in CLEAN, words its problems must hold;
    #        the first names the statement at fault, and any other check may flag only that statement)
    "upward, absolute": ("upward", {"harness/core/bad.py": '"""x"""\nfrom harness.job import f\n'},
                         ["harness/core/bad.py:2", "harness.core.bad (layer 0)", "harness.job (layer 4)"]),
    "upward, relative from a package": ("upward", {"harness/sub/low.py": "from .. import cli\n"},
                                        ["harness/sub/low.py:1", "(layer 5)", "harness.cli (layer 11)"]),
    "upward, within a package": ("upward", {"harness/sub/low.py": "from .top import x\n"},
                                 ["harness/sub/low.py:1", "(layer 5)", "harness.sub.top (layer 5.5)"]),
    "upward, function-local": ("upward", {"models/base.py": "def f():\n    import harness.job\n"},
                               ["models/base.py:2", "models.base (layer 1)", "harness.job (layer 4)"]),
    "unplaced": ("unplaced", {"harness/newthing.py": ""}, ["harness/newthing.py", "harness.newthing", "LAYERS"]),
    "cycle of two": ("cycle", {"harness/sub/low.py": "from harness.sub import top\n"},
                     ["harness/sub/low.py:1", "harness.sub.low -> harness.sub.top -> harness.sub.low",
                      "harness/sub/top.py:1"]),
    "cycle of three": ("cycle", {"harness/sub/a.py": "from . import b\n", "harness/sub/b.py": "import harness.sub.c\n",
                                 "harness/sub/c.py": "\n\nfrom harness.sub.a import x\n"},
                       ["harness.sub.a -> harness.sub.b -> harness.sub.c -> harness.sub.a", "harness/sub/c.py:3"]),
    "cycle of one": ("cycle", {"harness/sub/low.py": "from harness.sub import low\n"},
                     ["harness.sub.low -> harness.sub.low"]),
    "local project import": ("local", {"harness/sub/low.py": "import os\n\n\ndef f():\n    from harness import job\n"},
                             ["harness/sub/low.py:5", "harness.job"]),
    "local import in a method": ("local", {"harness/sub/low.py": "class A:\n    async def f(self):\n"
                                                                 "        from ..core import errors\n"},
                                 ["harness/sub/low.py:3", "harness.core.errors"]),
    "baseline imports a baseline": ("baseline peers", {"baselines/b.py": "from baselines.a import torch\n"},
                                    ["baselines/b.py:1", "baselines.b (layer 2)", "baselines.a (layer 2)"]),
    "baseline imports a baseline, relative": ("baseline peers", {"baselines/b.py": "from . import a\n"},
                                              ["baselines/b.py:1", "baselines.a"]),
    "core imports the project package": ("core", {"harness/core/config.py": "import harness\n"},
                                         ["harness/core/config.py:1", "harness.core.config (layer 0)",
                                          "imports harness (layer 0)"]),
    "core imports a model": ("core", {"harness/core/config.py": "from models.base import torch\n"},
                             ["harness/core/config.py:1", "models.base (layer 1)"]),
}


def _write(root: Path, files: Mapping[str, str]) -> Tree:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return scan(root)


def test_clean_synthetic_tree_passes_every_check(tmp_path):
    tree = _write(tmp_path, CLEAN)
    assert len(tree.imports) >= 10
    for name, check in CHECKS.items():
        assert check(tree) == [], name


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_check_catches_its_violation(tmp_path, case):
    check, files, words = BROKEN[case]
    tree = _write(tmp_path, {**CLEAN, **files})
    problems = CHECKS[check](tree)
    assert problems, f"{check} missed: {case}"
    for word in words:
        assert any(word in problem for problem in problems), (word, problems)
    # The case breaks nothing else: every other check passes, or flags the same statement.
    others = [p for name, c in CHECKS.items() if name != check for p in c(tree)]
    assert all(words[0] in p for p in others), others


def test_layer_lookup_prefers_exact_then_longest_package():
    layers = {"a": 0, "a.b.*": 3, "a.b.c": 1, "a.b.c.d.*": 7}
    assert layer_of("a", layers) == 0
    assert layer_of("a.x", layers) is None  # "a" is the package's __init__ only
    assert layer_of("a.b", layers) == 3
    assert layer_of("a.b.z", layers) == 3
    assert layer_of("a.b.c", layers) == 1
    assert layer_of("a.b.c.d.e", layers) == 7
    assert layer_of("a.bc", layers) is None
