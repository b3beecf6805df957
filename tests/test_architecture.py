"""The house rules, checked on every module's imports (lazy ones inside functions included).

Floors, lowest first; each may import only the floors listed for it:

    core         torch-free shared code: config, processing, sampling, bundle, recipes, files
    trt          TensorRT: parser support, plan, engines, backend, torch-free  -> core
    nanovlm      the PyTorch reference                      -> core
    runtime      torch-free generation from a bundle        -> core, trt
    calibration  quantization, torch-free                   -> core, runtime
    export       checkpoint -> bundle                       -> core, nanovlm, runtime, trt
    evaluation   parity and speed against PyTorch           -> core, nanovlm, runtime, calibration
    transformers_js  the layout transformers.js loads + q4/q8 -> core, nanovlm, calibration, export
    serve        the OpenAI server, torch-free              -> core, runtime
    cli          the command line and the demo              -> everything above

core, runtime and calibration (and every project module they reach) import neither torch nor
transformers, and no two top-level packages import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "trt": {"core"},
    "nanovlm": {"core"},
    "runtime": {"core", "trt"},
    "calibration": {"core", "runtime"},
    "export": {"core", "nanovlm", "runtime", "trt"},
    "evaluation": {"core", "nanovlm", "runtime", "calibration"},
    "transformers_js": {"core", "nanovlm", "calibration", "export"},
    "serve": {"core", "runtime"},
    "cli": {
        "core",
        "trt",
        "nanovlm",
        "runtime",
        "calibration",
        "export",
        "evaluation",
        "transformers_js",
        "serve",
    },
}
TORCH_FREE = ("core", "trt", "runtime", "calibration", "serve")
FORBIDDEN_THERE = ("torch", "transformers", "torchvision")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, relative imports resolved to absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out: set[str] = set()
    typing_only = {  # `if TYPE_CHECKING:` blocks run for type checkers, never at run time
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def module_graph(root: Path) -> dict[str, set[str]]:
    """{project module: project modules and third-party top-level names it imports}."""
    files = {module_name(root, p): p for pkg in ALLOWED for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for imp in imports_of(root, path):
            if imp.split(".")[0] in ALLOWED:
                while imp and imp not in files:  # `from pkg.mod import func` -> pkg.mod
                    imp = imp.rpartition(".")[0]
                if imp and imp != name:
                    deps.add(imp)
            else:
                deps.add(imp.split(".")[0])
        graph[name] = deps
    return graph


def violations(root: Path) -> list[str]:
    """Every broken rule, one readable line each (empty: the house is in order)."""
    graph = module_graph(root)
    out = []
    # 1. floors import only the floors below them
    for mod, deps in graph.items():
        floor = mod.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if dep in graph and other != floor and other not in ALLOWED[floor]:
                out.append(
                    f"{mod} imports {dep}: {floor}/ may import only {sorted(ALLOWED[floor]) or 'nothing'}"
                )
    # 2. torch-free floors reach no torch, directly or through project modules
    for mod in graph:
        if mod.split(".")[0] not in TORCH_FREE:
            continue
        seen, stack = {mod}, [mod]
        while stack:
            cur = stack.pop()
            for dep in graph.get(cur, ()):
                if dep in FORBIDDEN_THERE:
                    via = "" if cur == mod else f" (via {cur})"
                    out.append(f"{mod} imports {dep}{via}: {mod.split('.')[0]}/ must stay torch-free")
                elif dep in graph and dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
    # 3. no cycle between top-level packages
    edges = {(m.split(".")[0], d.split(".")[0]) for m, ds in graph.items() for d in ds if d in graph}
    edges = {(a, b) for a, b in edges if a != b}
    for a, b in edges:
        if (b, a) in edges and a < b:
            out.append(f"import cycle between {a}/ and {b}/")
    # 4. no import circle between modules either, lazy imports included
    for circle in circles({m: {d for d in ds if d in graph} for m, ds in graph.items()}):
        out.append(f"import circle: {' -> '.join(circle)}")
    return sorted(set(out))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path through each circle of the graph (its strongly connected parts of 2 or more)."""
    found, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        # modules reachable from start that reach start back form its circle
        reach, stack = {start}, [start]
        while stack:
            for d in graph[stack.pop()]:
                if d not in reach:
                    reach.add(d)
                    stack.append(d)
        back = {m for m in reach if m != start and _reaches(graph, m, start)}
        if back:
            found.append(sorted({start, *back}))
            done |= back
        done.add(start)
    return found


def _reaches(graph: dict[str, set[str]], a: str, b: str) -> bool:
    seen, stack = {a}, [a]
    while stack:
        for d in graph[stack.pop()]:
            if d == b:
                return True
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return False


def test_the_repository_keeps_the_rules():
    assert violations(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in ALLOWED:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {
                "nanovlm/m.py": "def f():\n    from runtime.pipeline import VLMPipeline\n",
                "runtime/pipeline.py": "",
            },
            "nanovlm.m imports runtime.pipeline: nanovlm/ may import only ['core']",
        ),
        ({"runtime/r.py": "import torch\n"}, "runtime.r imports torch: runtime/ must stay torch-free"),
        (
            {
                "runtime/r.py": "from core import helper\n",
                "core/helper.py": "from transformers import AutoModel\n",
            },
            "runtime.r imports transformers (via core.helper)",
        ),
        (
            {
                "calibration/q.py": "from export.graphs import x\n",
                "export/graphs.py": "from calibration import q\n",
            },
            "import cycle between calibration/ and export/",
        ),
        (
            {"core/c.py": "from ..runtime import pipeline\n", "runtime/pipeline.py": ""},
            "core.c imports runtime.pipeline",
        ),
    ],
)
def test_a_breach_is_reported(tmp_path, files, expected):
    """Each rule fails on a deliberate breach, lazy and relative imports included."""
    found = violations(_tree(tmp_path, files))
    assert any(line.startswith(expected) for line in found), found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
