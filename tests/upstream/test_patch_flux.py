"""patch_flux.py: runtime patches on the installed libraries, source fixes on upstream-shaped
fixture scripts, the runner's errors, and an end-to-end DeepSpeed run through the runner."""

import ast
import gc
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, accelerate_launch, assert_user_error, run_inprocess, run_script

RUNNER = os.path.join(ROOT, "patch_flux.py")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# ------------------------------------------------------------------ runtime patches

@pytest.mark.cli
def test_list_reports_every_patch_and_why():
    """As typed, in a fresh interpreter: the report alone, without the libraries' known noise (torchao's
    kernels, pytree notes) that their first import prints above it."""
    from fluxkit.shared.quiet import LOG_NOISE
    from fluxkit.upstream.patches import PATCHES

    proc = run_script([sys.executable, RUNNER, "--list"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    noise = [piece for pieces in LOG_NOISE.values() for piece in pieces if piece in proc.stdout + proc.stderr]
    assert not noise, noise
    for p in PATCHES:
        line = next(l for l in proc.stdout.splitlines() if l.strip().startswith(p.name))
        assert "APPLIES" in line or "skipped" in line
    assert "this machine: cpu" in proc.stdout
    rope = next(l for l in proc.stdout.splitlines() if l.strip().startswith("rope-float32"))
    assert "skipped" in rope and "already computes it in float32" in rope  # diffusers 0.42 handles npu/mps
    gloo = next(l for l in proc.stdout.splitlines() if l.strip().startswith("deepspeed-cpu-gloo"))
    assert "APPLIES" in gloo


def _flux_dev_ids(side=64, text_tokens=512):
    img = torch.zeros(side, side, 3)
    img[..., 1] = torch.arange(side)[:, None]
    img[..., 2] = torch.arange(side)[None, :]
    return torch.cat([torch.zeros(text_tokens, 3), img.reshape(-1, 3)])


def test_rope_float32_matches_float64_for_flux_dev():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from fluxkit.upstream.patches import rope_float32

    embed = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])  # FLUX.1-dev's axes
    ids = _flux_dev_ids()  # 4096 image tokens + 512 text tokens
    ref_cos, ref_sin = embed(ids)  # diffusers on CPU: float64 internally
    cos, sin = rope_float32(ids, embed.axes_dim, embed.theta)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == ref_cos.shape == (4608, 128)
    for ours, ref in ((cos, ref_cos), (sin, ref_sin)):
        rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < 1e-5, rel


@pytest.fixture
def restore_pos_embed(monkeypatch):
    from fluxkit.upstream.patches import _pos_embed_classes

    for cls in _pos_embed_classes():
        monkeypatch.setattr(cls, "forward", cls.forward)


