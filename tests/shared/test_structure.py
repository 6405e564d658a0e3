"""The package's shape (issues 11, 19): every module imports, fluxkit's modules import each other
without cycles, each folder imports only the folders below it, no test-only fault hooks live in the
package, and train.py reads in short steps."""

import ast
import importlib
import importlib.util
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "fluxkit")


def _find_modules():
    """Every module of the package by its dotted name under fluxkit ("training.train", "cache", "cache.store", ...)."""
    found = []
    for folder, subfolders, files in os.walk(PACKAGE):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), PACKAGE)[:-3].split(os.sep)
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                if parts:
                    found.append(".".join(parts))
    return sorted(found)


MODULES = _find_modules()


def _path(name):
    base = os.path.join(PACKAGE, *name.split("."))
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def _source(name):
    with open(_path(name), encoding="utf-8") as f:
        return f.read()


def _known(dotted):
    """The module a dotted name under fluxkit lands in (a name imported from a module is that module)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _imported_fluxkit_modules(node, importer):
    """The fluxkit modules one import statement in module `importer` names (relative or absolute)."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = importer.split(".") if _path(importer).endswith("__init__.py") else importer.split(".")[:-1]
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            module = ".".join(base + ([node.module] if node.module else []))
        elif node.module == "fluxkit" or (node.module or "").startswith("fluxkit."):
            module = node.module[len("fluxkit."):] if node.module != "fluxkit" else ""
        else:
            return set()
        found = {_known(f"{module}.{a.name}" if module else a.name) for a in node.names}  # from . import x
        return {m for m in found if m} or ({_known(module)} - {""})
    if isinstance(node, ast.Import):
        return {_known(a.name[len("fluxkit."):]) for a in node.names if a.name.startswith("fluxkit.")} - {""}
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
        graph[name] = set().union(*(_imported_fluxkit_modules(n, name) for n in nodes)) - {name}
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


@pytest.mark.parametrize("name", [m for m in MODULES if not m.endswith("__main__")])  # __main__ runs its command
def test_every_module_imports(name):
    importlib.import_module(f"fluxkit.{name}")


