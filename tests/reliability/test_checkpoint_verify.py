"""Resume restores everything it promises, or says exactly what it could not (issue 23).

Every file of a real checkpoint is damaged in turn (truncated, deleted, one byte flipped, replaced
by a pickle whose loading would create a marker file) for a one-process run, a 2-process DeepSpeed
ZeRO-2 run and a 2-process ZeRO-3 run: a resume is one error line naming that file, exit 2, and the
output folder is left byte for byte as it was. The multi-process runs are made once each; their
damaged copies go through the trainer in this process (its preflight check, the code every
process's launch runs first; rank 0 hashes) and one damaged copy per kind through a real 2-process
launch. An intact checkpoint without a manifest (written before them) resumes with the
partial-check line and bit-identically; random states accelerate fails to restore are restored
anyway; a resume on another process count says what it did not restore in one warning line.
"""

import json
import os
import shutil

import pytest
import torch

from conftest import ACCELERATE_CONFIG, ROOT, SHARD_ALL, accelerate_launch, run_entry_inprocess, run_script, trainer_args

FULL = os.path.join(ROOT, "train_flux_dreambooth.py")
LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
DAMAGES = ("truncate", "delete", "flip", "pickle")
PLAIN_FILES = ["fluxkit_state.json", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "transformer/config.json",
               "transformer/diffusion_pytorch_model.safetensors"]
ZERO2_FILES = ["fluxkit_state.json", "latest", "pytorch_lora_weights.safetensors",
               "pytorch_model/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "pytorch_model/mp_rank_00_model_states.pt",
               "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "zero_to_fp32.py", "zero_to_torch.py"]
ZERO3_FILES = ["fluxkit_state.json", "latest", "pytorch_model/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
               "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
               "pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
               "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt", "random_states_0.pkl", "random_states_1.pkl",
               "scheduler.bin", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
               "zero_to_fp32.py", "zero_to_torch.py"]


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle from the checkpoint was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def damage(path, how, marker):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    elif how == "flip":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        torch.save({"state": _Payload(marker), "step": 2}, path)


def snapshot(folder):
    """{relative path: bytes} of everything under folder."""
    found = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            found[os.path.relpath(p, folder)] = open(p, "rb").read()
    return found


def checkpoint_files(ckpt):
    return sorted(os.path.relpath(os.path.join(d, f), ckpt).replace(os.sep, "/") for d, _, fs in os.walk(ckpt) for f in fs)


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def args_for(model, data, out, steps, **extra):
    return trainer_args(model, data, out, steps, mixed_precision="no", **extra)


def assert_refused_inprocess(script, model, data, seed, rel, how, tmp_path, capsys, **extra):
    """A copy of seed (an output folder holding checkpoint-2) with rel damaged: the trainer's resume is one
    error line naming rel, exit 2, nothing in the folder changed, nothing unpickled."""
    out, marker = tmp_path / "out", tmp_path / "UNPICKLED"
    shutil.copytree(seed, out)
    damage(out / "checkpoint-2" / rel, how, marker)
    before = snapshot(out)
    capsys.readouterr()
    rc = run_entry_inprocess(script, args_for(model, data, out, 3, resume_from_checkpoint="latest", **extra))
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and rel in lines[0] and "checkpoint-2" in lines[0], err[-3000:]
    assert snapshot(out) == before, "the refused resume changed the output folder"
    assert not marker.exists(), "a pickle from the checkpoint was executed"
    return lines[0]


# ------------------------------------------------------------------------------ one process

@pytest.fixture(scope="module")
def plain_run(tiny_flux, sample_data, tmp_path_factory):
    """A full fine-tune's output folder holding checkpoint-2 (one process, fp32)."""
    out = tmp_path_factory.mktemp("plain") / "out"
    assert run_entry_inprocess(FULL, args_for(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    return out


def test_the_manifest_lists_every_file_with_size_and_hash(plain_run):
    import hashlib

    ckpt = plain_run / "checkpoint-2"
    assert checkpoint_files(ckpt) == PLAIN_FILES
    state = json.loads((ckpt / "fluxkit_state.json").read_text())
    files = state["manifest"]["files"]
    assert sorted(files) == [f for f in PLAIN_FILES if f != "fluxkit_state.json"]
    for rel, entry in files.items():
        data = (ckpt / rel).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), rel
    assert files["random_states_0.pkl"]["holds"] == "process 0's random number generator states"


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", PLAIN_FILES)
def test_damaged_plain_checkpoint_is_refused(tiny_flux, sample_data, plain_run, tmp_path, capsys, rel, how):
    assert_refused_inprocess(FULL, tiny_flux, sample_data, plain_run, rel, how, tmp_path, capsys)


def test_latest_names_the_damaged_newest_and_the_newest_intact(tiny_flux, sample_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 4, checkpointing_steps=2)) == 0
    damage(out / "checkpoint-4" / "optimizer.bin", "flip", tmp_path / "m")
    before = snapshot(out)
    capsys.readouterr()
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 5, resume_from_checkpoint="latest")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and snapshot(out) == before
    assert "checkpoint-4" in lines[0] and "optimizer.bin (the optimizer state)" in lines[0], lines
    assert "the newest intact checkpoint is checkpoint-2" in lines[0] and "--resume_from_checkpoint checkpoint-2" in lines[0]
    # the verify command says the same without a run
    from fluxkit.checkpoint.__main__ import main as verify_main

    assert verify_main(["verify", str(out)]) == 2
    cli = capsys.readouterr()
    assert len(error_lines(cli.err)) == 1 and "checkpoint-4" in cli.err and "optimizer.bin" in cli.err
    assert "checkpoint-2: intact at step 2" in cli.out and "newest intact checkpoint: " in cli.out
    assert verify_main(["verify", str(out / "checkpoint-2")]) == 0
    (tmp_path / "empty").mkdir()
    assert verify_main(["verify", str(tmp_path / "empty")]) == 2  # neither a checkpoint nor an output folder
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "neither a checkpoint" in lines[0] and "empty" in lines[0], lines
    damage(out / "checkpoint-2" / "scheduler.bin", "delete", tmp_path / "m")  # now none is intact
    capsys.readouterr()
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 5, resume_from_checkpoint="latest")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "checkpoint-4" in lines[0] and "no older checkpoint is intact" in lines[0], lines


