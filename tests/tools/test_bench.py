"""FLOP accounting (fluxkit.shared.flops) against torch's own counter, and the bench harness's
result schema and table printer. No timing is asserted anywhere."""

import json
import os
import sys

import pytest
import torch

from conftest import ROOT, assert_user_error, run_inprocess, run_script


def _transformer(preset, device=None, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel
    from fluxkit.tiny.build import PRESETS

    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return FluxTransformer2DModel(**PRESETS[preset].transformer).to(dtype)
    return FluxTransformer2DModel(**PRESETS[preset].transformer)


def _rel(a, b):
    return abs(a - b) / b


# ---------------------------------------------------------------- fluxkit.shared.flops

@pytest.mark.tiny
@pytest.mark.parametrize("image_tokens, text_tokens, batch", [(64, 16, 1), (256, 77, 2), (100, 512, 3)])
def test_forward_flops_match_torch_counter_on_tiny_model(image_tokens, text_tokens, batch):
    from fluxkit.shared.flops import flux_forward_flops, torch_counted_flops

    model = _transformer("tiny")
    measured = torch_counted_flops(model, image_tokens, text_tokens, batch)
    ours = flux_forward_flops(model.config, image_tokens, text_tokens, batch)
    assert measured > 0
    assert _rel(ours, measured) < 0.05, (ours, measured)


@pytest.mark.tiny
def test_forward_flops_match_torch_counter_on_flux_dev_architecture():
    """FLUX.1-dev's exact layer sizes, counted on the meta device (no memory, no compute)."""
    from fluxkit.shared.flops import flux_forward_flops, torch_counted_flops

    model = _transformer("dev", device="meta", dtype=torch.bfloat16)
    measured = torch_counted_flops(model, 256, 77, 1)
    ours = flux_forward_flops(model.config, 256, 77)
    assert _rel(ours, measured) < 0.05, (ours, measured)
    # FLUX.1-dev at 1024x1024 with a 512-token prompt is the often-quoted ~74 TFLOPs per step.
    assert 70e12 < flux_forward_flops(model.config, 4096, 512) < 78e12


@pytest.mark.tiny
def test_full_training_step_is_forward_plus_backward():
    from fluxkit.shared.flops import torch_counted_flops, training_step_flops

    model = _transformer("tiny")
    measured = torch_counted_flops(model, 64, 16, 2, backward=True)
    assert _rel(training_step_flops(model.config, 64, 16, 2), measured) < 0.05


@pytest.mark.tiny
def test_lora_training_step_skips_base_weight_gradients():
    from peft import LoraConfig

    from fluxkit.shared.flops import torch_counted_flops, training_step_flops

    model = _transformer("small")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    measured = torch_counted_flops(model, 64, 16, 1, backward=True)
    lora = training_step_flops(model.config, 64, 16, 1, frozen_base=True)
    assert _rel(lora, measured) < 0.05, (lora, measured)
    # and counting it as a full step would overstate the work by far more than 5%
    assert training_step_flops(model.config, 64, 16, 1) > 1.3 * measured


def test_image_tokens_and_mfu():
    from fluxkit.shared.flops import image_tokens, mfu

    assert image_tokens(1024, 1024) == 4096 and image_tokens(256, 256) == 256 and image_tokens(512, 256) == 512
    assert image_tokens(32, 32, vae_scale_factor=2) == 64
    assert mfu(50e12, 1.0, 100e12) == 0.5
    assert mfu(50e12, 1.0, 100e12, devices=2) == 0.25
    assert mfu(1.0, 1.0, None) is None


def test_peak_table_knows_datasheet_gpus_only_in_half_precision():
    from fluxkit.shared.flops import table_peak_flops

    assert table_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert table_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert table_peak_flops("NVIDIA H200", torch.float16) == 989e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) is None
    assert table_peak_flops("Some Future Chip", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_cached_and_shared_by_local_processes(tmp_path, monkeypatch):
    from fluxkit.shared.device import detect
    from fluxkit.shared.flops import peak_flops

    monkeypatch.setenv("FLUXKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLUXKIT_PEAK_TFLOPS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    first = peak_flops(detect("cpu"), torch.bfloat16)
    assert first > 1e8  # any CPU of this century does over 0.1 GFLOP/s
    cache = tmp_path / "peak_flops.json"
    entries = json.loads(cache.read_text())
    (key,) = [k for k in entries if "bfloat16" in k]
    assert entries[key]["flops"] == first
    entries[key] = {"flops": 123.0, "quiet": True}  # no measurement gives this: the next calls read the cache
    cache.write_text(json.dumps(entries))
    assert peak_flops(detect("cpu"), torch.bfloat16) == 123.0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one run share the CPU
    assert peak_flops(detect("cpu"), torch.bfloat16) == 61.5


def test_peak_env_override_and_bad_value(monkeypatch):
    from fluxkit.shared.device import detect
    from fluxkit.shared.errors import UserError
    from fluxkit.shared.flops import peak_flops

    monkeypatch.setenv("FLUXKIT_PEAK_TFLOPS", "313")
    assert peak_flops(detect("cpu"), torch.bfloat16) == 313e12
    monkeypatch.setenv("FLUXKIT_PEAK_TFLOPS", "fast")
    with pytest.raises(UserError, match="FLUXKIT_PEAK_TFLOPS"):
        peak_flops(detect("cpu"), torch.bfloat16)


# ---------------------------------------------------------------- bench harness

def test_repeat_summary_and_noise_rule():
    from bench.harness import compare, summarize

    s = summarize([3.0, 1.0, 2.0, None])
    assert (s["median"], s["min"], s["max"], s["spread"], s["n"]) == (2.0, 1.0, 3.0, 2.0, 3)
    assert summarize([None, float("nan")]) is None
    fast, slow = summarize([10.0, 11.0, 12.0]), summarize([5.0, 5.5, 6.0])
    assert compare(slow, fast)["verdict"] == "higher" and compare(fast, slow)["verdict"] == "lower"
    assert compare(slow, fast)["ratio"] == pytest.approx(11.0 / 5.5)
    overlapping = summarize([11.5, 13.0])  # its range touches fast's: the difference is within the spread
    assert compare(fast, overlapping)["verdict"] == "noise"
    assert compare(summarize([1.0]), fast)["verdict"] == "unjudged"
    assert compare(None, fast)["verdict"] == "missing"


def test_markdown_table_printer():
    from bench.harness import fmt_cell, markdown_table, summarize, suite_table

    assert fmt_cell(summarize([1.0, 1.2, 1.1])) == "1.10 ±0.10"
    assert fmt_cell(summarize([2.5])) == "2.50 (n=1)"
    assert fmt_cell(None) == "n/a" and fmt_cell(12) == "12" and fmt_cell(7.71e9) == "7.71e+09"
    table = markdown_table(["case", "value"], [["a|b", 0.12345], ["c", None]])
    assert table.splitlines() == ["| case | value |", "| --- | --- |", "| a\\|b | 0.123 |", "| c | n/a |"]

    suite = {"status": "ok", "rows": [
        {"table": "speed", "case": "1p", "params": {"processes": 1}, "metrics": {"images/s": summarize([1.0, 1.2])}},
        {"table": "speed", "case": "2p", "params": {"processes": 2}, "metrics": {"images/s": summarize([1.9, 2.1])}},
        {"table": "memory", "case": "1p", "metrics": {"GB": 0.5}}],
        "comparisons": [{"name": "2p / 1p", "metric": "images/s", "ratio": 1.818, "verdict": "higher"}],
        "notes": ["a note"]}
    text = suite_table("train-lora", suite)
    assert text.startswith("### train-lora")
    assert "| case | processes | images/s |" in text and "| 2p | 2 | 2.00 ±0.10 |" in text
    assert "| case | GB |" in text and "| 1p | 0.500 |" in text  # a second table for other metrics
    assert "| 2p / 1p | images/s | 1.82 | higher |" in text and text.endswith("- a note")
    skipped = suite_table("gpu", {"status": "skipped", "reason": "no accelerator"})
    assert "skipped: no accelerator" in skipped


def test_schema_validation_rejects_broken_results():
    from bench.harness import SCHEMA, validate

    good = {"schema": SCHEMA, "created": "2026-01-01T00:00:00Z", "command": "python -m bench", "flags": {},
            "git": {"commit": "abc", "dirty": False},
            "machine": {"device": "cpu", "device_name": "cpu", "device_count": 1, "cpu": "x", "cpu_cores": 2, "memory_gb": 1.0},
            "versions": {"torch": "2.13.0"},
            "suites": {"s": {"status": "ok", "seconds": 1.0, "rows": [
                {"case": "c", "metrics": {"m": {"median": 1, "min": 1, "max": 2, "spread": 1, "n": 2, "values": [1, 2]}}}]}}}
    validate(good)
    for breakage, needle in [
        (lambda r: r.update(schema="other"), "schema"),
        (lambda r: r["git"].pop("commit"), "git"),
        (lambda r: r["suites"]["s"].update(status="skipped"), "needs a reason"),
        (lambda r: r["suites"]["s"]["rows"][0]["metrics"]["m"].update(median=5), "outside"),
        (lambda r: r["suites"]["s"]["rows"][0]["metrics"].update(m={"median": 1}), "not a repeat summary"),
    ]:
        broken = json.loads(json.dumps(good))
        breakage(broken)
        with pytest.raises(ValueError, match=needle):
            validate(broken)


def test_families_run_beside_flux1_at_the_same_settings():
    """--families: each other family's tasks at one process and 2-process ZeRO-2 with the cache, beside
    FLUX.1's same cases (all of FLUX.1's cases only when flux1 is named); Kontext trains pairs."""
    from bench.suites.train import FAMILY_CASES, _cases

    def labels(mode, families):
        return [(c.family, c.task, c.processes, c.cache, c.quantization) for c in _cases(mode, families)]

    assert labels("lora", ["flux1"]) == labels("lora", ("flux1",)) and len(labels("lora", ["flux1"])) == 7
    both = [(1, True), (2, True)]
    assert FAMILY_CASES == both
    assert labels("lora", ["kontext", "flux2-klein"]) == [("flux1", "t2i", p, c, "none") for p, c in both] + [
        (f, t, p, c, "none") for f, t in (("kontext", "edit"), ("flux2-klein", "t2i"), ("flux2-klein", "edit")) for p, c in both]
    assert labels("full", ["flux1", "flux2-klein"])[4:] == [(f, t, p, c, "none") for f, t in (("flux2-klein", "t2i"),
                                                                                        ("flux2-klein", "edit")) for p, c in both]


@pytest.mark.parametrize("family, model, preset, edit, card_gib, base", [
    ("flux2", "black-forest-labs/FLUX.2-dev", "dev", False, 80, "none"),  # 68 GiB planned: bf16 fits an 80 GB card
    ("kontext", "black-forest-labs/FLUX.1-Kontext-dev", "dev", True, 24, "nf4"),  # bf16 30 GiB does not fit: NF4
    ("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", "4b", False, 24, "none"),
])
def test_gpu_family_case_takes_the_base_the_plan_fits(family, model, preset, edit, card_gib, base):
    """The gpu suite's family cases run at the family's sensible setting: a bf16 base where the plan says
    the run fits the device, else NF4; an editing family's plan counts the reference's tokens."""
    from bench.suites.gpu_families import setting
    from fluxkit import families

    request, plan = setting(families.get(family), model, preset, 1024, edit, "cuda", card_gib * 2**30)
    assert request.config.base_quantization == base and plan.fits
    assert request.config.rank == 16 and request.config.gradient_checkpointing and request.config.max_sequence_length == 512
    assert plan.shape.references == (1 if edit else 0)


def test_trainer_and_inference_summaries_are_read_as_documented(tmp_path):
    from bench.harness import CommandFailed
    from bench.suites.infer import measured
    from bench.suites.train import read_summary

    line = json.dumps({"images_per_sec": 2.0, "sec_per_step": 1.0})
    assert read_summary(f"noise\n{line}\n", str(tmp_path))["sec_per_step"] == 1.0
    (tmp_path / "train_summary.json").write_text(json.dumps({"images_per_sec": 3.0}))
    assert read_summary("no summary line", str(tmp_path))["images_per_sec"] == 3.0
    with pytest.raises(CommandFailed, match="no summary"):
        read_summary("", str(tmp_path / "missing"))
    # 2 processes x 3 images; each process's first image (2 s) is warm-up
    m = measured({"num_processes": 2, "batch_size": 1, "images_written": 6, "seconds": 10.0,
                  "first_batch_seconds": 2.0, "num_inference_steps": 8})
    assert m == {"s/image": 2.0, "it/s": 4.0}
    assert measured({"num_processes": 2, "batch_size": 1, "images_written": 2, "seconds": 3.0,
                     "first_batch_seconds": 3.0, "num_inference_steps": 8}) is None


@pytest.mark.cli
def test_a_commands_cpu_time_counts_the_processes_it_started(tmp_path):
    """startup and vs-upstream report each run's CPU time beside its wall time: the CPU of the
    processes `accelerate launch` starts (grandchildren of the bench) is counted."""
    from bench import harness

    burn = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'sum(i * i for i in range(3_000_000))'])"
    before = harness.children_cpu_seconds()
    harness.run_command([sys.executable, "-c", burn], str(tmp_path / "log"))
    child_only = harness.children_cpu_seconds() - before
    assert child_only > 0.1  # the grandchild's loop, not only two interpreter starts


