"""Source fixes for diffusers' FLUX DreamBooth example scripts, applied to the AST in memory.

The reference toolkit asked users to hand-edit the scripts at line numbers. These transforms
find the same constructs by shape instead, on the script as the user has it (diffusers' 2024
scripts and current main differ), and never touch the file:

  checkpoint-every-rank  save_state runs on every rank under DeepSpeed/FSDP (it is collective:
                         rank 0 alone hangs); everything else in the block stays on rank 0
  checkpoint-io-rank0    pruning old checkpoints and other file I/O beside save_state: rank 0 only
  validation-dtype       log_validation moves the pipeline with device AND dtype
  lora-save-hook         the LoRA save hook becomes fluxkit.weights.lora's (DeepSpeed-aware, metadata kept)
  lora-load-hook         the LoRA load hook becomes fluxkit.weights.lora's (resume under DeepSpeed)
  patch-import           the reference's `from patch_flux import ...` edit: not needed

A transform whose construct is already fixed is reported and skipped; one whose construct is
missing is an error naming the transform and the script, raised before the script runs.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass

from .cache_pairing import cache_append, cached, keyed_batches  # noqa: F401  (called by fixed scripts)
from ..shared.errors import UserError

HELPER = "__fluxkit_fixes__"  # the name this module gets in the fixed script's globals
MAIN_GUARDS = ("is_main_process", "is_local_main_process")
# Calls that write or delete files: beside save_state these belong to rank 0 only.
FILE_IO = {"shutil.rmtree", "shutil.move", "shutil.copy", "shutil.copytree", "os.remove", "os.unlink",
           "os.rename", "os.replace", "os.rmdir", "torch.save", "open"}
FILE_IO_METHODS = {"save_pretrained", "save_lora_weights", "save_model_card", "save_file", "push_to_hub"}
LORA_HOOK_NAMES = ("transformer", "text_encoder_one", "args", "weight_dtype")
SKIPPED = "skipped by --skip"  # the detail of a fix, or the why of a runtime patch, the user left out


@dataclass
class FixResult:
    name: str
    status: str  # "applied", "already fixed" or "not needed"
    detail: str


class _Missing(Exception):
    """A transform's target construct is not in the script."""


# ------------------------------------------------------------------ helpers run by fixed scripts

def collective_checkpoint(accelerator) -> bool:
    """Whether save_state must be called on every rank: DeepSpeed and FSDP checkpoints are collective."""
    kind = str(getattr(accelerator, "distributed_type", ""))
    return kind.endswith("DEEPSPEED") or kind.endswith("FSDP")


def upstream_lora_hooks(accelerator, transformer, text_encoder_one, args, weight_dtype):
    """fluxkit.weights.lora's (save_hook, load_hook) configured from an upstream LoRA script's variables.

    The text encoder's adapter is saved when the script trains it (--train_text_encoder). The
    saved copy is fp32 with --upcast_before_saving, else weight_dtype; the live model is never cast.
    """
    import torch

    from ..weights.lora import lora_save_load_hooks

    # `args` is the upstream script's own argparse namespace, not a TrainConfig: a script without
    # these flags (FLUX.2's have no CLIP to train) reads as if they were off
    text_encoder = text_encoder_one if getattr(args, "train_text_encoder", False) else None  # upstream namespace
    dtype = torch.float32 if getattr(args, "upcast_before_saving", False) else weight_dtype  # upstream namespace
    return lora_save_load_hooks(accelerator, transformer, text_encoder, dtype=dtype)


# ------------------------------------------------------------------ AST utilities

