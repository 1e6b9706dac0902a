"""The package's shape holds: no import cycle anywhere in qeval/ (function-local imports count),
every module imports on its own in a fresh interpreter, and the pipeline around the methods (the
run, the tasks, the report) never names a method: it asks the method object."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from qeval.methods import METHODS

ROOT = Path(__file__).resolve().parents[1] / "qeval"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """qeval modules ``name`` imports anywhere in its source (module level or inside functions),
    each resolved to the longest known module name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in names:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a package's own __init__ importing its submodules is not a cycle with them
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}          # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_qeval():
    mods = modules()
    graph = {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}
    assert graph["qeval.run"], "the graph must see the run's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Imports every third-party module qeval uses (except triton, whose import reads the interpreter
# switch qeval sets), then forks once per qeval module: each child starts with no qeval module
# loaded and imports exactly one, as a fresh interpreter would, without paying torch's start-up
# cost forty times over.
ISOLATED_IMPORTS = """
import importlib, os, sys
third_party, names = sys.argv[1].split(","), sys.argv[2].split(",")
for mod in third_party:
    try:
        importlib.import_module(mod)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "qeval" or m.startswith("qeval.")]
failed = 0
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def third_party_imports() -> set[str]:
    out = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module)
    return {m for m in out if m.split(".")[0] not in ("qeval", "triton", "__future__")}


def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = [n for n in modules() if not n.endswith("__main__")]
    out = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, ",".join(sorted(third_party_imports())),
                          ",".join(names)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_at_most_eight_modules_at_the_top_and_none_over_400_lines():
    top = [p for p in ROOT.glob("*.py")]
    assert len(top) <= 8, sorted(p.name for p in top)
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


# The pipeline around the methods: it asks the method object and never names one.
METHOD_AGNOSTIC = [ROOT / "run.py", *sorted((ROOT / "report").rglob("*.py")), *sorted((ROOT / "tasks").rglob("*.py"))]
# "group" is also lm-eval's word for a group of tasks
OTHER_MEANINGS = {("tasks/lm_eval/tasks.py", "group")}


@pytest.mark.parametrize("path", METHOD_AGNOSTIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_never_names_a_method(path):
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            named |= {m for m in METHODS if node.value == m and (rel, m) not in OTHER_MEANINGS}
        if isinstance(node, ast.ImportFrom) and (node.module or "").rpartition(".")[2] in METHODS:
            named.add(node.module)   # a method's own module (the shared bases are fine)
    assert not named, f"{rel} names {sorted(named)}"