def test_rope_patch_forced_by_env_is_used_and_idempotent(monkeypatch, restore_pos_embed, tiny_flux):
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from fluxkit.upstream import patches

    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    ids = _flux_dev_ids(side=8, text_tokens=8)
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=ids[8:], txt_ids=ids[:8], return_dict=False)
    with torch.no_grad():
        before = model(**inputs)[0]
    assert patches.BY_NAME["rope-float32"].status()[0] is False  # nothing to do on this CPU by default

    monkeypatch.setenv(patches.ENV_ROPE_FP32, "1")
    (name, applied, why), = patches.apply(["rope-float32"])
    assert applied and "forced" in why
    forward = FluxPosEmbed.forward
    patches.apply(["rope-float32"])
    assert FluxPosEmbed.forward is forward, "a second apply must not wrap again"
    cos, sin = model.pos_embed(ids)
    exp_cos, exp_sin = patches.rope_float32(ids, model.pos_embed.axes_dim, model.pos_embed.theta)
    assert torch.equal(cos, exp_cos) and torch.equal(sin, exp_sin), "the patched forward must be in use"
    with torch.no_grad():
        after = model(**inputs)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_rope_check_tells_old_diffusers_from_new(tmp_path, monkeypatch):
    """The 2024 FluxPosEmbed chose float64 unless on mps: the check must see that it needs the patch."""
    import importlib

    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from fluxkit.upstream.patches import _diffusers_downcasts_rope

    (tmp_path / "old_flux_embed.py").write_text(textwrap.dedent('''
        import torch
        class FluxPosEmbed(torch.nn.Module):
            def forward(self, ids):
                is_mps = ids.device.type == "mps"
                freqs_dtype = torch.float32 if is_mps else torch.float64
                return freqs_dtype
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    old = importlib.import_module("old_flux_embed").FluxPosEmbed
    assert not _diffusers_downcasts_rope(old)
    assert _diffusers_downcasts_rope(FluxPosEmbed)


def test_sharded_tensor_device_on_gloo_and_unknown_backends(monkeypatch, tmp_path):
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    from fluxkit.upstream import patches

    monkeypatch.setattr(ShardedTensor, "_get_preferred_device", ShardedTensor._get_preferred_device)
    patches.BY_NAME["npu-sharded-tensor-device"].install()
    assert ShardedTensor._get_preferred_device is patches.preferred_device
    patches.BY_NAME["npu-sharded-tensor-device"].install()  # idempotent
    assert ShardedTensor._get_preferred_device is patches.preferred_device

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        holder = type("Holder", (), {"_process_group": None})()
        assert ShardedTensor._get_preferred_device(holder) == torch.device("cpu")
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "custom")
        assert ShardedTensor._get_preferred_device(holder) == torch.device("cpu")  # no accelerator: cpu
    finally:
        dist.destroy_process_group()


def test_gc_thresholds_and_opt_out(monkeypatch):
    import patch_flux

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        monkeypatch.setenv("FLUXKIT_NO_GC_TUNING", "1")
        assert patch_flux.config_gc() is False and gc.get_threshold() == (700, 10, 10)
        monkeypatch.delenv("FLUXKIT_NO_GC_TUNING")
        assert patch_flux.config_gc() is True and gc.get_threshold() == (700, 50, 1000)
    finally:
        gc.set_threshold(*saved)


def test_pop_safe_weights():
    from fluxkit.upstream.patches import PopSafeList

    weights = PopSafeList()
    assert weights.pop() is None
    weights = PopSafeList([1, 2])
    assert weights.pop() == 2 and weights == [1]


FAKE_TORCH_NPU = '''
"""A stand-in torch_npu: enough for diffusers' NPU attention backend and fluxkit's NPU branches."""
import types
import torch
CALLS = []
torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0)

def npu_fusion_attention(query, key, value, head_num, atten_mask=None, input_layout="BSND", scale=None, **_):
    assert input_layout == "BSND" and head_num == query.shape[2]
    CALLS.append(tuple(query.shape))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if atten_mask is None else ~atten_mask, scale=scale)
    return (out.transpose(1, 2),)
'''

NPU_PROBE = '''
import json, sys, torch
from fluxkit.upstream import patches
status = {n: [a, w] for n, a, w, _ in patches.describe()}
from diffusers import FluxTransformer2DModel
torch.manual_seed(0)
model = FluxTransformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer")
x = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32),
         timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
with torch.no_grad():
    native = model(**x)[0]
applied = patches.apply(["npu-fused-attention"])[0][1]
model = FluxTransformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer")
import torch_npu
with torch.no_grad():
    fused = model(**x)[0]
print(json.dumps({"status": status, "applied": applied, "calls": len(torch_npu.CALLS),
                  "max_diff": (fused - native).abs().max().item()}))
'''


@pytest.mark.cli
@pytest.mark.parametrize("asked", [False, True])
def test_npu_branches_with_a_stand_in_torch_npu(tmp_path, tiny_flux, asked):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(FAKE_TORCH_NPU)
    dist_info = tmp_path / "torch_npu-2.13.0.dist-info"  # diffusers looks for an installed distribution
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (dist_info / "top_level.txt").write_text("torch_npu\n")
    env = {"PYTHONPATH": str(tmp_path), "FLUXKIT_NPU_FLASH_ATTENTION": "1" if asked else "0"}
    proc = run_script([sys.executable, "-c", NPU_PROBE, tiny_flux], env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    status = out["status"]
    assert status["deepspeed-cpu-gloo"][0] is False and "hccl" in status["deepspeed-cpu-gloo"][1]
    assert status["rope-float32"] == [False, status["rope-float32"][1]] and "already" in status["rope-float32"][1]
    assert status["npu-sharded-tensor-device"][0] is False and "maps hccl" in status["npu-sharded-tensor-device"][1]
    if asked:
        assert status["npu-fused-attention"][0] is True and out["applied"] is True
        assert out["calls"] >= 2, "every FLUX attention must go through npu_fusion_attention"
        assert out["max_diff"] < 1e-4
    else:
        assert status["npu-fused-attention"][0] is False and "not asked for" in status["npu-fused-attention"][1]
        assert out["applied"] is False and out["calls"] == 0


# ------------------------------------------------------------------ source fixes on fixture shapes

# diffusers' 2024 shape (the reference's pinned commit): every defect present.
SHAPE_2024 = '''
import os, shutil, torch
from peft import LoraConfig

