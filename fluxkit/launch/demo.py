"""--demo: a tiny random FLUX and sample data in the demo cache (built once), the demo's keys, and
images rendered with the result at the end."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from ..shared.errors import UserError
from .command import LaunchPlan
from .keys import Request


def demo_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FLUXKIT_DEMO_DIR") or os.path.join(base, "fluxkit", "demo")


def missing_parts(cache: str) -> tuple[bool, bool]:
    """Whether the demo's tiny FLUX and its sample data are still to be built in `cache`."""
    return (not os.path.isfile(os.path.join(cache, "tiny_flux", "model_index.json")),
            not os.path.isfile(os.path.join(cache, "data", "prompts.txt")))


def apply_demo(req: Request) -> None:
    """The demo's keys. A dry run with nothing built yet builds the demo's model and data in a
    scratch folder (removed when it ends, remove_dry_run_scratch), so it checks what the demo runs."""
    cache = demo_cache()
    if req.dry_run and any(missing_parts(cache)):
        import tempfile

        cache = tempfile.mkdtemp(prefix="fluxkit-demo-dry-run-")
    req.demo_cache = cache
    for key, value in req.spec.demo.items():
        if key not in req.given:
            req.opts[key] = value.replace("{cache}", cache) if isinstance(value, str) else value
    if not {"output_dir", "resume_from_checkpoint", "overwrite_output_dir"} & req.given:
        # the demo's own folder: running the demo again starts over, the previous demo moves to OUTPUT.old-TIME
        req.opts["overwrite_output_dir"] = True


def build_demo_cache(req: Request) -> None:
    cache = req.demo_cache
    model, data = os.path.join(cache, "tiny_flux"), os.path.join(cache, "data")
    todo_model, todo_data = missing_parts(cache)
    if not (todo_model or todo_data):
        print(f"demo: reusing the tiny FLUX and sample data in {cache}", flush=True)
        return
    if req.dry_run:
        print(f"demo: would build a tiny random FLUX and sample data in {demo_cache()} (make_tiny_flux.py --preset "
              "tiny); checked on a copy built in a scratch folder, removed when the dry run ends", flush=True)
    else:
        print(f"demo: building a tiny random FLUX and sample data in {cache} (once)", flush=True)
    from ..tiny import build as tiny

    os.makedirs(cache, exist_ok=True)
    preset = tiny.resolve_preset("tiny")
    # the tokenizer trainers and dataset writers print progress from native code: kept to show on failure
    with captured_output(show_on_error=True, keep=req.verbose):
        if todo_model:
            tiny.build_pipeline(model, preset, seed=0, overwrite=True)
        if todo_data:
            tiny.build_datasets(data, seed=0, resolution=preset.sample_resolution, overwrite=True)


def remove_dry_run_scratch(req: Request) -> None:
    if req.dry_run and req.demo_cache and req.demo_cache != demo_cache():
        import shutil

        shutil.rmtree(req.demo_cache, ignore_errors=True)


@contextlib.contextmanager
def captured_output(show_on_error: bool, keep: bool = False):
    """Output written to this process's stdout/stderr file descriptors (native code included) goes to a
    temporary file instead; it is shown if the block fails (or if keep)."""
    if keep:
        yield
        return
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except UserError:
            raise  # one line says it all
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed and show_on_error:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", errors="replace"))
                sys.stderr.flush()


def import_for_demo_infer(req: Request) -> threading.Thread:
    """Import what demo_infer needs (the inference module and the pipeline's classes: diffusers and
    transformers) on a thread while the trainers run, when this process only waits on them: after
    training they took 14.5 s before the first image (load 8). Optional libraries are left out first,
    as demo_infer's inference.main would. A failure here is left for demo_infer to meet and report."""
    def work():
        from .. import families
        from ..shared import host_runtime
        from ..weights import quant

        model = req.opts["model_name"]
        try:
            host_runtime.leave_out(quant.libraries_not_needed("none", False, model))
            from ..inference import run  # noqa: F401

            families.of_folder(model).pipeline_class()
        except Exception:  # noqa: BLE001 - demo_infer imports the same and says what failed
            pass

    thread = threading.Thread(target=work, name="demo-imports", daemon=True)
    thread.start()
    return thread


def demo_infer(req: Request, plan: LaunchPlan, device_type: str) -> None:
    """Render the demo's prompts with the result, in this process (the inference scripts' main)."""
    from ..inference.args import DREAMBOOTH, LORA
    from ..inference.run import main as infer

    o = req.opts
    out = o["output_dir"]
    images = os.path.join(out, "demo_images")
    args = ["--prompts_file", os.path.join(req.demo_cache, "data", "prompts.txt"), "--seeds", "0",
            "--num_inference_steps", "4", "--height", o["resolution"], "--width", o["resolution"],
            "--output_dir", images, "--device", device_type, "--overwrite"]
    if req.spec.kind == "lora":
        infer(LORA, ["--model_path", o["model_name"], "--lora_weights", out] + args)
    else:
        infer(DREAMBOOTH, ["--model_path", out] + args)
    if req.spec.kind == "lora":
        print(f"demo: done. LoRA weights : {out}/pytorch_lora_weights.safetensors (base model: {o['model_name']})")
    else:
        print(f"demo: done. weights      : {out} (a complete FLUX pipeline folder)")
    print(f"            images       : {images}")
    print(f"            training log : {plan.log}", flush=True)
