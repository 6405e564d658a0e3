"""Reliability and security (issue 8): crash-resume exactness, checkpoint atomicity, full disks,
signals, bad input across every entry point, safe weights and secrets.

Crashes are real: the trainer is SIGKILLed at a chosen point by tests/faults/sitecustomize.py, which
the child process loads from its PYTHONPATH (FLUXKIT_TEST_KILL_AT_STEP, FLUXKIT_TEST_KILL_IN_CHECKPOINT
choose the point; fluxkit itself has no test hooks). Full disks are
real where this host lets us mount a small tmpfs in a private mount namespace; elsewhere the
trainer runs under RLIMIT_FSIZE, where the kernel refuses writes past a size (EFBIG) just as a
full disk refuses them (ENOSPC).
"""

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bad_inputs import CASES, ENTRY_POINTS
from conftest import ROOT, accelerate_launch, assert_user_error, run_entry_inprocess as train_inprocess, run_inprocess, run_script, trainer_args
from conftest import private_mount_prefix, with_faults, zero2_lora_launch

FULL = os.path.join(ROOT, "train_flux_dreambooth.py")
LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
KILL_AT_STEP = "FLUXKIT_TEST_KILL_AT_STEP"  # read by tests/faults/sitecustomize.py
KILL_IN_CHECKPOINT = "FLUXKIT_TEST_KILL_IN_CHECKPOINT"
SIGKILLED = -signal.SIGKILL


def train_args(model, data, out, steps, **extra):
    """fp32, one process, seeded: the setting where resume must be bit-identical."""
    return trainer_args(model, data, out, steps, mixed_precision="no", **extra)


def train_subprocess(script, args, env=None, **kw):
    return run_script([sys.executable, script] + args, env=with_faults(env), timeout=600, **kw)


def weights(out, script):
    """Every trained tensor of a finished run, by name."""
    from safetensors.torch import load_file

    if script == LORA:
        return load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    folder = os.path.join(out, "transformer")
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, f)))
    return tensors