def log_validation(pipeline, args, accelerator, pipeline_args, epoch, torch_dtype, is_final_validation=False):
    pipeline = pipeline.to(accelerator.device)
    return pipeline

def main(args, accelerator, transformer, text_encoder_one, weight_dtype, global_step, events):
    def save_model_hook(models, weights, output_dir):
        weights.pop()

    def load_model_hook(models, input_dir):
        models.pop()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    if accelerator.is_main_process:
        if global_step % args.checkpointing_steps == 0:
            if args.checkpoints_total_limit is not None:
                for old in sorted(os.listdir(args.output_dir)):
                    shutil.rmtree(os.path.join(args.output_dir, old))
            save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
            accelerator.save_state(save_path)
            events.append("log")
'''

# diffusers' current-main shape: save_state already on every rank, pruning still unguarded.
SHAPE_MAIN = SHAPE_2024.replace(
    "    if accelerator.is_main_process:\n        if global_step",
    "    if accelerator.is_main_process or accelerator.distributed_type == DistributedType.DEEPSPEED:\n        if global_step",
).replace("pipeline.to(accelerator.device)", "pipeline.to(accelerator.device, dtype=torch_dtype)")

# A script after the reference's hand edits: everything already fixed.
SHAPE_HAND_EDITED = SHAPE_MAIN.replace(
    "if args.checkpoints_total_limit is not None:", "if args.checkpoints_total_limit is not None and accelerator.is_main_process:"
).replace(
    "    accelerator.register_save_state_pre_hook(save_model_hook)",
    "    save_Model_Hook = create_save_model_hook(accelerator=accelerator, unwrap_model=None, transformer=transformer,\n"
    "        text_encoder_one=text_encoder_one, args=args, weight_dtype=weight_dtype)\n"
    "    accelerator.register_save_state_pre_hook(save_Model_Hook)",
).replace(
    "    accelerator.register_load_state_pre_hook(load_model_hook)",
    "    accelerator.register_load_state_pre_hook(__fluxkit_fixes__.upstream_lora_hooks(accelerator, transformer, text_encoder_one, args, weight_dtype)[1])",
).replace("import os, shutil, torch", "import os, shutil, torch\nfrom patch_flux import TorchPatcher, config_gc, create_save_model_hook")


def _fix(source, name="train_dreambooth_lora_flux.py", skip=()):
    from fluxkit.upstream.script_fixes import fix_script

    tree = ast.parse(source)
    results = {r.name: r.status for r in fix_script(tree, name, skip=skip)}
    return tree, results


class Recorder:
    """What the checkpoint block did on one rank: which accelerator calls and file deletions ran."""

    def __init__(self, rank, distributed_type):
        self.is_main_process = rank == 0
        self.distributed_type = distributed_type
        self.device = "cpu"
        self.calls = []

    def save_state(self, path):
        self.calls.append(("save_state", os.path.basename(path)))

    def register_save_state_pre_hook(self, hook):
        self.calls.append(("save_hook", hook))

    def register_load_state_pre_hook(self, hook):
        self.calls.append(("load_hook", hook))


def _run_block(tree, rank, distributed_type, tmp_path):
    from types import SimpleNamespace

    from fluxkit.upstream import script_fixes

    out = tmp_path / f"out-{rank}"
    (out / "checkpoint-1").mkdir(parents=True)
    ns = {script_fixes.HELPER: script_fixes, "DistributedType": SimpleNamespace(DEEPSPEED="DistributedType.DEEPSPEED"),
          "create_save_model_hook": lambda **kw: "ours"}
    exec(compile(tree, "fixture", "exec"), ns)
    acc, events = Recorder(rank, distributed_type), []
    args = SimpleNamespace(checkpointing_steps=2, checkpoints_total_limit=1, output_dir=str(out),
                           train_text_encoder=False, upcast_before_saving=False)
    transformer = torch.nn.Linear(2, 2)
    ns["main"](args, acc, transformer, None, torch.float32, 2, events)
    saved = [c[1] for c in acc.calls if c[0] == "save_state"]
    return saved, (out / "checkpoint-1").exists(), events, acc.calls


def test_2024_shape_every_fix_applies_and_ranks_behave(tmp_path):
    tree, results = _fix(SHAPE_2024)
    assert results == {"checkpoint-io-rank0": "applied", "checkpoint-every-rank": "applied", "validation-dtype": "applied",
                       "lora-save-hook": "applied", "lora-load-hook": "applied", "cache-by-sample": "not needed", "patch-import": "not needed"}
    assert "pipeline.to(accelerator.device, dtype=torch_dtype)" in ast.unparse(tree)
    ds = "DistributedType.DEEPSPEED"
    # rank 1 under DeepSpeed: joins save_state (collective), deletes nothing, logs nothing
    saved, old_kept, events, calls = _run_block(tree, 1, ds, tmp_path)
    assert saved == ["checkpoint-2"] and old_kept and events == []
    # rank 0: saves, prunes, logs; the hooks are fluxkit's
    saved, old_kept, events, calls = _run_block(tree, 0, ds, tmp_path)
    assert saved == ["checkpoint-2"] and not old_kept and events == ["log"]
    hooks = [c[1] for c in calls if c[0].endswith("_hook")]
    assert [h.__qualname__.split(".")[-1] for h in hooks] == ["save_hook", "load_hook"]
    assert all(h.__module__ == "fluxkit.weights.lora" for h in hooks)
    # without DeepSpeed nothing changes for rank 1: the block stays rank 0's
    saved, old_kept, events, _ = _run_block(tree, 1, "DistributedType.MULTI_GPU", tmp_path / "ddp")
    assert saved == [] and old_kept and events == []


def test_current_main_shape_only_needs_the_pruning_and_hooks(tmp_path):
    tree, results = _fix(SHAPE_MAIN)
    assert results["checkpoint-every-rank"] == "already fixed"
    assert results["validation-dtype"] == "already fixed"
    assert results["checkpoint-io-rank0"] == "applied"
    assert results["lora-save-hook"] == "applied"
    saved, old_kept, events, _ = _run_block(tree, 1, "DistributedType.DEEPSPEED", tmp_path)
    assert saved == ["checkpoint-2"] and old_kept and events == ["log"]  # upstream logs on every rank; untouched


def test_hand_edited_script_is_already_fixed():
    _, results = _fix(SHAPE_HAND_EDITED)
    assert results == {"checkpoint-io-rank0": "already fixed", "checkpoint-every-rank": "already fixed",
                       "validation-dtype": "already fixed", "lora-save-hook": "already fixed",
                       "lora-load-hook": "already fixed", "cache-by-sample": "not needed", "patch-import": "already fixed"}


def test_full_finetune_script_gets_no_lora_hooks():
    _, results = _fix(SHAPE_2024.replace("from peft import LoraConfig\n", ""), name="train_dreambooth_flux.py")
    assert results["lora-save-hook"] == results["lora-load-hook"] == "not needed"
    assert results["checkpoint-every-rank"] == "applied"


def test_missing_target_names_transform_and_script():
    from fluxkit.shared.errors import UserError

    no_validation = SHAPE_2024.replace("def log_validation", "def other_function")
    with pytest.raises(UserError, match=r"transform 'validation-dtype' cannot fix 'train_dreambooth_lora_flux.py'.*--skip validation-dtype"):
        _fix(no_validation)
    _, results = _fix(no_validation, skip=("validation-dtype",))
    assert results["validation-dtype"] == "not needed"
    # a script that can train its text encoder (--train_text_encoder) must name it text_encoder_one
    no_names = SHAPE_2024.replace("text_encoder_one", "te") + "parser.add_argument('--train_text_encoder')\n"
    with pytest.raises(UserError, match="text_encoder_one"):
        _fix(no_names)
    with pytest.raises(UserError, match="none of the constructs"):
        _fix("print('hello')\n", name="hello.py")
    from fluxkit.upstream.patches import check_skip

    with pytest.raises(UserError, match="'nope' is not a runtime patch or source fix"):
        check_skip(["validation-dtype", "checkpoint-save-barrier", "nope"])


# ------------------------------------------------------------------ the runner's command line

def test_runner_bad_input_is_one_line(tmp_path):
    assert_user_error(run_inprocess([sys.executable, RUNNER]), "no SCRIPT")
    assert_user_error(run_inprocess([sys.executable, RUNNER, str(tmp_path / "nope.py")]), "does not exist")
    (tmp_path / "image.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    assert_user_error(run_inprocess([sys.executable, RUNNER, str(tmp_path / "image.py")]), "not a Python script")
    (tmp_path / "hello.py").write_text("print('hello')\n")
    proc = run_inprocess([sys.executable, RUNNER, str(tmp_path / "hello.py")])
    line = assert_user_error(proc, "none of the constructs", "hello.py")
    assert line.count("save_state") == 1, line  # each missing construct named once
    assert "hello" not in proc.stdout, "nothing may run when the script cannot be fixed"


@pytest.mark.cli
def test_runner_runs_script_as_main_with_args_and_exit_code(tmp_path):
    script = tmp_path / "train_shape.py"
    script.write_text(SHAPE_2024 + textwrap.dedent('''
        if __name__ == "__main__":
            import json, sys
            print(json.dumps({"argv": sys.argv[1:], "file": __file__, "path0": sys.path[0]}))
            sys.exit(int(sys.argv[1]))
    '''))
    proc = run_script([sys.executable, RUNNER, str(script), "3", "--flag=x"], timeout=120)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"argv": ["3", "--flag=x"], "file": str(script), "path0": str(tmp_path)}
    summary = [l for l in proc.stderr.splitlines() if l.startswith("patch_flux.py: ")]
    assert len(summary) == 1 and "fixes applied: checkpoint-io-rank0, checkpoint-every-rank" in summary[0]
    assert os.path.getsize(script) and "dtype=torch_dtype" not in script.read_text(), "the file on disk is never edited"


def _unpatched(owner, attr):
    """owner.attr without fluxkit's runtime patches on it (an earlier test may have applied them)."""
    func = getattr(owner, attr)
    while getattr(func, "__fluxkit_patch__", None):
        func = func.__wrapped__
    return func


def test_skip_leaves_out_runtime_patches_and_source_fixes(tmp_path, monkeypatch):
    """--skip NAME for every runtime patch (but one) and a source fix: none of them acts, also after the script's
    own TorchPatcher.apply_patch(); the one not skipped does. A misspelt name: one line with the nearest."""
    from diffusers import Flux2Transformer2DModel

    from fluxkit.upstream import patches

    monkeypatch.setattr(patches, "_LEFT_OUT", set())
    monkeypatch.setattr(sys, "path", list(sys.path))  # the runner puts the script's folder first
    monkeypatch.setattr(Flux2Transformer2DModel, "forward", _unpatched(Flux2Transformer2DModel, "forward"))
    for owner, attr in (("accelerate.Accelerator", "save_state"), ("accelerate.Accelerator", "prepare")):
        monkeypatch.setattr(f"{owner}.{attr}", _unpatched(__import__("accelerate").Accelerator, attr))
    script = tmp_path / "train_shape.py"
    script.write_text(SHAPE_2024 + textwrap.dedent('''
        if __name__ == "__main__":
            import gc, inspect, json, types
            from accelerate import Accelerator
            from diffusers import Flux2Transformer2DModel
            from patch_flux import TorchPatcher
            TorchPatcher.apply_patch()  # the reference's call, after the runner's
            mark = lambda owner, attr: getattr(inspect.getattr_static(owner, attr), "__fluxkit_patch__", None)
            moves = []
            pipe = types.SimpleNamespace(to=lambda *a, **k: moves.append(sorted(k)))
            log_validation(pipe, None, types.SimpleNamespace(device="cpu"), None, 0, torch.bfloat16)
            print(json.dumps({"save_state": mark(Accelerator, "save_state"), "prepare": mark(Accelerator, "prepare"),
                              "forward": mark(Flux2Transformer2DModel, "forward"), "gc": gc.get_threshold(),
                              "to_kwargs": moves}))
    '''))
    kept = "flux2-input-dtype"
    skipped = [p.name for p in patches.PATCHES if p.name != kept]
    gc_before = list(gc.get_threshold())
    proc = run_inprocess([sys.executable, RUNNER, *[a for n in skipped for a in ("--skip", n)], "--skip", "validation-dtype",
                          str(script)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"save_state": None, "prepare": None, "forward": kept, "gc": gc_before, "to_kwargs": [[]]}
    summary, = [l for l in proc.stderr.splitlines() if l.startswith("patch_flux.py: ")]
    groups = dict(part.split(": ", 1) for part in summary.removeprefix("patch_flux.py: ").split("; "))
    assert groups["patches applied"] == kept and groups["skipped"] == ", ".join([*skipped, "validation-dtype"]), summary

    proc = run_inprocess([sys.executable, RUNNER, "--skip", "checkpoint-save-barier", str(script)])
    assert_user_error(proc, "--skip 'checkpoint-save-barier'", "did you mean 'checkpoint-save-barrier'", "--list")
    assert proc.stdout == "", "nothing runs after a bad --skip"


def test_check_reports_without_running(tmp_path):
    proc = run_inprocess([sys.executable, RUNNER, "--check", os.path.join(FIXTURES, "train_lora_flux_2024_shape.py")])
    assert proc.returncode == 0, proc.stderr
    assert "validation-dtype" in proc.stdout and "applied" in proc.stdout


# ------------------------------------------------------------------ end to end under DeepSpeed

def fixture_run(tiny_flux, sample_data, out, fixture):
    """The runner on an upstream-shaped fixture: checkpoint every 2 steps, keep 1, bf16."""
    return [RUNNER, os.path.join(FIXTURES, fixture), "--pretrained_model_name_or_path", tiny_flux,
            "--instance_data_dir", sample_data["instance_dir"], "--output_dir", str(out), "--checkpointing_steps", "2",
            "--checkpoints_total_limit", "1", "--mixed_precision", "bf16"]


@pytest.mark.multiproc
def test_deepspeed_lora_run_checkpoints_twice_and_resumes(tiny_flux, sample_data, tmp_path):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    out = tmp_path / "out"
    common = fixture_run(tiny_flux, sample_data, out, "train_lora_flux_2024_shape.py")
    first = accelerate_launch(common + ["--max_train_steps", "4", "--validation_prompt", "a photo of sks dog"], timeout=240)
    assert first.returncode == 0, first.stderr[-5000:]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["num_processes"] == 2 and result["distributed_type"].endswith("DEEPSPEED") and result["global_step"] == 4
    assert sum("patch_flux.py: patches applied" in l for l in first.stderr.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]  # 2 was pruned
    assert (out / "validation-1.png").exists()  # the validation pipeline ran with the model's dtype

    second = accelerate_launch(common + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"], timeout=240)
    assert second.returncode == 0, second.stderr[-5000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == 4 and result["global_step"] == 6 and len(result["losses"]) == 2
    ckpt = out / "checkpoint-6"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-6"]

    lora_file = ckpt / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert not any(k.startswith("module.") or ".module." in k for k in f.keys())
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8)

    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    torch.manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32),
             timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**x)[0]
        pipe.load_lora_weights(str(ckpt))
        tuned = pipe.transformer(**x)[0]
    assert (tuned - base).abs().max() > 1e-3, "the LoRA trained under DeepSpeed must change the output"


@pytest.mark.multiproc
def test_deepspeed_full_finetune_shape_checkpoints_prunes_resumes_and_saves_a_pipeline(tiny_flux, sample_data, tmp_path):
    """The full fine-tune shape (train_dreambooth_flux.py): the save hook save_pretrained()s the
    transformer, the checkpoint block is rank 0's, the end saves a whole pipeline."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    out = tmp_path / "out"
    common = fixture_run(tiny_flux, sample_data, out, "train_full_flux_2024_shape.py")
    first = accelerate_launch(common + ["--max_train_steps", "4", "--validation_prompt", "a photo of sks dog"], timeout=180)
    assert first.returncode == 0, first.stderr[-5000:]
    summary = [l for l in first.stderr.splitlines() if l.startswith("patch_flux.py: ")]
    assert len(summary) == 1, first.stderr[-3000:]  # rank 0 only
    assert "fixes applied: checkpoint-io-rank0, checkpoint-every-rank, validation-dtype" in summary[0]
    assert "not needed: lora-save-hook, lora-load-hook" in summary[0]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["num_processes"] == 2 and result["distributed_type"].endswith("DEEPSPEED") and result["global_step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]  # 2 was pruned
    assert (out / "validation-epoch-1.png").exists() and (out / "validation-final.png").exists()

    second = accelerate_launch(common + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"], timeout=180)
    assert second.returncode == 0, second.stderr[-5000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] == 4 and result["global_step"] == 6 and len(result["losses"]) == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-6"]

    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    ckpt = FluxTransformer2DModel.from_pretrained(str(out / "checkpoint-6"), subfolder="transformer")
    base_sd, ckpt_sd = base.state_dict(), ckpt.state_dict()
    assert base_sd.keys() == ckpt_sd.keys()
    assert any(not torch.equal(ckpt_sd[k], base_sd[k].to(ckpt_sd[k].dtype)) for k in base_sd), \
        "six full fine-tune steps must change the saved transformer"

    pipe = FluxPipeline.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    final_sd = pipe.transformer.state_dict()
    assert all(torch.equal(final_sd[k], ckpt_sd[k].float()) for k in ckpt_sd), "the final pipeline holds step 6's transformer"
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