@pytest.mark.cli
def test_verify_cli_help_and_bad_path(tmp_path):
    import sys

    proc = run_script([sys.executable, "-m", "fluxkit.checkpoint", "verify", "--help"])
    assert proc.returncode == 0 and "SHA-256" in proc.stdout and "checkpoint-STEP" in proc.stdout, proc.stdout
    proc = run_script([sys.executable, "-m", "fluxkit.checkpoint", "verify", str(tmp_path / "nowhere")])
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "nowhere" in lines[0], proc.stderr
    assert lines[0].startswith("python -m fluxkit.checkpoint: error:"), lines


def test_a_launchers_check_is_not_repeated_by_its_trainer(plain_run, tmp_path, monkeypatch):
    """The launcher hashes the checkpoint before it starts the trainer, and hands the verdict over in the
    environment; the trainer then compares sizes only (a checkpoint of hundreds of GB is read once)."""
    from types import SimpleNamespace

    from fluxkit import checkpoint
    from fluxkit.checkpoint import manifest
    from fluxkit.shared.errors import UserError

    monkeypatch.setenv("FLUXKIT_CHECKPOINT_CHECKED", "")  # restored at the end: the check below sets it
    out = tmp_path / "out"
    shutil.copytree(plain_run, out)
    hashed = []
    original = manifest.digest
    monkeypatch.setattr(manifest, "digest", lambda path: hashed.append(path) or original(path))
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint="latest", overwrite_output_dir=False, lora=False,
                           allow_changed_settings=True)
    checkpoint.check_run_folder(args, 1, hand_over=True)  # the launcher
    assert len(hashed) == len(PLAIN_FILES) - 1
    checkpoint.check_run_folder(args, 1)  # its trainer
    assert len(hashed) == len(PLAIN_FILES) - 1
    damage(out / "checkpoint-2" / "optimizer.bin", "truncate", tmp_path / "m")  # sizes are still compared
    with pytest.raises(UserError, match="optimizer.bin"):
        checkpoint.check_run_folder(args, 1)


def _strip_manifest(ckpt):
    state = json.loads((ckpt / "fluxkit_state.json").read_text())
    for key in ("manifest", "seal"):
        state.pop(key)
    (ckpt / "fluxkit_state.json").write_text(json.dumps(state, indent=2))


