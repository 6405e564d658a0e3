"""Fault injection for crash tests: a real SIGKILL at a chosen point of a training run.

A test puts this folder on a child process's PYTHONPATH (Python imports `sitecustomize` at start)
and sets one of the variables below. fluxkit knows nothing of them: the functions named here are
wrapped as their module is first imported, so the process dies exactly where a crash would hit.

    FLUXKIT_TEST_KILL_AT_STEP=N        right after optimizer step N is logged, before its checkpoint
    FLUXKIT_TEST_KILL_IN_CHECKPOINT=N  checkpoint N's state written by every rank, not yet renamed into place

and one recorder, so a multi-process test can state what each rank did rather than infer it:

    FLUXKIT_TEST_RECORD_BATCHES=DIR    each micro batch's step, sample indices and (width, height) per
                                       sample, appended to DIR/rank-R.jsonl by process R, with what each
                                       transformer forward of it received: image tokens (an editing
                                       pair's reference tokens included), text tokens, and the distinct
                                       values of the image position ids' first axis (a reference's differ)
"""

import importlib.abc
import importlib.util
import inspect
import os
import signal
import sys

KILL_AT_STEP = "FLUXKIT_TEST_KILL_AT_STEP"
KILL_IN_CHECKPOINT = "FLUXKIT_TEST_KILL_IN_CHECKPOINT"
RECORD_BATCHES = "FLUXKIT_TEST_RECORD_BATCHES"


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_step_logged(module, step: int) -> None:
    """Wrap fluxkit.training.train.record_step, the one call per optimizer step that writes its log line."""
    original = module.record_step
    signature = inspect.signature(original)

    def record_step(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        done = bound["run"].step if "run" in bound else bound["step"]
        if done == step:
            _die()
        return result

    module.record_step = record_step


def _kill_inside_checkpoint(module, step: int) -> None:
    """Wrap fluxkit.checkpoint.save so that checkpoint `step` dies between accelerate's
    save_state (every rank done) and the rename that makes the checkpoint complete."""
    original = module.save

    def save(accelerator, output_dir, at_step, *args, **kwargs):
        if at_step == step:
            write = accelerator.save_state

            def save_state_then_die(*a, **kw):
                write(*a, **kw)
                accelerator.wait_for_everyone()
                _die()

            accelerator.save_state = save_state_then_die
        return original(accelerator, output_dir, at_step, *args, **kwargs)

    module.save = save


def _record_batches(module, folder: str) -> None:
    """Wrap fluxkit.training.train.micro_step (one call per micro batch, on every rank)."""
    import json

    original = module.micro_step

    def micro_step(run, batch):
        rank = run.accelerator.process_index
        indices = [int(i) for i in batch["index"] if int(i) >= 0]  # class partners are negative
        forwards = []

        def seen(model, args, kwargs):
            image = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            ids = kwargs.get("img_ids")
            forwards.append({"image_tokens": image.shape[1], "text_tokens": kwargs["encoder_hidden_states"].shape[1],
                             "id_t": [] if ids is None else sorted(ids[..., 0].unique().tolist())})

        hook = run.accelerator.unwrap_model(run.transformer).register_forward_pre_hook(seen, with_kwargs=True)
        try:
            result = original(run, batch)
        finally:
            hook.remove()
        with open(os.path.join(folder, f"rank-{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": run.step, "index": indices, "forwards": forwards,
                                "sizes": [list(run.dataset.target_size(i)) for i in indices]}) + "\n")
        return result

    module.micro_step = micro_step


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs patch(module) right after the named module executes, before anyone uses it."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run_module, patch = spec.loader.exec_module, self.patches[name]

        def exec_module(module):
            run_module(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _install():
    patches = {}
    if os.environ.get(KILL_AT_STEP):
        n = int(os.environ[KILL_AT_STEP])
        patches["fluxkit.training.train"] = lambda module: _kill_after_step_logged(module, n)
    if os.environ.get(KILL_IN_CHECKPOINT):
        n = int(os.environ[KILL_IN_CHECKPOINT])
        patches["fluxkit.checkpoint"] = lambda module: _kill_inside_checkpoint(module, n)
    if os.environ.get(RECORD_BATCHES):
        folder = os.environ[RECORD_BATCHES]
        os.makedirs(folder, exist_ok=True)
        kill = patches.get("fluxkit.training.train")

        def patch_train(module):
            _record_batches(module, folder)
            if kill is not None:
                kill(module)

        patches["fluxkit.training.train"] = patch_train
    if patches:
        sys.meta_path.insert(0, _PatchOnImport(patches))


_install()