def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _is_main_guard(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in MAIN_GUARDS


def _mentions_main_guard(test) -> bool:
    return any(_is_main_guard(n) for n in ast.walk(test))


def _method_calls(tree, method: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == method]


def _helper_call(func: str, *args) -> ast.Call:
    return ast.Call(func=ast.Attribute(value=ast.Name(HELPER, ast.Load()), attr=func, ctx=ast.Load()),
                    args=list(args), keywords=[])


def _parents(tree) -> dict:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _ancestors(node, parents) -> list:
    chain = []
    while node in parents:
        node = parents[node]
        chain.append(node)
    return chain


def _file_io_calls(node) -> list[ast.Call]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            name = _dotted(n.func)
            if name in FILE_IO or (isinstance(n.func, ast.Attribute) and n.func.attr in FILE_IO_METHODS):
                out.append(n)
    return out


def _unguarded_io(stmt) -> bool:
    """Whether stmt does file I/O outside an `if ...is_main_process...:` of its own."""
    if isinstance(stmt, ast.If) and _mentions_main_guard(stmt.test):
        return bool(any(_file_io_calls(s) for s in stmt.orelse))
    for child in ast.iter_child_nodes(stmt):
        if isinstance(child, ast.stmt):
            if _unguarded_io(child):
                return True
        elif _file_io_calls(child):
            return True
    return False


def _guard(stmt, accelerator) -> ast.If:
    test = ast.Attribute(value=copy.deepcopy(accelerator), attr="is_main_process", ctx=ast.Load())
    return ast.If(test=test, body=[stmt], orelse=[])


def _names_bound(func) -> set[str]:
    """Names a function's parameters or assignments bind, plus module-level ones (for lookups)."""
    names = set()
    for n in ast.walk(func):
        if isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
    return names


def _enclosing_function(node, parents):
    for a in _ancestors(node, parents):
        if isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return a
    return None


# ------------------------------------------------------------------ the transforms

def _save_state_sites(tree, parents):
    """(save_state call, the statement holding it, the If guarding it with is_main_process or None)."""
    calls = _method_calls(tree, "save_state")
    if not calls:
        raise _Missing("no `accelerator.save_state(...)` call (the checkpointing block)")
    sites = []
    for call in calls:
        chain = [call] + _ancestors(call, parents)
        stmt = next(n for n in chain if isinstance(n, ast.stmt))
        guard = None
        for child, node in zip(chain, chain[1:]):
            if isinstance(node, ast.If) and child in node.body and _mentions_main_guard(node.test):
                guard = node  # keep climbing: the outermost guard is the one to widen
        sites.append((call, stmt, guard))
    return sites


def _already_collective(test) -> bool:
    """`accelerator.is_main_process or <something about the distributed type>`: already fixed upstream."""
    for n in ast.walk(test):
        if isinstance(n, ast.BoolOp) and isinstance(n.op, ast.Or) and any(_is_main_guard(v) for v in n.values):
            others = [ast.dump(v) for v in n.values if not _is_main_guard(v)]
            if any(word in o for o in others for word in ("DEEPSPEED", "distributed_type", "collective_checkpoint", "FSDP")):
                return True
    return False


class _WidenGuard(ast.NodeTransformer):
    def __init__(self, accelerator):
        self.accelerator = accelerator

    def visit_Attribute(self, node):
        if _is_main_guard(node):
            return ast.BoolOp(op=ast.Or(), values=[node, _helper_call("collective_checkpoint", copy.deepcopy(self.accelerator))])
        return self.generic_visit(node)


def _path_siblings(scope, stmt, parents):
    """Yield (statement list, index) of every statement in scope that is not on the way down to stmt."""
    path = {id(stmt)} | {id(a) for a in _ancestors(stmt, parents)}
    todo = [scope]
    while todo:
        node = todo.pop()
        for field in ("body", "orelse"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for i, s in enumerate(block):
                if id(s) in path:
                    if s is not stmt:
                        todo.append(s)
                else:
                    yield block, i


def fix_checkpoint_every_rank(tree) -> tuple[str, str]:
    """save_state on every rank under DeepSpeed/FSDP (collective); the rest of its block on rank 0."""
    parents = _parents(tree)
    applied = 0
    for call, stmt, guard in _save_state_sites(tree, parents):
        if guard is None or _already_collective(guard.test):
            continue
        accelerator = call.func.value
        guard.test = _WidenGuard(accelerator).visit(guard.test)
        # Only save_state (and the names its arguments need) may run on every rank now.
        needed = {n.id for n in ast.walk(call) if isinstance(n, ast.Name)}
        for block, i in list(_path_siblings(guard, stmt, parents)):
            s = block[i]
            if isinstance(s, ast.If) and _mentions_main_guard(s.test):
                continue  # already rank 0's (checkpoint-io-rank0 ran first)
            binds = {t.id for t in getattr(s, "targets", [getattr(s, "target", None)]) if isinstance(t, ast.Name)}
            if binds and binds <= needed and not _file_io_calls(s):
                continue
            block[i] = _guard(s, accelerator)
        applied += 1
    if not applied:
        return "already fixed", "save_state already runs on every rank"
    return "applied", f"{applied} save_state block(s) run on every rank under DeepSpeed/FSDP, the rest on rank 0"


def fix_checkpoint_io_rank0(tree) -> tuple[str, str]:
    """Checkpoint pruning and other file I/O beside save_state on rank 0 only."""
    parents = _parents(tree)
    wrapped = 0
    for call, stmt, guard in _save_state_sites(tree, parents):
        scope = guard or next((a for a in _ancestors(stmt, parents) if isinstance(a, ast.If)), None)
        if scope is None:
            continue
        for block, i in list(_path_siblings(scope, stmt, parents)):
            if _unguarded_io(block[i]):
                block[i] = _guard(block[i], call.func.value)
                wrapped += 1
    if not wrapped:
        return "already fixed", "no file I/O beside save_state runs on every rank"
    return "applied", f"{wrapped} file-I/O statement(s) beside save_state (checkpoint pruning) on rank 0 only"


DTYPE_NAMES = ("torch_dtype", "weight_dtype", "dtype")


def fix_validation_dtype(tree) -> tuple[str, str]:
    """log_validation moves the pipeline with device and dtype (bf16 models, fp32 inputs)."""
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "log_validation"]
    if not funcs:
        raise _Missing("no `def log_validation(...)`")
    status = []
    for func in funcs:
        moves = [c for c in _method_calls(func, "to") if _dotted(c.func.value) == "pipeline"]
        if not moves:
            raise _Missing("no `pipeline.to(...)` in log_validation")
        params = {a.arg for a in func.args.args + func.args.kwonlyargs}
        for call in moves:
            if len(call.args) >= 2 or any(k.arg == "dtype" for k in call.keywords):
                status.append("already fixed")
                continue
            dtype = next((d for d in DTYPE_NAMES if d in params), None)
            if dtype is None:
                raise _Missing(f"no dtype parameter ({', '.join(DTYPE_NAMES)}) in log_validation to move the pipeline with")
            call.keywords.append(ast.keyword(arg="dtype", value=ast.Name(dtype, ast.Load())))
            status.append(f"applied:{dtype}")
    applied = [s for s in status if s.startswith("applied")]
    if not applied:
        return "already fixed", "log_validation already moves the pipeline with its dtype"
    return "applied", f"pipeline.to(accelerator.device, dtype={applied[0].split(':')[1]}) in log_validation"


def _is_lora_script(tree) -> bool:
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "peft":
            return True
        if isinstance(n, ast.Name) and n.id == "LoraConfig":
            return True
    return False


def _refers_to_ours(arg, func) -> bool:
    """The hook argument is already ours: create_save_model_hook(...) / our helper, directly or via a name."""
    def ours(expr):
        return any(isinstance(n, ast.Call) and _dotted(n.func).split(".")[-1] in ("create_save_model_hook", "upstream_lora_hooks",
                                                                                 "lora_save_load_hooks")
                   for n in ast.walk(expr))

    if ours(arg):
        return True
    if isinstance(arg, ast.Name) and func is not None:
        for n in ast.walk(func):
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == arg.id for t in n.targets) and ours(n.value):
                return True
    return False