def _log(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "train_log.jsonl"))]


def warnings_of(caplog):
    """The fluxkit.checkpoint warnings logged (in-process runs log to pytest's handler, not stderr)."""
    return [r.getMessage() for r in caplog.records if r.name == "fluxkit.checkpoint" and r.levelname == "WARNING"]


def test_checkpoint_without_manifest_resumes_with_partial_check_line(tiny_flux, sample_data, tmp_path, caplog):
    reference, out = tmp_path / "reference", tmp_path / "old"
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, reference, 4)) == 0
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    _strip_manifest(out / "checkpoint-2")  # as the trainer wrote checkpoints before manifests
    for f in ("pytorch_lora_weights.safetensors", "train_summary.json", "README.md"):
        (out / f).unlink(missing_ok=True)
    caplog.clear()
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 4, resume_from_checkpoint="latest")) == 0
    said = warnings_of(caplog)
    assert len(said) == 1 and "has no manifest" in said[0] and "partial check" in said[0] and "\n" not in said[0], said
    assert _log(out) == _log(reference)
    from safetensors.torch import load_file

    got, ref = load_file(out / "pytorch_lora_weights.safetensors"), load_file(reference / "pytorch_lora_weights.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("how", ["truncate", "pickle"])
def test_checkpoint_without_manifest_with_unreadable_random_states_is_refused(tiny_flux, sample_data, tmp_path, capsys,
                                                                             how):
    """The issue's case: a checkpoint from before manifests whose random_states_0.pkl was cut short (or replaced)
    resumed 'successfully' without its random states; the partial check refuses it in one line."""
    seed = tmp_path / "seed"
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, seed, 2, checkpointing_steps=2)) == 0
    _strip_manifest(seed / "checkpoint-2")
    line = assert_refused_inprocess(LORA, tiny_flux, sample_data, seed, "random_states_0.pkl", how, tmp_path / "t", capsys)
    assert "random number generator states" in line


def test_random_states_accelerate_fails_to_restore_are_restored(tiny_flux, sample_data, tmp_path, monkeypatch):
    """accelerate's load_state swallows a failure to set the random states ("Could not load random states",
    at INFO); the trainer sets them itself from the file, so the resumed run still equals the uninterrupted one."""
    import accelerate.checkpointing

    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, reference, 4)) == 0
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    for f in ("pytorch_lora_weights.safetensors", "train_summary.json", "README.md"):
        (out / f).unlink(missing_ok=True)

    class RefusingRandom:  # as another Python's random state would: accelerate's setstate raises
        def setstate(self, state):
            raise ValueError("state vector is the wrong size")

    monkeypatch.setattr(accelerate.checkpointing, "random", RefusingRandom())
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 4, resume_from_checkpoint="latest")) == 0
    assert _log(out) == _log(reference)


def _reseal(ckpt, **changes):
    """Rewrite a checkpoint's state file as the trainer would for its current files (a test's forgery)."""
    from fluxkit.checkpoint import manifest

    state = json.loads((ckpt / "fluxkit_state.json").read_text())
    state.update(changes)
    state["manifest"]["files"] = manifest.hash_files(str(ckpt), manifest.files_in(str(ckpt)))
    (ckpt / "fluxkit_state.json").write_text(json.dumps(manifest.seal(state), indent=2))


def test_resume_on_another_process_count_says_what_it_did_not_restore(tiny_flux, sample_data, tmp_path, caplog):
    out = tmp_path / "out"
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    ckpt = out / "checkpoint-2"
    shutil.copy(ckpt / "random_states_0.pkl", ckpt / "random_states_1.pkl")
    _reseal(ckpt, world_size=2)  # as a 2-process run would have written it
    args = args_for(tiny_flux, sample_data, out, 3, resume_from_checkpoint="latest")
    assert run_entry_inprocess(LORA, args) == 2  # the settings check refuses another world size by default
    caplog.clear()
    assert run_entry_inprocess(LORA, args + ["--allow_changed_settings"]) == 0
    said = warnings_of(caplog)
    assert len(said) == 1 and "written by 2 process(es), on 1" in said[0], said
    assert "the random states of process 1 are not restored" in said[0] and "not bit-identical" in said[0], said
    # it got past fluxkit.shared.quiet (installed by the trainer) to the log; the launchers' console shows it too
    from fluxkit.launch.console import ConsoleFilter

    line = f"2026-01-01 00:00:00,000 WARNING fluxkit.checkpoint: {said[0]}\n"
    assert ConsoleFilter(verbose=False).feed(line) == [line]