def test_step_time_is_read_from_either_scripts_step_bar_only():
    """vs-upstream reads s/step the same way for our trainers and diffusers' scripts: from the elapsed
    times of the step bar (ours "steps:", upstream "Steps:"), never from another bar in the log."""
    from bench.suites.upstream import bar_seconds_per_step

    def bar(desc, n, total, elapsed):
        return f"\r{desc}: {100 * n // total:3d}%|##  | {n}/{total} [{elapsed}<00:09,  3.18s/it, loss=1.4905]"

    log = "".join([bar("caching latents and text", 5, 5, "00:01"), bar("Loading weights", 36, 36, "00:00"),
                   bar("steps", 1, 12, "00:03"), bar("steps", 2, 12, "00:06"), bar("steps", 2, 12, "00:06"),
                   bar("steps", 12, 12, "01:11"), bar("validation", 1, 1, "00:02")])
    assert bar_seconds_per_step(log) == (71 - 6) / 10
    assert bar_seconds_per_step(log.replace("steps:", "Steps:")) == (71 - 6) / 10
    assert bar_seconds_per_step(bar("Steps", 2, 100, "1:00:02") + bar("Steps", 100, 100, "1:01:40")) == 1.0
    assert bar_seconds_per_step(bar("steps", 1, 12, "00:03")) is None  # the run did not finish