def _defines_flag(tree, flag: str) -> bool:
    """Whether the script's argparse setup declares flag (add_argument("--flag", ...))."""
    return any(isinstance(a, ast.Constant) and a.value == flag
               for c in _method_calls(tree, "add_argument") for a in c.args)


def _replace_hook(tree, method: str, index: int, what: str) -> tuple[str, str]:
    parents = _parents(tree)
    calls = [c for c in _method_calls(tree, method) if len(c.args) == 1]
    if not calls:
        raise _Missing(f"no `accelerator.{method}(...)` ({what})")
    replaced = 0
    for call in calls:
        func = _enclosing_function(call, parents)
        if _refers_to_ours(call.args[0], func):
            continue
        bound = _names_bound(func) | _names_bound(tree) if func is not None else _names_bound(tree)
        # FLUX.2 scripts train no text encoder (no --train_text_encoder flag) and name none text_encoder_one.
        optional = () if _defines_flag(tree, "--train_text_encoder") else ("text_encoder_one",)
        missing = [n for n in LORA_HOOK_NAMES if n not in bound and n not in optional]
        if missing:
            raise _Missing(f"`{method}` is called where {', '.join(missing)} are not defined, so fluxkit's hook cannot be built")
        hooks = _helper_call("upstream_lora_hooks", copy.deepcopy(call.func.value),
                             *[ast.Name(n, ast.Load()) if n in bound else ast.Constant(None) for n in LORA_HOOK_NAMES])
        call.args[0] = ast.Subscript(value=hooks, slice=ast.Constant(index), ctx=ast.Load())
        replaced += 1
    if not replaced:
        return "already fixed", f"the {what} is already fluxkit's"
    return "applied", f"the script's {what} replaced by fluxkit.weights.lora's"