def _unresolved_imports(sources):
    """`file:line: what` for each fluxkit import (relative or absolute, deferred ones too) whose module
    or name does not exist. sources: (file under ROOT, text) pairs."""
    found = []
    for path, text in sources:
        package = os.path.dirname(path).split(os.sep)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                if not path.startswith("fluxkit"):  # a relative import outside the package (bench's own)
                    continue
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fluxkit":
                module = node.module
            elif isinstance(node, ast.Import):
                module = next((a.name for a in node.names if a.name.split(".")[0] == "fluxkit"), None)
                if module is None:
                    continue
                node = ast.ImportFrom(module=module, names=[], lineno=node.lineno)
            else:
                continue
            try:
                imported = importlib.import_module(module)
            except ImportError as err:
                found.append(f"{path}:{node.lineno}: {module} ({err})")
                continue
            found += [f"{path}:{node.lineno}: {module} has no {a.name}" for a in node.names
                      if a.name != "*" and not hasattr(imported, a.name)
                      and not (hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{a.name}"))]
    return found


def test_every_import_resolves_deferred_ones_too():
    """An import inside a function runs only when it is called: one left naming a module that moved
    (fluxkit's folders, issue 19) would fail in a user's run, not on import. Every module of the
    package, entry script, bench and test file is read."""
    files = [os.path.relpath(os.path.join(folder, name), ROOT)
             for top in ("fluxkit", "bench", "tests") for folder, _, names in os.walk(os.path.join(ROOT, top))
             for name in names if name.endswith(".py")]
    files += [name for name in os.listdir(ROOT) if name.endswith(".py")]
    sources = []
    for path in sorted(files):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            sources.append((path, f.read()))
    found = _unresolved_imports([(p, t) for p, t in sources if p.startswith("fluxkit") or "fluxkit" in t])
    assert not found, found


def test_the_import_check_sees_a_moved_module():
    """Break it once: a deferred `from ..scan import` in training/ (scan lives in data/) is named."""
    text = "def f():\n    from ..scan import scan_dataset\n    from ..data.scan import scan_dataset, nothing_here\n"
    found = _unresolved_imports([(os.path.join("fluxkit", "training", "x.py"), text)])
    assert len(found) == 2 and "fluxkit.scan" in found[0] and "has no nothing_here" in found[1], found


def test_the_graph_sees_the_imports():
    graph = import_graph(module_level_only=True)
    trained = {"training.models", "training.loss", "training.outputs", "training.runcontrol"}
    assert len(MODULES) >= 20 and trained | {"checkpoint", "cache"} <= set(MODULES)
    assert trained | {"checkpoint", "cache"} <= graph["training.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycle_at_module_level():
    assert cycles(import_graph(module_level_only=True)) == set()


def test_no_cycle_through_deferred_imports():
    # an import inside a function still ties two modules together, so it may not close a cycle either
    found = cycles(import_graph(module_level_only=False))
    assert not found, sorted(sorted(c) for c in found)


# The floor plan, bottom up: each folder imports only itself and the folders listed for it. The
# rooms a run is made of (training, inference, launch, cache, checkpoint, plan) sit on top of these
# and may use each other (the cycle tests above still hold between their modules); nothing below
# them imports them.
LOWER_LAYERS = {
    "shared": set(),                              # the shared facts: the bottom
    "data": {"shared"},                           # scan, buckets, pairs, dataset: no model needed
    "weights": {"shared"},                        # LoRA files, ZeRO-3 gathering, quantized base
    "families": {"shared", "data", "weights"},    # what differs between FLUX models
    "tiny": {"shared", "families"},               # random pipelines of any family
    "upstream": {"shared", "weights", "families"},  # diffusers' own scripts: patches and fixes
}


def _folder(module):
    return module.split(".")[0]


def test_no_module_left_at_the_top_of_the_package():
    """The floor plan shows the architecture: every module lives in a folder of what it serves."""
    flat = [m for m in MODULES if "." not in m and not os.path.isdir(os.path.join(PACKAGE, m))]
    assert not flat, flat


def test_lower_layers_never_import_upper_ones():
    """shared/ imports nothing above it; data/ and weights/ only shared/; families/ those three; tiny/
    and upstream/ what the table allows. Deferred imports count too: they tie the layers all the same."""
    upward = []
    for module, imported in import_graph(module_level_only=False).items():
        folder = _folder(module)
        if folder in LOWER_LAYERS:
            allowed = LOWER_LAYERS[folder] | {folder}
            upward += [f"{module} -> {m}" for m in sorted(imported) if _folder(m) not in allowed]
    assert not upward, upward


def test_the_layer_guard_sees_an_upward_import(monkeypatch):
    """Break it once: shared.errors importing training.train_args is caught (the guard reads real sources)."""
    real = _source

    def with_upward(name):
        text = real(name)
        return text + "\nfrom ..training.train_args import parse\n" if name == "shared.errors" else text

    monkeypatch.setitem(globals(), "_source", with_upward)
    with pytest.raises(AssertionError, match=r"shared\.errors -> training\.train_args"):
        test_lower_layers_never_import_upper_ones()


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
    tree = ast.parse(_source("training.train"))
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {"train", "setup", "resume", "loop", "finish"} <= set(lengths)
    too_long = {name: n for name, n in lengths.items() if n >= 80}
    assert not too_long, too_long


def test_every_function_in_the_package_is_short():
    too_long = {f"{name}.{n.name}": n.end_lineno - n.lineno + 1 for name in MODULES
                for n in ast.walk(ast.parse(_source(name)))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 >= 80}
    assert not too_long, too_long


def test_no_file_in_the_package_is_long():
    too_long = {name: _source(name).count("\n") for name in MODULES if _source(name).count("\n") > 600}
    assert not too_long, too_long


def _trainer_flags():
    from fluxkit.training.train_args import build_parser

    return {o for lora in (False, True) for a in build_parser(lora)._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}


def test_each_trainer_flag_is_defined_once():
    """Every trainer flag is one add_argument call in the package (the inference scripts' parser is
    another program's flags); the full and LoRA parsers are the same function."""
    defined = {}
    for name in MODULES:
        if name == "inference.args":
            continue
        for node in ast.walk(ast.parse(_source(name))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                    and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
                defined.setdefault(node.args[0].value, []).append(f"{name}:{node.lineno}")
    flags = _trainer_flags()
    assert len(flags) > 90
    twice = {flag: where for flag, where in defined.items() if flag in flags and len(where) > 1}
    assert not twice, twice
    assert flags <= set(defined), flags - set(defined)



UPSTREAM_NAMESPACE = "# upstream namespace"  # the mark of a line that reads an upstream script's own args


def test_no_trainer_flag_is_read_with_getattr():
    """A trainer flag is a TrainConfig field, read as args.flag: never getattr(args, "flag", default), which
    restates (and can contradict) the parser's default. The one exception is an upstream script's own
    argparse namespace (fluxkit.upstream.script_fixes' hooks run inside diffusers' scripts, whose flags differ),
    marked on its line."""
    flags = {o[2:] for o in _trainer_flags()} | {"lora"}
    found = []
    for name in MODULES:
        lines = _source(name).splitlines()
        for node in ast.walk(ast.parse(_source(name))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in flags
                    and ast.unparse(node.args[0]).split(".")[-1] in ("args", "cfg", "config")
                    and not lines[node.lineno - 1].rstrip().endswith(UPSTREAM_NAMESPACE)):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
    marked = [f"{name}:{i}" for name in MODULES for i, line in enumerate(_source(name).splitlines(), 1)
              if line.rstrip().endswith(UPSTREAM_NAMESPACE)]
    assert marked and all(m.split(":")[0].split(".")[-1] == "script_fixes" for m in marked), marked  # not a way out elsewhere

def test_launcher_plan_and_cache_commands_take_the_trainer_flags_from_its_parser(monkeypatch, capsys):
    """A flag added to the trainer's parser (and nowhere else) is a launcher key, a plan flag and a
    cache-command flag at once."""
    import fluxkit.training.train_args as train_args

    real = train_args.build_parser

    def with_sentinel(lora, **kw):
        p = real(lora, **kw)
        p.add_argument("--zz_sentinel", type=int, default=0)
        return p

    monkeypatch.setattr(train_args, "build_parser", with_sentinel)
    from fluxkit.launch.keys import parse_command_line
    from fluxkit.launch.spec import LAUNCHERS
    from fluxkit.plan.cli import build_parser as plan_parser

    assert parse_command_line(LAUNCHERS["lora"], "launcher", ["--zz_sentinel=3"]).opts["zz_sentinel"] == "3"
    assert "--zz_sentinel" in plan_parser()._option_string_actions
    from fluxkit.cache import main as cache_main

    with pytest.raises(SystemExit):  # the fill command parses with it: the sentinel is known, the int is not
        cache_main(["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--zz_sentinel", "x"])
    assert "argument --zz_sentinel: invalid int value" in capsys.readouterr().err


def test_train_config_is_the_parser_frozen():
    """TrainConfig has a field per trainer flag (its dest) and nothing else but `lora`; it cannot be edited."""
    import dataclasses

    from fluxkit.training.train_args import TrainConfig, build_parser, parse

    dests = {a.dest for lora in (False, True) for a in build_parser(lora)._actions if a.dest != "help"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} == dests | {"lora"}
    cfg = parse(["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--instance_data_dir", "d"])
    assert isinstance(cfg, TrainConfig) and cfg.lora is False and cfg.rank is None and cfg.resolution == 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.resolution = 64
    assert dataclasses.replace(cfg, resolution=64).resolution == 64