def assert_bit_identical(a, b):
    import torch

    assert a.keys() == b.keys() and a
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def log_lines(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_and_losses(out):
    return [(r["step"], r["loss"]) for r in log_lines(out)]


def listing(out):
    return sorted(n for n in os.listdir(out) if n.startswith(("checkpoint-", ".partial-")))


def file_bytes(folder):
    """{relative path: bytes} of everything under folder."""
    found = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                found[os.path.relpath(p, folder)] = fh.read()
    return found


# ------------------------------------------------------------- 1, 2, 4: SIGKILL and exact resume

# Each chain runs one output folder through successive real crashes, each run resuming with
# --resume_from_checkpoint latest, then finishes in-process; the result must equal an
# uninterrupted run's bit for bit. (env of the crashing run, what it must leave behind)
LORA_CHAIN = [
    # before any checkpoint exists: 'latest' must start afresh
    ({KILL_AT_STEP: "1"}, []),
    # between checkpoints: step 3 is lost and redone from checkpoint-2
    ({KILL_AT_STEP: "3"}, ["checkpoint-2"]),
    # inside the checkpoint-4 write: resume must take checkpoint-2; the limit of 1 must not have
    # removed checkpoint-2 before checkpoint-4 was complete
    ({KILL_IN_CHECKPOINT: "4"}, [".partial-checkpoint-4", "checkpoint-2"]),
]
FULL_CHAIN = [
    ({KILL_IN_CHECKPOINT: "2"}, [".partial-checkpoint-2"]),  # the only checkpoint is partial
    ({KILL_AT_STEP: "3"}, ["checkpoint-2"]),
]


@pytest.mark.cli
@pytest.mark.parametrize("script, chain, steps", [(LORA, LORA_CHAIN, 6), (FULL, FULL_CHAIN, 4)], ids=["lora", "full"])
def test_sigkill_chain_resumes_bit_identical(tiny_flux, sample_data, tmp_path, script, chain, steps):
    common = dict(checkpointing_steps=2, checkpoints_total_limit=1)
    reference = tmp_path / "uninterrupted"
    assert train_inprocess(script, train_args(tiny_flux, sample_data, reference, steps, **common)) == 0

    out = tmp_path / "crashed"
    args = train_args(tiny_flux, sample_data, out, steps, resume_from_checkpoint="latest", **common)
    for env, left in chain:
        proc = train_subprocess(script, args, env=env)
        assert proc.returncode == SIGKILLED, proc.stderr[-3000:]
        assert listing(out) == left, (env, listing(out))
        complete = [n for n in left if n.startswith("checkpoint-")]
        # the log shows every step the dead run finished; the next run resumes from the newest complete checkpoint
        killed_at = int(next(iter(env.values())))
        assert [r["step"] for r in log_lines(out)] == list(range(1, killed_at + 1))
        if complete:
            assert json.loads((out / complete[-1] / "fluxkit_state.json").read_text())["global_step"] == int(complete[-1][11:])

    assert train_inprocess(script, args) == 0
    assert listing(out) == [f"checkpoint-{steps}"]  # partial removed, the limit of 1 applied
    assert steps_and_losses(out) == steps_and_losses(reference)
    assert_bit_identical(weights(out, script), weights(reference, script))


def assert_killed_at_step_3_resumes_bit_identical(launch, out, reference):
    """launch(out, env, **flags) SIGKILLed after step 3 leaves checkpoint-2 only; rerun with
    --resume_from_checkpoint latest, it ends with the uninterrupted reference's losses and weights."""
    proc = launch(out, env={KILL_AT_STEP: "3"}, resume_from_checkpoint="latest")
    assert proc.returncode != 0 and listing(out) == ["checkpoint-2"], proc.stderr[-3000:]
    proc = launch(out, resume_from_checkpoint="latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps_and_losses(out) == steps_and_losses(reference)
    assert_bit_identical(weights(out, LORA), weights(reference, LORA))


@pytest.mark.multiproc
def test_sigkill_under_deepspeed_two_processes(tiny_flux, sample_data, tmp_path, zero2_lora_run):
    """ZeRO-2 bf16 LoRA on 2 processes with accumulation 2 (conftest.zero2_lora_launch): killed at step 3
    (checkpoint-2 on disk), resumed, equals the session's uninterrupted run (conftest.zero2_lora_run). What
    test_train's 2-process ZeRO-2 LoRA case asserted is asserted here, on these launches: the summary of a
    2-process bf16 run with accumulation 2, its checkpoints, the resumed run's steps and LoRA keys."""
    reference, proc = zero2_lora_run
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["mixed_precision"] == "bf16" and summary["grad_accum"] == 2
    assert listing(reference) == ["checkpoint-2", "checkpoint-4"]

    def launch(out, env=None, **extra):
        return zero2_lora_launch(tiny_flux, sample_data, out, env=env, **extra)

    out = tmp_path / "crashed"
    assert_killed_at_step_3_resumes_bit_identical(launch, out, reference)
    # resumed from checkpoint-2: checkpoint-4 written, each step logged once, the LoRA keys diffusers loads
    assert listing(out) == ["checkpoint-2", "checkpoint-4"] and [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]
    keys = list(weights(out, LORA))
    assert keys and all(k.startswith("transformer.") and "lora" in k and "module." not in k for k in keys)


def test_checkpoint_limit_counts_only_complete_checkpoints(tmp_path):
    from fluxkit import checkpoint as checkpoints

    def make(name, complete=True):
        d = tmp_path / name
        d.mkdir()
        (d / "optimizer.bin").write_bytes(b"x")
        if complete:
            (d / checkpoints.STATE_FILE).write_text("{}")

    make("checkpoint-2")
    make("checkpoint-6", complete=False)  # a crashed writer's leftover, or someone else's folder
    make(".partial-checkpoint-8", complete=False)
    assert checkpoints.prune(str(tmp_path), 1) == []  # the only complete one stays
    make("checkpoint-4")
    assert checkpoints.prune(str(tmp_path), 1) == [str(tmp_path / "checkpoint-2")]
    assert sorted(os.listdir(tmp_path)) == [".partial-checkpoint-8", "checkpoint-4", "checkpoint-6"]
    assert [s for s, _ in checkpoints.complete_checkpoints(str(tmp_path))] == [4]
    assert sorted(checkpoints.remove_partials(str(tmp_path))) == [".partial-checkpoint-8"]


# ---------------------------------------------------------------- 3: full disk, unwritable output

@pytest.fixture(scope="module")
def checkpoint_2(tiny_flux, sample_data, tmp_path_factory):
    """A LoRA run's output folder holding checkpoint-2 (and its log), to resume on a small disk."""
    out = tmp_path_factory.mktemp("seed") / "out"
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    for name in ("pytorch_lora_weights.safetensors", "train_summary.json", "README.md"):  # as if it stopped at step 2
        os.remove(out / name)
    return out


def _pages(folder):
    return sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096 for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.cli
def test_full_disk_during_checkpoint_and_final_save(tiny_flux, sample_data, checkpoint_2, tmp_path):
    """A checkpoint write and the final save that run out of space: one clear line, exit 2, checkpoint-2
    untouched and no partial left; a read-only output is refused before training; the run then resumes."""
    mnt, results = tmp_path / "disk", tmp_path / "results"
    mnt.mkdir()
    results.mkdir()
    ckpt_args = train_args(tiny_flux, sample_data, mnt, 4, checkpointing_steps=2, resume_from_checkpoint="latest")
    final_args = train_args(tiny_flux, sample_data, mnt, 3, checkpointing_steps=2, resume_from_checkpoint="latest")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    prefix = private_mount_prefix(tmp_path / "probe")
    if prefix:
        # room for checkpoint-2 and the log, and 16 KiB more: a second checkpoint or the 34 KiB LoRA file cannot fit
        size_k = (_pages(checkpoint_2) + 20 * 1024) // 1024
        q = shlex.quote
        py = f"{q(sys.executable)} {q(LORA)}"
        script = "\n".join([
            "set -u",
            f"mount -t tmpfs -o size={size_k}k tmpfs {q(str(mnt))} || exit 90",
            f"cp -a {q(str(checkpoint_2))}/. {q(str(mnt))}/",
            f"{py} {' '.join(q(a) for a in ckpt_args)} >{q(str(results / 'ckpt.out'))} 2>{q(str(results / 'ckpt.err'))}",
            f"echo $? >{q(str(results / 'ckpt.rc'))}",
            f"cp -a {q(str(mnt))} {q(str(results / 'after_ckpt'))}",
            f"{py} {' '.join(q(a) for a in final_args)} >{q(str(results / 'final.out'))} 2>{q(str(results / 'final.err'))}",
            f"echo $? >{q(str(results / 'final.rc'))}",
            f"cp -a {q(str(mnt))} {q(str(results / 'after_final'))}",
            f"mount -o remount,ro {q(str(mnt))} || exit 91",
            f"{py} {' '.join(q(a) for a in final_args)} >{q(str(results / 'ro.out'))} 2>{q(str(results / 'ro.err'))}",
            f"echo $? >{q(str(results / 'ro.rc'))}",
        ])
        proc = subprocess.run(prefix + ["sh", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        reason = "No space left on device"
    else:
        # no mount namespace here: RLIMIT_FSIZE makes the kernel refuse any file past 16 KiB (EFBIG)
        def small_files():
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

        shutil.copytree(checkpoint_2, mnt, dirs_exist_ok=True)
        for name, args in (("ckpt", ckpt_args), ("final", final_args)):
            p = subprocess.run([sys.executable, LORA] + args, env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=600, preexec_fn=small_files)
            (results / f"{name}.out").write_text(p.stdout)
            (results / f"{name}.err").write_text(p.stderr)
            (results / f"{name}.rc").write_text(str(p.returncode))
            shutil.copytree(mnt, results / f"after_{name}")
        reason = "File too large"

    def outcome(name):
        return subprocess.CompletedProcess([name], int((results / f"{name}.rc").read_text()),
                                           (results / f"{name}.out").read_text(), (results / f"{name}.err").read_text())

    seed_files = file_bytes(checkpoint_2 / "checkpoint-2")
    assert_user_error(outcome("ckpt"), "could not write checkpoint", "checkpoint-4", reason, "checkpoint-2", "is intact")
    assert "images_per_sec" not in outcome("ckpt").stdout  # a failed run prints no summary
    after = results / "after_ckpt"
    assert listing(after) == ["checkpoint-2"] and file_bytes(after / "checkpoint-2") == seed_files

    assert_user_error(outcome("final"), "could not write the final weights", reason, "checkpoint-2", "is intact")
    after = results / "after_final"
    assert listing(after) == ["checkpoint-2"] and file_bytes(after / "checkpoint-2") == seed_files
    assert not [n for n in os.listdir(after) if "lora_weights" in n or n == "train_summary.json"], os.listdir(after)

    if prefix:
        assert_user_error(outcome("ro"), "--output_dir", "not writable", "Read-only file system")

    # the same command, with space again, finishes the run from checkpoint-2
    again = tmp_path / "again"
    shutil.copytree(after, again)
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, again, 4, checkpointing_steps=2,
                                            resume_from_checkpoint="latest")) == 0
    assert [r["step"] for r in log_lines(again)] == [1, 2, 3, 4]
    assert (again / "pytorch_lora_weights.safetensors").is_file() and listing(again) == ["checkpoint-2", "checkpoint-4"]


def test_unwritable_output_dir_is_refused_before_training(tiny_flux, sample_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = train_inprocess(LORA, train_args(tiny_flux, sample_data, blocker / "out", 1))
    err = capsys.readouterr().err
    assert rc == 2 and "--output_dir" in err and "cannot be created" in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes through permission bits; the tmpfs test covers read-only there
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc = train_inprocess(LORA, train_args(tiny_flux, sample_data, locked, 1))
        err = capsys.readouterr().err
        assert rc == 2 and "not writable" in err and "Permission denied" in err and "Traceback" not in err



def test_resume_with_another_process_count_is_named_as_a_changed_setting(tiny_flux, sample_data, checkpoint_2,
                                                                        tmp_path, capsys, monkeypatch):
    """checkpoint-2 came from 1 process; resumed where accelerate started 2 (WORLD_SIZE), the global batch
    would change under the same step count: refused before anything loads, naming the process count."""
    out = tmp_path / "out"
    shutil.copytree(checkpoint_2, out)
    with open(out / "checkpoint-2" / "fluxkit_state.json") as f:
        assert json.load(f)["world_size"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = train_inprocess(LORA, train_args(tiny_flux, sample_data, out, 4, checkpointing_steps=2,
                                          resume_from_checkpoint="latest"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1, lines
    assert "world size x batch x accumulation 1x1x1 -> 2x1x1" in lines[0] and "--allow_changed_settings" in lines[0]
    assert listing(out) == ["checkpoint-2"] and log_lines(out)[-1]["step"] == 2  # nothing trained, nothing written


def test_checkpoint_name_is_looked_up_inside_output_dir_before_the_working_folder(tmp_path, monkeypatch):
    """--resume_from_checkpoint checkpoint-2 names output_dir/checkpoint-2 (as diffusers looks it up),
    even when the folder the command runs in has a checkpoint-2 of its own (another run's)."""
    from fluxkit import checkpoint as checkpoints

    out, cwd = tmp_path / "out", tmp_path / "cwd"
    for folder, run_type in ((out, "lora"), (cwd, "full")):
        (folder / "checkpoint-2").mkdir(parents=True)
        (folder / "checkpoint-2" / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": 2, "run_type": run_type}))
    monkeypatch.chdir(cwd)
    path, state = checkpoints.resolve_resume(str(out), "checkpoint-2", "lora")
    assert os.path.samefile(path, out / "checkpoint-2") and state["run_type"] == "lora"
    assert os.path.samefile(checkpoints.resume_path(str(out), "checkpoint-2"), out / "checkpoint-2")
    # a path that is not inside output_dir is still taken as a path
    assert os.path.samefile(checkpoints.resume_path(str(tmp_path / "elsewhere"), "checkpoint-2"), cwd / "checkpoint-2")


# ------------------------------------------------------------------------ 5: SIGINT / SIGTERM

def _finished_steps(out):
    path = out / "train_log.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.cli
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tiny_flux, sample_data, tmp_path, sig):
    out = tmp_path / "out"
    args = train_args(tiny_flux, sample_data, out, 100000, checkpointing_steps=100000)  # would run for hours
    proc = subprocess.Popen([sys.executable, LORA] + args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _finished_steps(out) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = proc.returncode, stdout, stderr
    assert_user_error(subprocess.CompletedProcess(args, *done), f"stopped by {sig.name}", "--resume_from_checkpoint latest")
    assert proc.returncode == 2 and "images_per_sec" not in stdout
    assert took < 60, f"took {took:.1f} s to stop"  # one step plus one checkpoint, with room for a loaded CI host
    last = log_lines(out)[-1]["step"]
    assert listing(out) == [f"checkpoint-{last}"]
    assert json.loads((out / f"checkpoint-{last}" / "fluxkit_state.json").read_text())["global_step"] == last
    if sig == signal.SIGTERM:  # the advertised command continues the run
        assert train_inprocess(LORA, train_args(tiny_flux, sample_data, out, last + 1, checkpointing_steps=100000,
                                                resume_from_checkpoint="latest")) == 0
        assert [r["step"] for r in log_lines(out)] == list(range(1, last + 2))


# --------------------------------------------------------------------------------- 7: security

class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_pickle(path, marker):
    import torch

    torch.save({"weight": _Payload(marker)}, str(path))


@pytest.fixture(scope="module")
def full_checkpoint_2(tiny_flux, sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_seed") / "out"
    assert train_inprocess(FULL, train_args(tiny_flux, sample_data, out, 2, checkpointing_steps=2)) == 0
    return out


@pytest.mark.parametrize("case", ["lora weights", "full transformer", "optimizer state"])
def test_checkpoint_with_pickled_files_is_refused_never_unpickled(tiny_flux, sample_data, checkpoint_2, full_checkpoint_2,
                                                                 tmp_path, capsys, case):
    marker = tmp_path / "UNPICKLED"
    script, seed = (FULL, full_checkpoint_2) if case == "full transformer" else (LORA, checkpoint_2)
    out = tmp_path / "out"
    shutil.copytree(seed, out)
    ckpt = out / "checkpoint-2"
    if case == "lora weights":
        os.remove(ckpt / "pytorch_lora_weights.safetensors")
        _write_pickle(ckpt / "pytorch_lora_weights.bin", marker)
        needles = ["checkpoint-2", "pytorch_lora_weights"]
    elif case == "full transformer":
        for f in os.listdir(ckpt / "transformer"):
            if f.endswith(".safetensors"):
                os.remove(ckpt / "transformer" / f)
        _write_pickle(ckpt / "transformer" / "diffusion_pytorch_model.bin", marker)
        needles = ["checkpoint-2", "safetensors"]
    else:
        _write_pickle(ckpt / "optimizer.bin", marker)
        needles = ["checkpoint-2", "optimizer.bin"]
    capsys.readouterr()
    rc = train_inprocess(script, train_args(tiny_flux, sample_data, out, 3, resume_from_checkpoint="latest"))
    err = capsys.readouterr().err
    assert not marker.exists(), "a pickle from the checkpoint was executed"
    lines = [l for l in err.splitlines() if "error:" in l]
    assert rc == 2 and len(lines) == 1 and all(n in lines[0] for n in needles), err[-3000:]


def _entry_files():
    """Our code: the package, the entry scripts, the launchers, bench. Not what runs left in the checkout
    (the README's commands write output_*/ and infer_result*/ there; DeepSpeed puts its zero_to_fp32.py,
    which calls torch.load, into every checkpoint): in a git checkout the files git does not ignore
    (tracked or new), else a walk that skips those folders."""
    tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                              "*.py", "*.sh"], capture_output=True)
    if tracked.returncode == 0 and tracked.stdout:
        names = [n for n in tracked.stdout.decode().split("\0") if n and not n.startswith("tests/")]
        yield from (os.path.join(ROOT, n) for n in names if os.path.exists(os.path.join(ROOT, n)))
        return
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith((".", "output", "infer_result"))
                   and x not in ("tests", "__pycache__", "demo") and "venv" not in x]
        for f in files:
            if f.endswith((".py", ".sh")):
                yield os.path.join(d, f)


def test_no_trust_remote_code_and_no_pickle_loading_in_our_code():
    import re

    offenders = []
    for path in _entry_files():
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"trust_remote_code\s*=\s*(\w+)", text):
            if m.group(1) != "False":
                offenders.append(f"{os.path.relpath(path, ROOT)}: {m.group(0)}")
        # pickle-based loaders run code from the file; weights are read with safetensors only
        for m in re.finditer(r"\b(torch\.load|pickle\.loads?|joblib\.load|numpy\.load|np\.load)\s*\(", text):
            offenders.append(f"{os.path.relpath(path, ROOT)}: {m.group(0)}")
        for m in re.finditer(r"safe_serialization\s*=\s*(\w+)", text):
            if m.group(1) != "True":
                offenders.append(f"{os.path.relpath(path, ROOT)}: {m.group(0)}")
    assert len(list(_entry_files())) > 10
    assert not offenders, offenders


def test_hub_token_never_reaches_logs_or_outputs(tiny_flux, sample_data, tmp_path, capfd, monkeypatch):
    flag_secret, env_secret = "hf_FLAGsecret0123456789", "hf_ENVsecret0123456789"
    monkeypatch.setenv("HF_TOKEN", env_secret)
    out = tmp_path / "out"
    args = train_args(tiny_flux, sample_data, out, 2, checkpointing_steps=1, hub_token=flag_secret,
                      validation_prompt="a photo of sks dog", num_validation_images=1, num_validation_steps=1)
    args[args.index("--report_to") + 1] = "tensorboard"  # the tracker gets the run's flags
    assert train_inprocess(LORA, args) == 0
    printed = "".join(capfd.readouterr())
    assert flag_secret not in printed and env_secret not in printed
    leaks = [p for p, data in file_bytes(out).items() if flag_secret.encode() in data or env_secret.encode() in data]
    assert len(file_bytes(out)) > 5 and not leaks, leaks


LAUNCHERS = [os.path.join(ROOT, "finetune_flux_dreambooth_lora_deepspeed_bf16.sh"),
             os.path.join(ROOT, "finetune_flux_dreambooth_deepspeed_bf16.sh")]


@pytest.mark.parametrize("form", ["joined", "separate"])
def test_launcher_plan_hides_the_hub_token(tiny_flux, sample_data, tmp_path, form):
    secret = "hf_FLAGsecret0123456789"
    token = [f"--hub_token={secret}"] if form == "joined" else ["--hub_token", secret]
    proc = run_inprocess([LAUNCHERS[0], "--dry_run", f"--model_name={tiny_flux}", f"--instance_dir={sample_data['instance_dir']}",
                          "--instance_prompt=a photo of sks dog", "--batch_size=1", f"--output_dir={tmp_path / 'out'}", "--", *token], env={"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "--hub_token" in proc.stdout and secret not in proc.stdout + proc.stderr


HOSTILE = "x $(touch PWNED) `touch PWNED` ; touch PWNED & | > PWNED 'q' \"dq\" \\ * ?"


@pytest.mark.cli
def test_launcher_passes_hostile_paths_and_prompts_verbatim(tiny_flux, sample_data, tmp_path):
    """Spaces and shell metacharacters in paths and prompts reach the trainer as one argument each, unexpanded."""
    box = tmp_path / "box"
    box.mkdir()
    model = box / f"model {HOSTILE}"
    os.symlink(tiny_flux, model)
    data = box / f"data {HOSTILE}"
    shutil.copytree(sample_data["instance_dir"], data)
    out = box / f"out {HOSTILE}"
    record = tmp_path / "argv.json"
    # stands in for python only where the launcher starts accelerate; everything else runs for real
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "if sys.argv[1:3] == ['-m', 'accelerate.commands.launch']:\n"
                    f"    json.dump(sys.argv[3:], open({str(record)!r}, 'w'))\n    sys.exit(0)\n"
                    f"os.execv({sys.executable!r}, [{sys.executable!r}] + sys.argv[1:])\n")
    fake.chmod(0o755)
    for launcher in LAUNCHERS:
        proc = run_script([launcher, f"--model_name={model}", f"--instance_dir={data}", f"--output_dir={out}",
                           f"--instance_prompt=a photo of {HOSTILE}", "--max_train_steps=1",
                           "--train_batch_size=1"],  # 4 images: the reference's batch 8 is refused by the data scan
                          env={"PYTHON": str(fake)}, cwd=str(box), timeout=300)
        argv = json.loads(record.read_text())
        record.unlink()
        for flag, value in (("pretrained_model_name_or_path", str(model)), ("instance_data_dir", str(data)),
                            ("output_dir", str(out)), ("instance_prompt", f"a photo of {HOSTILE}")):
            assert f"--{flag}={value}" in argv, (flag, argv, proc.stderr[-2000:])
    created = [os.path.join(d, f) for d, ds, fs in os.walk(tmp_path) for f in fs + ds if "PWNED" == f]
    assert not created and not os.path.exists(os.path.join(ROOT, "PWNED")), created


# ------------------------------------------------------------------ 6: bad input, every entry point

def test_bad_input_table_is_broad():
    assert len(CASES) >= 25 and len({c["name"] for c in CASES}) == len(CASES)
    assert {c["entry"] for c in CASES} == set(ENTRY_POINTS)


# the first case of each entry point runs as the real command (interpreter or shell, as a user types
# it), as do cases only a real command can show; the rest run in this process (conftest.run_inprocess)
REAL_COMMAND = {next(c["name"] for c in CASES if c["entry"] == entry) for entry in ENTRY_POINTS} | {
    "launcher: python not found"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"], marks=[pytest.mark.cli] if c["name"] in REAL_COMMAND else [])
                                  for c in CASES])
def test_bad_input_is_one_clear_line(tiny_flux, sample_data, tmp_path, case):
    tmp = tmp_path / "case"
    tmp.mkdir()
    values = {"model": tiny_flux, "instance": sample_data["instance_dir"], "dataset": sample_data["dataset_name"],
              "tmp": str(tmp), "out": str(tmp / "out"), "python": sys.executable}

    def fill(text):
        for k, v in values.items():
            text = text.replace("{" + k + "}", v)
        return text

    for rel, content in case["files"].items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    *interpreter, script = ENTRY_POINTS[case["entry"]]
    command = [fill(a) for a in interpreter] + [os.path.join(ROOT, script)]
    env = {"PYTHON": sys.executable, **{k: fill(v) for k, v in case["env"].items()}}
    run = run_script if case["name"] in REAL_COMMAND else run_inprocess
    proc = run(command + [fill(a) for a in case["args"]], env=env, cwd=str(tmp))
    prog = os.path.basename(script)
    line = assert_user_error(proc, *[fill(n) for n in case["needles"]])
    assert line.startswith(f"{prog}: error: "), line
    assert "usage:" not in proc.stderr, proc.stderr  # the one line alone, not argparse's usage block above it
    out = tmp / "out"
    assert not out.exists() or not [f for _, _, fs in os.walk(out) for f in fs], os.listdir(out)