def fix_lora_save_hook(tree) -> tuple[str, str]:
    """The LoRA save hook becomes fluxkit.weights.lora's: DeepSpeed-aware, cast copy, rank/alpha kept."""
    return _replace_hook(tree, "register_save_state_pre_hook", 0, "LoRA save hook")


def fix_lora_load_hook(tree) -> tuple[str, str]:
    """The LoRA load hook becomes fluxkit.weights.lora's, so resuming under DeepSpeed works."""
    return _replace_hook(tree, "register_load_state_pre_hook", 1, "LoRA load hook")


def _enumerated_loops(tree) -> list[tuple[ast.For, str, str]]:
    """(loop, step name, loader name) of every `for STEP, BATCH in enumerate(LOADER):`."""
    loops = []
    for n in ast.walk(tree):
        if (isinstance(n, ast.For) and isinstance(n.target, ast.Tuple) and len(n.target.elts) == 2
                and isinstance(n.target.elts[0], ast.Name) and isinstance(n.iter, ast.Call) and _dotted(n.iter.func) == "enumerate"
                and n.iter.args and isinstance(n.iter.args[0], ast.Name)):
            loops.append((n, n.target.elts[0].id, n.iter.args[0].id))
    return loops


def _cache_fills(tree, loader: str) -> dict[str, list[tuple[ast.For, ast.Call]]]:
    """{cache name: [(loop, append call)]} for `NAME.append(...)` inside a `for batch in ...LOADER...:` loop."""
    fills: dict[str, list] = {}
    for loop in ast.walk(tree):
        if not (isinstance(loop, ast.For) and isinstance(loop.target, ast.Name)
                and any(isinstance(n, ast.Name) and n.id == loader for n in ast.walk(loop.iter))):
            continue
        for call in _method_calls(loop, "append"):
            if isinstance(call.func.value, ast.Name) and len(call.args) == 1:
                fills.setdefault(call.func.value.id, []).append((loop, call))
    return fills


class _KeyLoader(ast.NodeTransformer):
    def __init__(self, loader):
        self.loader = loader

    def visit_Name(self, node):
        return _helper_call("keyed_batches", node) if node.id == self.loader else node


def fix_cache_by_sample(tree) -> tuple[str, str]:
    """Caches filled in a pass over the loader and read as cache[step] are read by the batch's samples."""
    if any(_dotted(n.func).endswith("keyed_batches") for n in ast.walk(tree) if isinstance(n, ast.Call)):
        return "already fixed", "the caches are already read by the batch's samples"
    fixed = set()
    for loop, step, loader in _enumerated_loops(tree):
        fills = _cache_fills(tree, loader)
        reads = [n for n in ast.walk(loop) if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Load)
                 and isinstance(n.value, ast.Name) and n.value.id in fills and isinstance(n.slice, ast.Name) and n.slice.id == step]
        if not reads:
            continue
        names = {r.value.id for r in reads}
        for fill_loop in {id(f): f for name in names for f, _ in fills[name]}.values():
            fill_loop.iter = _KeyLoader(loader).visit(fill_loop.iter)
        for call in (c for name in names for _, c in fills[name]):
            call.args = [call.func.value, call.args[0]]
            call.func = ast.Attribute(value=ast.Name(HELPER, ast.Load()), attr="cache_append", ctx=ast.Load())
        loop.iter.args[0] = _helper_call("keyed_batches", loop.iter.args[0])
        _replace_nodes(loop, {id(r): _helper_call("cached", r.value, r.slice, ast.Constant(r.value.id)) for r in reads})
        fixed |= names
    if not fixed:
        return "not needed", "no cache filled from the training loader is read by step"
    return "applied", f"{', '.join(sorted(fixed))} read by the samples of the batch being trained, not by step"


