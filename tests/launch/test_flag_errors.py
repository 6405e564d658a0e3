"""A misspelt flag or key is one error line naming the nearest real one (issue 19), in the
trainers, the inference scripts, the plan and cache commands and the launchers; no usage block."""

import os

import pytest

from conftest import ROOT, run_entry_inprocess


def exits_2(call):
    with pytest.raises(SystemExit) as exc:
        call()
    return exc.value.code


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and "usage:" not in err, err
    return lines[0]


@pytest.mark.parametrize("script, flag, meant", [
    ("train_flux_dreambooth.py", "--learning_rte", "--learning_rate"),
    ("train_flux_dreambooth_lora.py", "--rnak", "--rank"),
])
def test_trainer_names_the_nearest_flag(script, flag, meant, capsys):
    rc = exits_2(lambda: run_entry_inprocess(os.path.join(ROOT, script), [
        "--pretrained_model_name_or_path", "m", "--instance_prompt", "p", flag, "1"]))
    line = one_error_line(capsys)
    assert rc == 2 and f"unknown flag {flag}; did you mean {meant}?" in line, line


@pytest.mark.parametrize("which, flag, meant", [("BASE", "--promt", "--prompt"), ("LORA", "--lora_wieghts", "--lora_weights"),
                                                ("BASE", "--zzzzzz", None)])
def test_inference_scripts_name_the_nearest_flag(which, flag, meant, capsys):
    from fluxkit.inference import args as infer_args
    from fluxkit.shared.errors import cli
    from fluxkit.inference.run import main

    assert exits_2(lambda: cli(main)(getattr(infer_args, which), [flag, "x"])) == 2
    line = one_error_line(capsys)
    assert (f"unknown flag {flag}; did you mean {meant}?" if meant else "--help lists the flags") in line, line


def test_plan_and_cache_commands_share_it(capsys):
    from fluxkit.cache import main as cache_main
    from fluxkit.plan import main as plan_main

    assert exits_2(lambda: plan_main(["--pretrained_model_name_or_path", "m", "--resolutoin", "64"])) == 2
    assert "did you mean --resolution?" in one_error_line(capsys)
    assert exits_2(lambda: cache_main(["--list", "--latent_cache_dri", "x"])) == 2
    assert "did you mean --latent_cache_dir?" in one_error_line(capsys)


@pytest.mark.parametrize("key, meant", [("aspect_ratio_bucket", "aspect_ratio_buckets"), ("batchsize", "batch_size"),
                                        ("dryrun", "dry_run")])
def test_launcher_key_names_the_nearest_key_or_trainer_flag(key, meant, capsys):
    from fluxkit.launch import main

    assert main(["--launcher", "lora", "launcher.sh", f"--{key}=1"]) == 2
    assert f"unknown option --{key} (did you mean --{meant}?)" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_an_output_folder_that_cannot_be_made_is_one_line(kind, dry_run, tmp_path, capsys):
    """An --output_dir under a file (or on a read-only place) through either launcher: one line, exit 2,
    nothing written; a dry run judges it too, without writing."""
    from fluxkit.launch import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["--launcher", kind, "launcher.sh", f"--output_dir={blocker / 'out'}"] + (["--dry_run"] if dry_run else [])
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "output_dir" in line and "cannot be created or written" in line and "a_file" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
