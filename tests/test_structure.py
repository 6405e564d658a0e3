"""The package's shape (issue 11): every module imports, fluxkit's modules import each other
without cycles, no test-only fault hooks live in the package, and train.py reads in short steps."""

import ast
import importlib
import os
import pkgutil

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "fluxkit")
MODULES = sorted(m.name for m in pkgutil.iter_modules([PACKAGE]))

def _source(name):
    with open(os.path.join(PACKAGE, f"{name}.py"), encoding="utf-8") as f:
        return f.read()


def _imported_fluxkit_modules(node):
    """The fluxkit modules one import statement names (relative or absolute)."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or node.module == "fluxkit" or (node.module or "").startswith("fluxkit."):
            module = node.module or ""
            module = module[len("fluxkit."):] if module.startswith("fluxkit.") else ("" if module == "fluxkit" else module)
            if module:
                return {module.split(".")[0]}
            return {a.name for a in node.names if a.name in MODULES}  # from . import x
        return set()
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("fluxkit.")}
    return set()


def import_graph(module_level_only):
    """module -> the fluxkit modules it imports (at module level, or anywhere in it)."""
    graph = {}
    for name in MODULES:
        tree = ast.parse(_source(name))
        if module_level_only:  # statements run on import: not those inside functions or classes
            nodes = [n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     for n in ast.walk(stmt)]
        else:
            nodes = list(ast.walk(tree))
        graph[name] = set().union(*(_imported_fluxkit_modules(n) for n in nodes)) - {name}
    return graph


def cycles(graph):
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(frozenset(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return set(found)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    importlib.import_module(f"fluxkit.{name}")


def test_the_graph_sees_the_imports():
    graph = import_graph(module_level_only=True)
    assert len(MODULES) >= 20 and {"checkpoints", "models", "loss", "cache", "outputs", "runcontrol"} <= set(MODULES)
    assert {"models", "outputs", "checkpoints", "runcontrol", "loss", "cache"} <= graph["train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycle_at_module_level():
    assert cycles(import_graph(module_level_only=True)) == set()


def test_no_cycle_through_deferred_imports():
    # an import inside a function still ties two modules together, so it may not close a cycle either
    found = cycles(import_graph(module_level_only=False))
    assert not found, sorted(sorted(c) for c in found)


def test_no_fault_injection_hook_in_the_package():
    """Crash tests kill the trainer from tests/faults; the package never kills itself for a test."""
    offenders = []
    for name in MODULES:
        text = _source(name)
        offenders += [f"{name}.py: {word}" for word in ("FLUXKIT_TEST_", "SIGKILL") if word in text]
        for node in ast.walk(ast.parse(text)):
            # os.kill is fine for passing a signal on to a child; aimed at our own pid it is a fault hook
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "os.kill" and "getpid" in ast.unparse(node.args[0]):
                offenders.append(f"{name}.py:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_train_py_functions_are_short():
    tree = ast.parse(_source("train"))
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {"train", "setup", "resume", "loop", "finish"} <= set(lengths)
    too_long = {name: n for name, n in lengths.items() if n >= 80}
    assert not too_long, too_long