@pytest.mark.parametrize("args, needle", [
    (["nosuch"], "unknown suite 'nosuch'"),
    (["flops", "--train_steps", "2", "--warmup_steps", "2"], "--train_steps 2"),
    (["flops", "--model_path", "/nonexistent/model"], "--model_path"),
    (["train-lora", "--families", "flux1", "sd3"], "--families 'sd3'"),
])
def test_bench_cli_bad_input_is_one_line(args, needle, tmp_path):
    proc = run_inprocess([sys.executable, "-m", "bench", *args, "--results_dir", str(tmp_path)])
    assert_user_error(proc, needle)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.cli
def test_bench_run_writes_a_valid_result_and_prints_the_table_last(tmp_path):
    """The gpu suite's own code path on CPU with the tiny preset: a real run, end to end."""
    from bench.harness import validate

    proc = run_script([sys.executable, "-m", "bench", "gpu", "--gpu_preset", "tiny", "--gpu_compile", "off",
                       "--device", "cpu", "--results_dir", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-gpu.json")
    result = json.loads(path.read_text())
    validate(result)
    # the commit it ran on (others may commit meanwhile: it is HEAD or an ancestor of it)
    assert run_script(["git", "merge-base", "--is-ancestor", result["git"]["commit"], "HEAD"]).returncode == 0
    assert result["versions"]["torch"] == torch.__version__
    assert result["flags"]["gpu_preset"] == "tiny" and result["machine"]["device"] == "cpu"
    suite = result["suites"]["gpu"]
    assert suite["status"] == "ok"
    lora = next(r for r in suite["rows"] if r["case"].startswith("LoRA"))
    assert lora["metrics"]["s/step"]["n"] == 8 and lora["metrics"]["s/step"]["median"] > 0
    ladder = [r for r in suite["rows"] if r["table"].startswith("memory ladder")]
    assert ladder[0]["case"].startswith("encode phase") and ladder[0]["metrics"]["planned GB"] > 0
    ladder = ladder[1:]
    # the tiny preset has 2 blocks: kohya's 16, 22 and 28 all clip to 1 swapped (one run, one row naming them),
    # and one block visits at a time
    assert [r["case"].split(",")[0] for r in ladder] == ["bf16 LoRA r16", "HF QLoRA recipe (NF4 r4",
                                                         "QLoRA + --blocks_to_swap 16 / 22 / 28"]
    assert [r["metrics"]["blocks resident"] for r in ladder] == [2, 2, 2]
    assert all(r["metrics"]["s/step"]["n"] == 4 for r in ladder)
    # each other family's LoRA step on its own tiny preset (the same invocation): the trainer's code, the
    # transformer run over the tokens the family makes (Kontext: a reference as many again), the plan beside it
    families = [r for r in suite["rows"] if r["table"] == "family LoRA training step"]
    assert [r["case"].split(",")[:2] for r in families] == [["Kontext edit", " kontext tiny"], ["FLUX.2 [klein] 4B t2i", " flux2-klein tiny"],
                                                            ["FLUX.2 [dev] t2i", " flux2 tiny"]]
    assert [r["params"]["image tokens"] for r in families] == [128, 64, 64]
    assert all(r["case"].endswith("bf16 base") and r["params"]["text tokens"] == 512 for r in families)
    assert all(r["metrics"]["s/step"]["n"] == 4 and r["metrics"]["MFU % (measured peak)"]["median"] > 0
               and r["metrics"]["planned GB"] > 0 for r in families)
    assert "SimpleTuner bf16: about 12 GB" in families[1]["params"]["published"]
    image = next(r for r in suite["rows"] if r["case"].endswith("eager"))
    assert image["metrics"]["s/image"]["n"] == 3
    out = proc.stdout.strip().splitlines()
    assert out[-1].startswith("full results:") and str(path.name) in out[-1]
    assert any(line.startswith("| LoRA r16") for line in out)


def test_vs_upstream_counts_the_prompt_length_each_trainer_runs_at():
    """vs-upstream passes no --max_sequence_length, so its FLOPs per step (and the fp32-peak row) must
    use the trainers' own defaults: 77 T5 tokens for the full fine-tune, 512 for LoRA."""
    from bench.suites.upstream import T5_TOKENS
    from fluxkit.training.train_args import build_parser

    assert {mode: build_parser(lora=mode == "lora").get_default("max_sequence_length") for mode in T5_TOKENS} == T5_TOKENS