# ------------------------------------------------------------------------------ DeepSpeed, 2 processes

def _launch(script, model, data, out, config, steps, **extra):
    args = trainer_args(model, data, out, steps, **extra)  # bf16 from the DeepSpeed config
    return accelerate_launch([script] + args, num_processes=2, config=config, timeout=600)


# kind: (trainer, accelerate config, the files of its checkpoint-2)
DEEPSPEED_RUNS = {"zero2": (LORA, ACCELERATE_CONFIG, ZERO2_FILES),  # a LoRA run under ZeRO-2
                  "zero3": (FULL, SHARD_ALL, ZERO3_FILES)}  # a full fine-tune under ZeRO-3, every parameter sharded


@pytest.fixture(scope="module")
def deepspeed_run(request, tmp_path_factory):
    """deepspeed_run(kind): a 2-process run's output folder whose newest checkpoint is checkpoint-2, for a kind of
    DEEPSPEED_RUNS: a copy, made once in this module, of the session's shared run of that kind (conftest:
    zero2_lora_run, 4 steps; zero3_runs, 2 steps) without its other checkpoint."""
    runs = {}

    def run(kind):
        if kind not in runs:
            if kind == "zero2":
                (shared, _), other = request.getfixturevalue("zero2_lora_run"), "checkpoint-4"
            else:
                (shared, _), other = request.getfixturevalue("zero3_runs")(DEEPSPEED_RUNS[kind][0]), "checkpoint-1"
            out = tmp_path_factory.mktemp(kind) / "out"
            shutil.copytree(shared, out)
            shutil.rmtree(out / other)
            runs[kind] = out
        return runs[kind]

    return run


