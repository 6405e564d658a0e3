"""The Python launcher (fluxkit/launch/) behind the two .sh launchers (issue 13): one validation layer,
every trainer flag as a key, --config files, run_config.json, a quiet console and Ctrl-C without tracebacks."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_launchers import (FULL, LORA, _SCRUB, dry, launch, launch_inprocess,  # noqa: F401 (autouse)
                            launched_until_first_step, reference_world)


def _one_line_nothing_written(proc, out, *needles):
    """Exit 2, exactly one line on stderr (`PROG: error: ...` naming the culprit), nothing on stdout, no output folder."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == "" and not os.path.exists(out), proc.stdout
    return lines[0]


# ------------------------------------------------------------------ one validation layer

def _model_without(tiny_flux, tmp_path, component):
    copy = tmp_path / f"flux without {component}"
    shutil.copytree(tiny_flux, copy, ignore=lambda d, names: [component] if d == str(tiny_flux) else [])
    return str(copy)


def _corrupt_images(sample_data, tmp_path):
    folder = tmp_path / "images with a broken one"
    shutil.copytree(sample_data["instance_dir"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return str(folder)


TRAINER_MISTAKES = {
    # name: (launcher, extra keys as a function of (tiny_flux, sample_data, tmp_path), needles in the one line)
    "resolution not a multiple of 16": (FULL, lambda m, d, t: ["--resolution=100"], ["--resolution 100", "multiple of 16"]),
    "learning rate negative": (LORA, lambda m, d, t: ["--learning_rate=-1"], ["--learning_rate -1", "positive"]),
    "learning rate zero": (FULL, lambda m, d, t: ["--learning_rate=0"], ["--learning_rate 0", "positive"]),
    "model without text_encoder/": (LORA, lambda m, d, t: [f"--model_name={_model_without(m, t, 'text_encoder')}"],
                                    ["model_name", "text_encoder/"]),
    "caption column missing": (LORA, lambda m, d, t: [f"--dataset_name={d['dataset_name']}", "--caption_column=nope"],
                               ["--caption_column 'nope'", "text"]),
    "T5 length after --": (LORA, lambda m, d, t: ["--", "--max_sequence_length=9999"], ["--max_sequence_length 9999", "512"]),
    "misspelt trainer flag after --": (FULL, lambda m, d, t: ["--", "--lerning_rate=1"], ["--lerning_rate"]),
    "trainer flag key of the wrong type": (LORA, lambda m, d, t: ["--adam_beta2=high"], ["--adam_beta2", "'high'"]),
    "corrupt image": (FULL, lambda m, d, t: [f"--instance_dir={_corrupt_images(d, t)}"], ["broken.png"]),
}


@pytest.mark.parametrize("name", list(TRAINER_MISTAKES))
def test_trainer_mistakes_are_one_line_before_anything_starts(tiny_flux, sample_data, tmp_path, name):
    script, extra, needles = TRAINER_MISTAKES[name]
    out = tmp_path / "out"
    keys = extra(tiny_flux, sample_data, tmp_path)
    cut = keys.index("--") if "--" in keys else len(keys)
    data = [] if any(k.startswith(("--dataset_name", "--instance_dir")) for k in keys) else \
        [f"--instance_dir={sample_data['instance_dir']}"]
    model = [] if any(k.startswith("--model_name") for k in keys) else [f"--model_name={tiny_flux}"]
    prompt = ["--instance_prompt=a photo of sks dog"]  # the reference's prompt goes with its own data only
    proc = launch_inprocess(script, *model, *data, *prompt, f"--output_dir={out}", *keys[:cut], *keys[cut:])
    _one_line_nothing_written(proc, out, *needles)



def _only_broken_images(tmp_path):
    folder = tmp_path / "only broken"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return str(folder)


LAUNCHER_WORDS = {
    # name: (keys as a function of (sample_data, tmp_path), needles in the one line, words it must not hold)
    "data scan, launcher key": (lambda d, t: [f"--instance_dir={d['instance_dir']}", "--batch_size=64"],
                                ["--batch_size 64 is larger than"], ["--train_batch_size"]),
    "data scan, launcher default": (lambda d, t: [f"--instance_dir={d['instance_dir']}"],  # batch_size 8, 4 images
                                    ["--batch_size 8 is larger than"], ["--train_batch_size"]),
    "data scan, trainer's name typed": (lambda d, t: [f"--instance_dir={d['instance_dir']}", "--train_batch_size=64"],
                                        ["--train_batch_size 64 is larger than"], ["--batch_size"]),
    "data scan, folder key": (lambda d, t: [f"--instance_dir={_only_broken_images(t)}", "--skip_bad_images"],
                              ["no readable training images in --instance_dir", "check --instance_dir"],
                              ["--instance_data_dir"]),
}


@pytest.mark.parametrize("name", list(LAUNCHER_WORDS))
def test_the_trainers_checks_name_the_key_the_user_typed(tiny_flux, sample_data, tmp_path, name, capsys, monkeypatch):
    """The trainer's own checks run by the launcher (here the data scan; the memory plan's line in
    test_dry_run_shows_the_memory_plan) name its flag as the user typed it: the launcher's key
    (--batch_size) for the trainer's --train_batch_size, the trainer's name when that was typed."""
    from fluxkit.launch import main

    for var in _SCRUB:
        monkeypatch.delenv(var, raising=False)
    extra, needles, absent = LAUNCHER_WORDS[name]
    out = tmp_path / "out"
    keys = [f"--model_name={tiny_flux}", "--instance_prompt=a photo of sks dog", f"--output_dir={out}", "--resolution=32",
            *extra(sample_data, tmp_path)]
    rc = main(["--launcher", "lora", "launcher.sh", *keys])
    said = capsys.readouterr()
    line = _one_line_nothing_written(subprocess.CompletedProcess(keys, rc, said.out, said.err), out, *needles)
    assert not [word for word in absent if word in line], line

# ------------------------------------------------------------------ every trainer flag is a key

def test_every_trainer_flag_is_a_key():
    p = dry(LORA, "--lora_alpha=8", "--adam_beta2=0.99", "--with_prior_preservation", "--class_prompt=a dog",
            "--class_data_dir=/data/class", "--resume_from_checkpoint", "latest", "--lr_scheduler=cosine",
            "--lr_warmup_steps=10", "--train_batch_size=3", "--dataloader_num_workers=1")
    assert (p.flag("lora_alpha"), p.flag("adam_beta2"), p.flag("class_prompt")) == ("8", "0.99", "a dog")
    assert "--with_prior_preservation" in p.trainer and p.flag("resume_from_checkpoint") == "latest"
    assert (p.flag("lr_scheduler"), p.flag("lr_warmup_steps")) == ("cosine", "10")  # an explicit scheduler stays
    assert p.flag("train_batch_size") == "3" and "3 per device" in p.text  # the trainer's name of a key works too
    assert p.flag("dataloader_num_workers") == "1"
    # a switch the reference sets can be turned off
    assert "--gradient_checkpointing" not in dry(FULL, "--gradient_checkpointing=false").trainer


@pytest.mark.parametrize("where", ["key", "after --"])
def test_a_warmup_without_a_scheduler_warms_up(where):
    args = ["--lr_warmup_steps=100"] if where == "key" else ["--", "--lr_warmup_steps=100"]
    p = dry(LORA, *args)
    assert (p.flag("lr_scheduler"), p.flag("lr_warmup_steps")) == ("constant_with_warmup", "100")
    assert dry(LORA).flag("lr_scheduler") == "constant"  # the reference's schedule by default


def test_dataloader_workers_follow_the_cores():
    cores = len(os.sched_getaffinity(0))
    for procs in ("1", "2"):
        workers = int(dry(LORA, f"--num_processes={procs}").flag("dataloader_num_workers"))
        assert 0 <= workers <= min(8, max(0, cores // int(procs) - 1)), (procs, workers, cores)
    assert dry(FULL).flag("dataloader_num_workers") == "0"  # the full reference's value


def test_unknown_key_is_still_refused(tmp_path):
    proc = launch_inprocess(LORA, "--lerning_rate=1e-4", f"--output_dir={tmp_path / 'out'}")
    _one_line_nothing_written(proc, tmp_path / "out", "--lerning_rate", "known keys")


# ------------------------------------------------------------------ --config

@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_config_file_sets_keys_and_the_command_line_wins(tmp_path, kind):
    cfg = tmp_path / f"run.{kind}"
    if kind == "toml":
        cfg.write_text('batch_size = 3\nresolution = 64\nlora_alpha = 16\nvalidation_prompt = "a zwx toy"\n'
                       "with_prior_preservation = false\nadam_beta2 = 0.98\n")
    else:
        cfg.write_text("batch_size: 3\nresolution: 64\nlora_alpha: 16\nvalidation_prompt: a zwx toy\n"
                       "with_prior_preservation: false\nadam_beta2: 0.98\n")
    p = dry(LORA, f"--config={cfg}", "--resolution=128")
    assert (p.flag("train_batch_size"), p.flag("resolution"), p.flag("lora_alpha")) == ("3", "128", "16")
    assert p.flag("validation_prompt") == "a zwx toy" and p.flag("adam_beta2") == "0.98"
    assert "--with_prior_preservation" not in p.trainer


def test_config_file_with_an_unknown_key_is_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_sise: 3\n")
    proc = launch_inprocess(LORA, f"--config={cfg}", f"--output_dir={tmp_path / 'out'}")
    _one_line_nothing_written(proc, tmp_path / "out", "batch_sise", str(cfg))



@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_config_file_switch_values(tmp_path, kind):
    """A switch in a --config file: "false" (a string, as a hand-written file or an env template gives it)
    turns it off, "true" on; "maybe" is one error line naming the key and the file."""
    cfg = tmp_path / f"run.{kind}"

    def config(key, value):
        cfg.write_text(f'{key} = "{value}"\n' if kind == "toml" else f'{key}: "{value}"\n')
        return f"--config={cfg}"

    assert "--gradient_checkpointing" in dry(FULL).trainer  # the full reference turns it on
    assert "--gradient_checkpointing" not in dry(FULL, config("gradient_checkpointing", "false")).trainer
    assert "--random_flip" not in dry(FULL).trainer
    assert "--random_flip" in dry(FULL, config("random_flip", "true")).trainer
    proc = launch_inprocess(FULL, config("gradient_checkpointing", "maybe"), f"--output_dir={tmp_path / 'out'}")
    _one_line_nothing_written(proc, tmp_path / "out", "gradient_checkpointing", "'maybe'", str(cfg))


# ------------------------------------------------------------------ real runs (DeepSpeed, CPU)

# a tqdm bar: "desc:  33%|###   | 10/30 [00:04<00:06,  3.22it/s, loss=1.4]" or "desc: 8 examples [00:00, 1050 examples/s]"
_BAR = re.compile(r"^.*?\[\d+:\d+(<[\d:?]+)?,[^\]]*\]")


def _console_lines(text):
    """Lines a user reads: progress-bar redraws left out, and text printed right after a bar counted."""
    lines = []
    for line in text.split("\n"):
        for segment in line.split("\r"):
            rest = _BAR.sub("", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", segment)).strip()  # cursor moves are not text
            if rest:
                lines.append(rest)
    return lines


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHON"] = sys.executable
    return env


@pytest.mark.cli
def test_ctrl_c_before_the_first_checkpoint_offers_no_resume(tmp_path, tiny_flux, sample_data):
    """Ctrl-C right after the launcher starts accelerate: nothing was saved, so the launcher must not
    offer --resume_from_checkpoint=latest (it would start over anyway) and says so instead."""
    out = tmp_path / "out"
    args = [LORA, *_tiny_keys(tiny_flux, sample_data, out, "--max_train_steps=60")]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    first = proc.stdout.readline()  # the plan's first line
    deadline = time.time() + 120
    while time.time() < deadline:  # until the trainer process has scanned the data: it is loading, not training
        if any("data: " in log.read_text() for log in out.glob("logs/train_*.log")):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    output = first + proc.stdout.read()
    assert proc.wait(timeout=300) == 130, output[-3000:]
    assert "nothing to resume" in output and "resume with" not in output and "Traceback" not in output, output[-3000:]
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.multiproc
def test_ctrl_c_with_two_processes_prints_no_traceback_and_the_resume_command_works(tmp_path, tiny_flux, sample_data):
    out = tmp_path / "out"
    steps = 20  # Ctrl-C comes after step 1 (the run stopped at step 3 in CI); the resumed run trains the rest
    args = [LORA, f"--model_name={tiny_flux}", f"--dataset_name={sample_data['dataset_name']}", "--resolution=32",
            "--batch_size=1", f"--max_train_steps={steps}", "--checkpointing_steps=100000", "--learning_rate=1e-4",
            "--validation_prompt=", "--num_processes=2", f"--output_dir={out}", "--", "--report_to=none"]
    with launched_until_first_step(args, _env(), out, timeout=300) as proc:
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends the launcher (its child runs in a group of its own)
        output, _ = proc.communicate(timeout=300)
    step_log = out / "train_log.jsonl"
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output and "SignalException" not in output, output
    lines = _console_lines(output)
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    (hint,) = [line for line in lines if "resume with: " in line]
    assert "stopped on SIGINT (exit status 2)" in hint
    stopped_at = json.loads(step_log.read_text().splitlines()[-1])["step"]
    assert stopped_at < steps and (out / f"checkpoint-{stopped_at}").is_dir()

    again = subprocess.run(shlex.split(hint.split("resume with: ", 1)[1]), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {out / f'checkpoint-{stopped_at}'}" in again.stdout + again.stderr
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == steps
    logged = [json.loads(line)["step"] for line in step_log.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # the resumed run continued where the stopped one left off


@pytest.mark.cli
def test_lora_demo_console_is_short(lora_demo):
    """The LoRA demo end to end (build, 2-process training, summary, images) in at most 20 lines a user reads;
    known library noise is filtered where it is made, and --verbose would show it. (The session's one LoRA demo,
    conftest.lora_demo; test_launchers checks its outputs.)"""
    proc = lora_demo[0]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = _console_lines(proc.stdout + proc.stderr)
    for noise in ("Setting accelerator to CPU", "requires torchvision", "kept in float32: []", "FutureWarning",
                  "No LoRA keys associated", "deepspeed_shm_comm_op", "Traceback"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert "Final Performance images/sec" in proc.stdout and "demo: done." in proc.stdout
    assert len(set(lines)) == len(lines), "\n".join(lines)  # nothing twice (e.g. once per rank)
    # 20: the 19 of before plus the line saying what validation renders and costs (issue 22)
    assert len(lines) <= 20, f"{len(lines)} console lines (target: at most 20):\n" + "\n".join(lines)


# ------------------------------------------------------------------ drop-in defaults

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_upstream_default_is_ours(lora):
    from upstream_defaults import upstream_defaults

    from fluxkit.training.train_args import build_parser

    ours = {a.dest: a.default for a in build_parser(lora)._actions if a.option_strings and a.dest != "help"}
    table = upstream_defaults(lora)
    missing = sorted(set(table) - set(ours))
    assert not missing, f"upstream flags our trainer lacks: {missing}"
    differ = {k: (ours[k], v) for k, v in table.items() if ours[k] != v or type(ours[k]) is not type(v)}
    assert not differ, f"(ours, upstream) for defaults that differ: {differ}"


# ------------------------------------------------------------------ run lifecycle (through the launcher)

def _run_keys(tiny_flux, sample_data, out, *more):
    return [f"--model_name={tiny_flux}", f"--instance_dir={sample_data['instance_dir']}", "--instance_prompt=a photo of sks dog",
            "--resolution=32",
            "--batch_size=1", "--gradient_accumulation_steps=1", "--max_train_steps=2", "--checkpointing_steps=1",
            "--learning_rate=1e-4", "--num_processes=1", f"--output_dir={out}", "--report_to=none", *more]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_flux, sample_data):
    """A 2-step full fine-tune through the launcher, with checkpoint-1 and checkpoint-2 (copied per test)."""
    out = tmp_path_factory.mktemp("lifecycle") / "run"
    proc = launch_inprocess(FULL, *_run_keys(tiny_flux, sample_data, out))  # the launcher in process, its run real
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.cli
def test_a_fresh_run_in_a_folder_with_another_runs_checkpoints_is_refused(finished_run, tmp_path, tiny_flux, sample_data):
    out = _copy(finished_run, tmp_path)
    before = _listing(out)
    proc = launch_inprocess(FULL, *_run_keys(tiny_flux, sample_data, out))
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    for needle in ("checkpoint-2", "--resume_from_checkpoint latest", "--overwrite_output_dir"):
        assert needle in line, (needle, line)
    assert _listing(out) == before  # nothing written


@pytest.mark.cli
def test_overwrite_output_dir_moves_the_old_run_aside(finished_run, tmp_path, tiny_flux, sample_data):
    out = _copy(finished_run, tmp_path)
    proc = launch_inprocess(FULL, *_run_keys(tiny_flux, sample_data, out, "--max_train_steps=1", "--overwrite_output_dir"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (old / "checkpoint-2").is_dir() and (old / "train_summary.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]


@pytest.mark.cli
def test_resume_with_changed_settings_is_refused_naming_them(finished_run, tmp_path, tiny_flux, sample_data):
    out = _copy(finished_run, tmp_path)
    before = _listing(out)
    proc = launch_inprocess(FULL, *_run_keys(tiny_flux, sample_data, out, "--learning_rate=3e-4", "--batch_size=2",
                                             "--resume_from_checkpoint", "latest"))
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    for needle in ("checkpoint-2", "learning_rate 0.0001 -> 0.0003", "1x1x1 -> 1x2x1", "--allow_changed_settings"):
        assert needle in line, (needle, line)
    assert "rank" not in line.split("differ:", 1)[-1].replace("--allow", "")  # only what differs is named
    assert _listing(out) == before


@pytest.mark.cli
def test_resume_by_checkpoint_name_inside_output_dir(finished_run, tmp_path, tiny_flux, sample_data):
    out = _copy(finished_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # the name is looked up in --output_dir, not in the current folder (as diffusers does)
    proc = launch_inprocess(FULL, *_run_keys(tiny_flux, sample_data, out, "--max_train_steps=3", "--resume_from_checkpoint",
                                             "checkpoint-1"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in proc.stdout + proc.stderr
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.cli
def test_run_config_records_the_run_and_repeats_it(finished_run, tiny_flux, sample_data, tmp_path):
    record = json.loads((finished_run / "run_config.json").read_text())
    assert record["settings"]["learning_rate"] == 1e-4 and record["settings"]["model_name"] == tiny_flux
    assert record["versions"]["torch"] and record["accelerate_config"]["distributed_type"] == "DEEPSPEED"
    assert "main_process_port" not in record["settings"]
    from fluxkit.training.train_args import parse

    # into the same folder the real run, and so the dry run, is refused (it holds that run's checkpoints)
    from conftest import assert_user_error

    assert_user_error(launch_inprocess(FULL, "--dry_run", f"--config={finished_run / 'run_config.json'}"),
                      "holds another run's checkpoints")
    again = dry(FULL, f"--config={finished_run / 'run_config.json'}", f"--output_dir={tmp_path / 'again'}")
    replayed, ran = vars(parse(again.trainer)), vars(parse(record["trainer_args"]))
    replayed["output_dir"] = ran["output_dir"]
    assert replayed == ran, {k: (ran[k], replayed[k]) for k in ran if ran[k] != replayed[k]}


def test_a_trainer_run_without_the_launcher_writes_run_config_too(tiny_flux, sample_data, tmp_path):
    from conftest import run_entry_inprocess, trainer_args

    from fluxkit.training.train_args import parse

    out = tmp_path / "out"
    args = trainer_args(tiny_flux, sample_data, out, steps=1, learning_rate="3e-4", hub_token="hf_SECRETsecret0123")
    assert run_entry_inprocess(os.path.join(ROOT, "train_flux_dreambooth_lora.py"), args) == 0
    text = (out / "run_config.json").read_text()
    assert "hf_SECRETsecret0123" not in text
    record = json.loads(text)
    assert record["settings"]["learning_rate"] == 3e-4 and record["settings"]["max_sequence_length"] == 512
    assert record["masked"] == ["hub_token"] and record["accelerate_config"]["num_processes"] == 1
    # the launcher takes it as --config: the same trainer settings (the launcher's device and workers aside)
    again = dry(LORA, f"--config={out / 'run_config.json'}", f"--output_dir={tmp_path / 'again'}")
    replayed, ran = vars(parse(again.trainer, lora=True)), vars(parse(args, lora=True))
    differ = {k for k in ran if ran[k] != replayed[k]} - {"output_dir", "hub_token", "device", "mixed_precision"}
    assert not differ, {k: (ran[k], replayed[k]) for k in differ}
    assert replayed["mixed_precision"] == record["accelerate_config"]["mixed_precision"] == "no"  # what the run used


# ------------------------------------------------------------------ the memory plan (issue 15)

def _tiny_keys(tiny_flux, sample_data, out, *more):
    return [f"--model_name={tiny_flux}", f"--instance_dir={sample_data['instance_dir']}", "--instance_prompt=a photo of sks dog",
            "--resolution=32",
            "--batch_size=1", "--max_train_steps=1", "--checkpointing_steps=100", "--num_processes=1",
            "--validation_prompt=", f"--output_dir={out}", "--report_to=none", *more]


def test_a_run_that_does_not_fit_is_refused_before_anything_starts(tiny_flux, sample_data, tmp_path):
    out = tmp_path / "out"
    proc = launch_inprocess(LORA, *_tiny_keys(tiny_flux, sample_data, out, "--device_memory_gb=0.02"))
    line = _one_line_nothing_written(proc, out, "memory plan: ", "GiB peak per device (LoRA 32px batch 1 on 1 process(es), ZeRO-2)",
                                     "does NOT fit in 0.0 GiB", "to fit: ", "--ignore_memory_plan")
    assert "Traceback" not in line


def test_a_quantization_deepspeed_cannot_run_is_refused_by_the_launcher(tiny_flux, sample_data, tmp_path):
    # the launchers' config is DeepSpeed ZeRO-2: torchao's int8 base cannot run there (fluxkit.weights.quant.check)
    out = tmp_path / "out"
    proc = launch_inprocess(LORA, *_tiny_keys(tiny_flux, sample_data, out, "--base_quantization=int8"))
    _one_line_nothing_written(proc, out, "--base_quantization int8 cannot run under DeepSpeed", "nf4")


def test_block_swapping_under_deepspeed_is_refused_by_the_launcher(tiny_flux, sample_data, tmp_path):
    out = tmp_path / "out"
    proc = launch_inprocess(LORA, *_tiny_keys(tiny_flux, sample_data, out, "--blocks_to_swap=1", "--gradient_checkpointing"))
    _one_line_nothing_written(proc, out, "--blocks_to_swap 1 cannot run under DeepSpeed", "zero3_offload")


def test_dry_run_shows_the_memory_plan(tiny_flux, sample_data, tmp_path):
    """A dry run refuses what the run would refuse (issue 19: one behaviour), and shows the plan otherwise."""
    out = tmp_path / "out"
    proc = launch_inprocess(LORA, "--dry_run", *_tiny_keys(tiny_flux, sample_data, out, "--device_memory_gb=0.02"))
    line = _one_line_nothing_written(proc, out, "does NOT fit in 0.0 GiB", "to fit: lower --batch_size or --resolution",
                                     "--ignore_memory_plan")
    assert "--train_batch_size" not in line  # the launcher's key the user typed (batch_size=1), not the trainer's name
    p = dry(LORA, *_tiny_keys(tiny_flux, sample_data, out, "--device_memory_gb=0.02", "--ignore_memory_plan"))
    text = p.text.split("memory plan per device:\n", 1)[1]
    for row in ("transformer base (frozen)", "LoRA rank 4", "saved for backward", "PEAK"):
        assert row in text, row
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("memory plan: ") and "does NOT fit in 0.0 GiB" in last, last
    assert "fits in 40.0 GiB" in dry(LORA, *_tiny_keys(tiny_flux, sample_data, out, "--device_memory_gb=40")).text
    assert not out.exists()


@pytest.mark.parametrize("mistake, needles", [
    ("missing model", ["model_name", "no flux", "no such pipeline folder"]),
    ("empty data", ["instance_dir", "is empty"]),
    ("corrupt image", ["bad.png"]),
    ("resume without checkpoint", ["--resume_from_checkpoint", "checkpoint-7"]),
])
def test_dry_run_refuses_what_the_run_would(tiny_flux, sample_data, tmp_path, mistake, needles):
    """--dry_run runs every check that writes nothing (issue 19): the same one line and exit 2 as the
    real launch, and nothing written; the same keys without the mistake pass with exit 0."""
    out, data = tmp_path / "out", tmp_path / "data"
    shutil.copytree(sample_data["instance_dir"], data)
    keys = _tiny_keys(tiny_flux, {"instance_dir": str(data)}, out)
    if mistake == "missing model":
        keys.append(f"--model_name={tmp_path / 'no flux'}")
    elif mistake == "empty data":
        shutil.rmtree(data)
        data.mkdir()
    elif mistake == "corrupt image":
        (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    else:
        keys.append("--resume_from_checkpoint=checkpoint-7")
    _one_line_nothing_written(launch_inprocess(LORA, "--dry_run", *keys), out, *needles)
    assert not (data / "bad.png").exists() or mistake == "corrupt image"
    if mistake != "empty data":
        good = [k for k in keys if k not in (f"--model_name={tmp_path / 'no flux'}", "--resume_from_checkpoint=checkpoint-7")]
        (data / "bad.png").unlink(missing_ok=True)
        assert dry(LORA, *good).flag("instance_data_dir") == str(data)
        assert not out.exists()


def test_the_trainer_refuses_a_run_that_does_not_fit(tiny_flux, sample_data, tmp_path):
    """`python train_flux_dreambooth_lora.py ...` (no launcher) checks the same plan before any model loads."""
    from conftest import run_inprocess, trainer_args

    out = tmp_path / "out"
    proc = run_inprocess([sys.executable, "train_flux_dreambooth_lora.py",
                          *trainer_args(tiny_flux, sample_data, out, steps=1, device_memory_gb="0.02")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "does NOT fit in 0.0 GiB" in errors[0] and "--ignore_memory_plan" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


# ------------------------------------------------------------------ a finished run without checkpoints

@pytest.fixture(scope="module")
def finished_lora_run(tmp_path_factory, tiny_flux, sample_data):
    """A 1-step LoRA run through the launcher that leaves no checkpoint-* folder, planned on a device far
    too small for it and run anyway with --ignore_memory_plan: (its folder, the launcher's output)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = launch_inprocess(LORA, *_tiny_keys(tiny_flux, sample_data, out, "--device_memory_gb=0.02", "--ignore_memory_plan"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.cli
def test_ignore_memory_plan_trains_anyway(finished_lora_run):
    out, proc = finished_lora_run
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not list(out.glob("checkpoint-*"))
    warned = [line for line in proc.stderr.splitlines() if "going on anyway (--ignore_memory_plan)" in line]
    assert warned and warned[0].startswith("finetune_flux_dreambooth_lora_deepspeed_bf16.sh: warning: memory plan: "), warned
    assert "does NOT fit in 0.0 GiB" in warned[0]


@pytest.mark.cli
@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume latest"])
def test_a_new_run_into_a_finished_run_without_checkpoints_is_refused(finished_lora_run, tmp_path, tiny_flux,
                                                                      sample_data, resume):
    """Its weights would be silently replaced ('latest' finds no checkpoint to continue, so it too starts over)."""
    out = _copy(finished_lora_run[0], tmp_path)
    before = {p: (out / p).read_bytes() for p in _listing(out)}
    more = ["--resume_from_checkpoint=latest"] if resume else []
    proc = launch_inprocess(LORA, *_tiny_keys(tiny_flux, sample_data, out, *more))
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    for needle in ("holds a finished run (pytorch_lora_weights.safetensors, train_summary.json)", "--overwrite_output_dir",
                   f"{out}.old-TIME"):
        assert needle in line, (needle, line)
    assert {p: (out / p).read_bytes() for p in _listing(out)} == before  # nothing written


@pytest.mark.cli
def test_overwrite_output_dir_moves_a_finished_run_aside(finished_lora_run, tmp_path):
    from fluxkit.checkpoint import move_aside_previous_run

    out = _copy(finished_lora_run[0], tmp_path)
    moved = move_aside_previous_run(str(out))
    assert moved and os.path.isfile(os.path.join(moved, "pytorch_lora_weights.safetensors")) and not out.exists()


def test_the_demo_starts_over_in_its_own_folder_only():
    """A second --demo must not be refused for the first demo's weights: it moves them aside; with an
    output_dir of yours the usual rules hold."""
    assert "--overwrite_output_dir" in dry(LORA, "--demo").trainer
    assert "--overwrite_output_dir" not in dry(LORA, "--demo", "--output_dir=mine").trainer
    assert "--overwrite_output_dir" not in dry(FULL, "--demo", "--resume_from_checkpoint=latest").trainer


@pytest.mark.tiny
def test_demo_dry_run_checks_what_the_demo_would_build_and_leaves_nothing(tmp_path, monkeypatch):
    """--demo --dry_run before the demo ever ran: every check runs on a tiny FLUX built in a scratch
    folder (it was refused: 'no such pipeline folder'), exit 0; the demo folder stays empty and the
    scratch folder is gone. The family line shows the trainer's defaults, not blanks."""
    demo, scratch = tmp_path / "demo", tmp_path / "tmp"
    demo.mkdir()
    scratch.mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkdtemp makes the scratch folder
    proc = launch_inprocess(LORA, "--demo", "--dry_run", env={"FLUXKIT_DEMO_DIR": str(demo)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "would build a tiny random FLUX" in proc.stdout and "scratch folder" in proc.stdout
    family = next(line for line in proc.stdout.splitlines() if line.startswith("model family:"))
    assert "max_sequence_length 512 (default)" in family and "guidance_scale 3.5 (default)" in family, family
    assert not any(demo.iterdir()) and not any(scratch.iterdir())