def _replace_nodes(tree, new_by_id: dict) -> None:
    class Swap(ast.NodeTransformer):
        def visit(self, node):
            return new_by_id.get(id(node)) or self.generic_visit(node)

    Swap().visit(tree)


def fix_patch_import(tree) -> tuple[str, str]:
    """The reference's `from patch_flux import ...` edit: not needed under the runner."""
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module == "patch_flux":
            return "already fixed", "the script imports patch_flux itself (harmless: the patches are idempotent)"
    return "not needed", "the runner applied the runtime patches before the script"


FIXES = {  # file I/O first: widening the guard afterwards must find the pruning already on rank 0
    "checkpoint-io-rank0": fix_checkpoint_io_rank0,
    "checkpoint-every-rank": fix_checkpoint_every_rank,
    "validation-dtype": fix_validation_dtype,
    "lora-save-hook": fix_lora_save_hook,
    "lora-load-hook": fix_lora_load_hook,
    "cache-by-sample": fix_cache_by_sample,
    "patch-import": fix_patch_import,
}
LORA_ONLY = ("lora-save-hook", "lora-load-hook")
OPTIONAL = ("cache-by-sample", "patch-import")  # constructs a script may lack: never a missing-construct error


def parse_script(path: str) -> ast.Module:
    """The script's AST, or a UserError saying why it cannot be one."""
    import os

    if os.path.isdir(path):
        raise UserError(f"SCRIPT {path!r} is a directory; give the training script, e.g. train_dreambooth_lora_flux.py")
    if not os.path.isfile(path):
        raise UserError(f"SCRIPT {path!r} does not exist; give the path to a diffusers FLUX training script")
    try:
        with open(path, "rb") as f:
            source = f.read()
        return ast.parse(source, filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError) as err:
        line = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        raise UserError(f"SCRIPT {path!r} is not a Python script{line}; give a diffusers FLUX training script") from err
    except OSError as err:
        raise UserError(f"SCRIPT {path!r} cannot be read ({err.strerror}); check its permissions") from err


def check_imports(tree: ast.Module, path: str) -> None:
    """UserError naming the first module the script imports at its top level that is not installed, before
    anything runs: diffusers' FLUX scripts import torchvision, which this toolkit neither needs nor installs.
    Imports under an `if`/`try` (optional ones) are the script's own business."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(path))  # the script's folder comes first, as for `python SCRIPT`
    sys.path.insert(0, here)
    try:
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if importlib.util.find_spec(top) is None:
                    build = " (the build made for your torch, as torch's install page pairs them)" if top == "torchvision" else ""
                    raise UserError(f"{path!r} imports {top} (line {node.lineno}), which is not installed in this "
                                    f"Python; install it{build}: pip install {top}")
    finally:
        sys.path.remove(here)


def fix_script(tree: ast.Module, path: str, skip=()) -> list[FixResult]:
    """Apply every transform (except `skip`) to tree in place; one FixResult per transform. Names in skip
    are checked by the caller (patches.check_skip: a runtime patch's name is fine there).

    Raises UserError naming the script and every transform whose construct is missing.
    """
    lora = _is_lora_script(tree)
    results, missing = [], []
    for name, fix in FIXES.items():
        if name in skip:
            results.append(FixResult(name, "not needed", SKIPPED))
            continue
        if name in LORA_ONLY and not lora:
            results.append(FixResult(name, "not needed", "not a LoRA script (no peft import)"))
            continue
        try:
            results.append(FixResult(name, *fix(tree)))
        except _Missing as err:
            missing.append((name, str(err)))
    if missing:
        required = [n for n in FIXES if n not in skip and n not in OPTIONAL and (lora or n not in LORA_ONLY)]
        if len(missing) == len(required):
            lacks = dict.fromkeys(m for _, m in missing)  # two fixes look for the checkpoint block: named once
            raise UserError(f"{path!r} has none of the constructs of diffusers' FLUX DreamBooth scripts "
                            f"({'; '.join(lacks)}); is it one of them?")
        name, why = missing[0]
        others = f" (also: {', '.join(n for n, _ in missing[1:])})" if missing[1:] else ""
        raise UserError(f"transform {name!r} cannot fix {path!r}: {why}{others}; "
                        f"if the script does this differently, rerun with --skip {name}")
    ast.fix_missing_locations(tree)
    return results