@pytest.mark.multiproc
@pytest.mark.parametrize("kind", list(DEEPSPEED_RUNS))
def test_deepspeed_manifest_holds_every_process_files(deepspeed_run, kind):
    ckpt = deepspeed_run(kind) / "checkpoint-2"
    assert checkpoint_files(ckpt) == DEEPSPEED_RUNS[kind][2]
    files = json.loads((ckpt / "fluxkit_state.json").read_text())["manifest"]["files"]
    assert sorted(files) == [f for f in checkpoint_files(ckpt) if f != "fluxkit_state.json"]
    assert files["pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]["holds"] == \
        "DeepSpeed's optimizer state of process 1"


@pytest.mark.multiproc
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind, rel", [(kind, rel) for kind, (_, _, files) in DEEPSPEED_RUNS.items() for rel in files])
def test_damaged_deepspeed_checkpoint_is_refused(tiny_flux, sample_data, deepspeed_run, tmp_path, capsys, kind, rel, how):
    """The trainer's resume check (what rank 0 of a launch runs before the processes connect), in this process."""
    script = DEEPSPEED_RUNS[kind][0]
    assert_refused_inprocess(script, tiny_flux, sample_data, deepspeed_run(kind), rel, how, tmp_path, capsys)


@pytest.mark.parametrize("kind, rel, how", [
    ("zero2", "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "flip"),  # process 1's shard
    ("zero3", "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt", "pickle"),  # DeepSpeed would unpickle it
])
@pytest.mark.multiproc
def test_a_real_two_process_resume_refuses_a_damaged_checkpoint(deepspeed_run, tiny_flux, sample_data, tmp_path, kind, rel, how):
    out, marker = tmp_path / "out", tmp_path / "UNPICKLED"
    shutil.copytree(deepspeed_run(kind), out)
    damage(out / "checkpoint-2" / rel, how, marker)
    before = snapshot(out)
    script, config, _ = DEEPSPEED_RUNS[kind]
    proc = _launch(script, tiny_flux, sample_data, out, config, 3, resume_from_checkpoint="latest")
    errors = {line.split("error: ", 1)[1] for line in proc.stderr.splitlines() if "error: " in line}
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    line = errors.pop()
    assert rel in line and "checkpoint-2" in line and "nothing was loaded" in line, line
    assert snapshot(out) == before and not marker.exists()


def test_lora_file_without_some_layers_is_refused_not_half_loaded(tiny_flux, sample_data, tmp_path, capsys):
    """An intact LoRA file that lacks some of the model's adapters (another --lora_layers) would leave those at
    their initial values; the resume is refused instead."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "out"
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    lora = out / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    dropped = sorted(k for k in tensors if "single_transformer_blocks" in k)
    assert dropped and len(dropped) < len(tensors)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(lora), metadata=metadata)
    _reseal(out / "checkpoint-2")
    capsys.readouterr()
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 3, resume_from_checkpoint="latest")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no weights for some of the model's transformer LoRA layers" in lines[0], lines


def test_a_checkpoint_another_process_failed_to_write_is_not_published(tiny_flux, sample_data, tmp_path, capsys,
                                                                       monkeypatch):
    """The main process learns of every process's save through the manifest's gather: when one failed (here a
    second process is simulated at the gather), the checkpoint is not published and the previous one stays."""
    import accelerate.utils

    real_gather, calls = accelerate.utils.gather_object, []

    def gather(parts):
        calls.append(1)
        failed = {"files": {}, "failure": "process 1 could not write its part"}
        return real_gather(parts) + ([failed] if len(calls) == 2 else [])  # the checkpoint at step 4

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_entry_inprocess(LORA, args_for(tiny_flux, sample_data, out, 4, checkpointing_steps=2)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "checkpoint-4" in lines[0] and "process 1 could not write its part" in lines[0], lines
    assert "checkpoint-2" in lines[0] and "is intact" in lines[0], lines
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]


@pytest.mark.cli
def test_the_launcher_refuses_a_damaged_checkpoint_before_it_starts_anything(tiny_flux, sample_data, plain_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(plain_run, out)
    damage(out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors", "flip", tmp_path / "m")
    before = snapshot(out)
    proc = run_script([os.path.join(ROOT, "finetune_flux_dreambooth_deepspeed_bf16.sh"), f"--model_name={tiny_flux}",
                       f"--instance_dir={sample_data['instance_dir']}", "--instance_prompt=a photo of sks dog",
                       f"--output_dir={out}", "--max_train_steps=3", "--batch_size=1", "--resume_from_checkpoint=latest"])
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "transformer/diffusion_pytorch_model.safetensors (the transformer's weights)" in lines[0], lines
    assert snapshot(out) == before  # no logs/, no run_config.json: refused before the launcher writes


def test_npu_random_states_accelerate_leaves_out_are_saved_and_restored(tmp_path, monkeypatch):
    """accelerate saves no NPU random states, and the noise is drawn on the device: each process writes its
    device's states as tensors beside accelerate's and sets them back (a stand-in torch.npu here: CPU host)."""
    from types import SimpleNamespace

    from fluxkit.checkpoint import device_states, manifest

    class FakeNpu:
        def __init__(self):
            self.states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]

        def get_rng_state_all(self):
            return [s.clone() for s in self.states]

        def set_rng_state_all(self, states):
            self.states = [s.clone() for s in states]

    npu = FakeNpu()
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    process = SimpleNamespace(device=SimpleNamespace(type="npu"), process_index=1)
    device_states.save(process, str(tmp_path))
    assert manifest.files_in(str(tmp_path)) == ["device_random_states_1.safetensors"]
    assert manifest.owner("device_random_states_1.safetensors") == 1  # hashed by the process that wrote it
    saved = npu.get_rng_state_all()
    npu.states = [torch.zeros(3, dtype=torch.uint8)]
    assert device_states.restore(process, str(tmp_path)) is True
    assert all(torch.equal(a, b) for a, b in zip(npu.states, saved)) and len(npu.states) == 2
    other = SimpleNamespace(device=SimpleNamespace(type="npu"), process_index=0)
    assert device_states.restore(other, str(tmp_path)) is False  # none for it: the resume warns
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"), process_index=0)
    device_states.save(cpu, str(tmp_path / "cpu"))  # accelerate's own states cover other devices: nothing written
    assert not (tmp_path / "cpu").exists() and device_states.restore(cpu, str(tmp_path)) is None
