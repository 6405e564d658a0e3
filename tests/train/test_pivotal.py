"""Pivotal tuning (issue 24): new tokens trained beside the LoRA, as diffusers' advanced FLUX script does.

Runs are in-process on the tiny FLUX (fp32, one process) so the tests can look inside: the
encoders' base embedding tables, the new rows, the LoRA. One short 2-process DeepSpeed ZeRO-2 run.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ACCELERATE_CONFIG, ROOT, accelerate_launch, assert_user_error, run_script, trainer_args

LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
INFER_LORA = os.path.join(ROOT, "infer_flux_text2img_lora_bf16.py")


def ti_args(model, data, out, steps=8, **extra):
    """4 images, micro batch 1: 4 steps per epoch; TI on with a learning rate that moves the rows."""
    extra = {"instance_prompt": "a photo of TOK dog", "mixed_precision": "no", "train_text_encoder_ti": True,
             "text_encoder_lr": 5e-2, "learning_rate": 1e-3, **extra}
    return trainer_args(model, data, out, steps, **{k: v for k, v in extra.items() if v is not False})


def train(argv):
    """The whole run in this process; returns the Run, for a look inside."""
    from fluxkit.training import train as trainer
    from fluxkit.training.train_args import parse

    run = trainer.setup(parse(argv, lora=True))
    run.initial_rows = {n: getattr(run.pivot.rows, n).detach().clone() for n in run.pivot.rows.names} if run.pivot else {}
    run.initial_lora = {n: p.detach().clone() for n, p in run.models.transformer.named_parameters() if "lora_" in n}
    trainer.resume(run)
    trainer.loop(run)
    trainer.finish(run)
    return run


def emb_file(out):
    from safetensors import safe_open

    path = os.path.join(out, f"{os.path.basename(out)}_emb.safetensors")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_only_new_rows_changed(run, tiny_flux, encoders):
    """The encoders' base tables equal the model folder's, bit for bit; every old id reads them;
    the new rows moved."""
    from transformers import CLIPTextModel, T5EncoderModel

    fresh = {"clip_l": CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder"),
             "t5": T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2")}
    live = {"clip_l": run.models.text_encoder, "t5": run.models.text_encoder_2}
    for name in encoders:
        spliced = live[name].get_input_embeddings()
        base = fresh[name].get_input_embeddings().weight
        assert torch.equal(spliced.base.weight, base), name
        old_ids = torch.arange(spliced.first).unsqueeze(0)
        with torch.no_grad():
            assert torch.equal(spliced(old_ids)[0], base[: spliced.first]), name
        assert not torch.equal(getattr(run.pivot.rows, name), run.initial_rows[name]), f"{name} rows did not train"
        assert not any(p.requires_grad for p in live[name].parameters()), name


def render(pipe, prompt):
    return pipe(prompt, height=32, width=32, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def plain_pipeline_with(tiny_flux, out, t5):
    """A plain FluxPipeline with the emb file loaded the way the model card says."""
    from diffusers import FluxPipeline

    tensors, meta = emb_file(out)
    tokens = [t for toks in json.loads(meta["fluxkit_tokens"]).values() for t in toks]
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    pipe.load_textual_inversion(tensors["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    if t5:
        pipe.load_textual_inversion(tensors["t5"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    return pipe


@pytest.mark.parametrize("t5", [False, True], ids=["clip", "clip+t5"])
def test_only_new_rows_train_and_the_emb_file_loads_into_a_plain_pipeline(tiny_flux, sample_data, tmp_path, t5):
    from diffusers import FluxPipeline

    out = str(tmp_path / "ti")
    # no weight decay on the rows: had they no gradients, they would then stay as initialised
    run = train(ti_args(tiny_flux, sample_data, out, enable_t5_ti=t5, adam_weight_decay_text_encoder=0))
    encoders = ["clip_l", "t5"] if t5 else ["clip_l"]
    assert_only_new_rows_changed(run, tiny_flux, encoders)

    tensors, meta = emb_file(out)
    assert sorted(tensors) == sorted(encoders) and json.loads(meta["fluxkit_tokens"]) == {"TOK": ["<s0>", "<s1>"]}
    for name in encoders:  # the file holds the trained rows
        assert torch.equal(tensors[name], getattr(run.pivot.rows, name).detach())
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    card = open(os.path.join(out, "README.md")).read()
    assert "`TOK` -> `<s0><s1>`" in card and "load_textual_inversion(emb['clip_l']" in card
    assert ("emb['t5']" in card) == t5

    # a plain pipeline: the tokens change the image; a prompt without them renders as before
    loaded, base = plain_pipeline_with(tiny_flux, out, t5), FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    assert not np.allclose(render(loaded, "a photo of <s0><s1> dog"), render(base, "a photo of <s0><s1> dog"))
    assert np.array_equal(render(loaded, "a photo of a dog"), render(base, "a photo of a dog"))
    # and it encodes the token prompt as the trained encoders did
    with torch.no_grad():
        seq, pooled = run.pivot._encode_live("a photo of <s0><s1> dog", run.models, "cpu",
                                              None if t5 else torch.zeros(1))
        seq_l, pooled_l, _ = loaded.encode_prompt("a photo of <s0><s1> dog", prompt_2=None, max_sequence_length=512)
    assert torch.allclose(pooled, pooled_l, atol=1e-6)
    if t5:
        assert torch.allclose(seq, seq_l, atol=1e-6)


def test_transformer_frac_0_is_textual_inversion_only(tiny_flux, sample_data, tmp_path):
    out = str(tmp_path / "ti_only")
    run = train(ti_args(tiny_flux, sample_data, out, steps=4, train_transformer_frac=0, train_text_encoder_ti_frac=1,
                        checkpointing_steps=4))
    lora = {n: p for n, p in run.models.transformer.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, run.initial_lora[n]) for n, p in lora.items())
    assert not any(p.requires_grad for p in lora.values())
    assert_only_new_rows_changed(run, tiny_flux, ["clip_l"])
    # the advanced script's layout: the embeddings are the result, no LoRA file; the card says so
    assert sorted(os.listdir(out)) == sorted(["README.md", "checkpoint-4", "ti_only_emb.safetensors", "run_config.json",
                                              "train_log.jsonl", "train_summary.json"])
    assert "load_lora_weights" not in open(os.path.join(out, "README.md")).read()
    # the LoRA inference script takes such a folder: the embeddings alone
    assert infer(["--model_path", tiny_flux, "--lora_weights", out, "--prompt", "TOK", "--seeds", "1", "--height", "32",
                  "--width", "32", "--num_inference_steps", "1", "--dtype", "fp32", "--output_dir", f"{out}-img"]) == 0
    (record,) = [json.loads(l) for l in open(f"{out}-img/manifest.jsonl")]
    assert record["lora"] is None and record["embeddings"].endswith("ti_only_emb.safetensors")
    assert record["prompt"] == "<s0><s1>"
    # resuming its checkpoint without pivotal tuning would continue another run: refused in one line
    from fluxkit.shared.errors import UserError

    with pytest.raises(UserError, match="pivotal TOK x2 in CLIP -> off"):
        train(trainer_args(tiny_flux, sample_data, out, steps=6, resume_from_checkpoint="latest", learning_rate=1e-3))


def copy_run_until(src, dst, step):
    """dst holds src's checkpoint-STEP only: as if the run had been stopped right after it."""
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, f"checkpoint-{step}"), os.path.join(dst, f"checkpoint-{step}"))


def results(out):
    from safetensors.torch import load_file

    files = {"emb": load_file(os.path.join(out, f"{os.path.basename(out)}_emb.safetensors"))}
    if os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors")):
        files["lora"] = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    losses = [json.loads(l)["loss"] for l in open(os.path.join(out, "train_log.jsonl"))]
    return files, losses


@pytest.mark.parametrize("fractions", [dict(train_text_encoder_ti_frac=0.5), dict(train_transformer_frac=0.5,
                                                                                    train_text_encoder_ti_frac=1)],
                         ids=["ti-stops", "transformer-stops"])
def test_resume_is_bit_identical_inside_each_fraction(tiny_flux, sample_data, tmp_path, fractions):
    """8 steps = 2 epochs; the first epoch trains both parts, the second one only. A run stopped in
    either (after step 2, after step 6) and resumed ends bit-identical to the uninterrupted run."""
    whole = str(tmp_path / "whole")
    train(ti_args(tiny_flux, sample_data, whole, steps=8, checkpointing_steps=2, **fractions))
    for step in (2, 6):
        part = str(tmp_path / f"from{step}")
        copy_run_until(whole, part, step)
        train(ti_args(tiny_flux, sample_data, part, steps=8, checkpointing_steps=2, resume_from_checkpoint="latest",
                      **fractions))
        files_w, losses_w = results(whole)
        files_p, losses_p = results(part)
        assert losses_p == losses_w[step:], step
        for kind in files_w:
            for key in files_w[kind]:
                assert torch.equal(files_w[kind][key], files_p[kind][key]), (step, kind, key)
    # the gate did its job: the part that stops is the same at step 4 and step 8 (its checkpoints)
    from safetensors.torch import load_file

    at4, at8 = (os.path.join(whole, f"checkpoint-{s}") for s in (4, 8))
    if "train_transformer_frac" in fractions:
        before, after = (load_file(os.path.join(p, "pytorch_lora_weights.safetensors")) for p in (at4, at8))
    else:
        before, after = (load_file(os.path.join(p, "token_embeddings.safetensors")) for p in (at4, at8))
    assert all(torch.equal(before[k], after[k]) for k in before)


def mixed_captions(sample_data, folder):
    """The 4 instance images, two captioned with TOK and two without (cached as usual)."""
    os.makedirs(folder)
    names = sorted(n for n in os.listdir(sample_data["instance_dir"]) if n.endswith(".png"))
    for i, name in enumerate(names):
        shutil.copy(os.path.join(sample_data["instance_dir"], name), folder)
        caption = "a photo of TOK dog" if i % 2 == 0 else "a red circle on a gray background"
        with open(os.path.join(folder, name[:-4] + ".txt"), "w") as f:
            f.write(caption)
    return folder


def test_cached_run_equals_uncached_and_the_cache_never_holds_new_token_embeddings(tiny_flux, sample_data, tmp_path):
    from fluxkit.cache import text_key
    from fluxkit.training.encode import encode_prompts
    from fluxkit.training.models import load_models

    data = mixed_captions(sample_data, str(tmp_path / "mixed"))
    common = dict(instance_data_dir=data, steps=8, validation_prompt="TOK on a beach", validation_epochs=1,
                  num_validation_images=1, num_validation_steps=2)
    cached = train(ti_args(tiny_flux, sample_data, str(tmp_path / "cached"), latent_cache_dir=tmp_path / "cache", **common))
    train(ti_args(tiny_flux, sample_data, str(tmp_path / "uncached"), no_cache=True, **common))
    (files_c, losses_c), (files_u, losses_u) = results(str(tmp_path / "cached")), results(str(tmp_path / "uncached"))
    assert losses_c == losses_u
    for out in ("cached", "uncached"):  # validation rendered the prompt with the new tokens each epoch
        assert sorted(os.listdir(tmp_path / out / "validation")) == ["validation-epoch-1.png", "validation-final.png"]
    for kind in files_c:
        assert all(torch.equal(files_c[kind][k], files_u[kind][k]) for k in files_c[kind]), kind

    # what the cache holds for a prompt with new tokens is the base encoders' encoding of its text
    base = load_models(cached.args, tiny_flux, ("transformer",))
    cache = cached.cache
    cache.refresh()
    for prompt in ("a photo of <s0><s1> dog", "<s0><s1> on a beach"):
        with torch.no_grad():
            seq, pooled = encode_prompts([prompt], base, cached.args, "cpu")
        held = cache.text.get(text_key(prompt, cache.max_sequence_length))
        assert torch.equal(held[0], seq[0]) and torch.equal(held[1], pooled[0]), prompt


def test_cache_fill_command_fills_what_a_pivotal_run_reads(tiny_flux, sample_data, tmp_path, capsys):
    """python -m fluxkit.cache with the run's flags fills the prompts as the run rewrites them; the
    run then encodes nothing through the cache (only prompts with new tokens, live)."""
    from fluxkit.cache.command import main as cache_command

    data = mixed_captions(sample_data, str(tmp_path / "mixed"))
    argv = ti_args(tiny_flux, sample_data, str(tmp_path / "run"), steps=2, instance_data_dir=data,
                   latent_cache_dir=tmp_path / "cache", validation_prompt="TOK on a beach")
    assert cache_command(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompts"] == 3 and report["prompts_encoded"] == 3  # <s0><s1> captions, plain ones, validation
    run = train(argv)
    assert run.cache.encoded == {"latents": 0, "text": 0}


@pytest.mark.multiproc
def test_deepspeed_zero2_two_processes(tiny_flux, sample_data, tmp_path):
    """The rows are parameters of the transformer's engine: they train, stop at their fraction (an lr
    of 0 on DeepSpeed's fp32 masters) and reach every checkpoint. 4 images on 2 processes: 2 steps
    per epoch, so the rows train at steps 1-2 and hold from step 3 on."""
    from safetensors.torch import load_file

    out = tmp_path / "ds"
    args = ti_args(tiny_flux, sample_data, out, steps=4, checkpointing_steps=1, enable_t5_ti=True, mixed_precision="bf16")
    proc = accelerate_launch([LORA] + args, num_processes=2, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world_size"] == 2
    rows = {s: load_file(str(out / f"checkpoint-{s}" / "token_embeddings.safetensors")) for s in (1, 2, 3, 4)}
    for name in ("clip_l", "t5"):
        assert not torch.equal(rows[1][name], rows[2][name]), name  # trained in epoch 0
        assert torch.equal(rows[2][name], rows[3][name]) and torch.equal(rows[3][name], rows[4][name]), name
    final, _ = emb_file(str(out))
    assert all(torch.equal(final[n].float(), rows[4][n]) for n in ("clip_l", "t5"))
    lora = [load_file(str(out / f"checkpoint-{s}" / "pytorch_lora_weights.safetensors")) for s in (2, 4)]
    assert any(not torch.equal(lora[0][k], lora[1][k]) for k in lora[0])  # the transformer kept training
    # each rank wrote its share of DeepSpeed's optimizer state (fp32 masters of the rows included)
    states = sorted(p.name for p in (out / "checkpoint-4" / "pytorch_model").iterdir())
    assert [s for s in states if "optim_states" in s] == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]


def infer(argv):
    from accelerate.state import AcceleratorState

    from fluxkit.inference import args as infer_args, run as inference
    from fluxkit.shared.errors import cli

    try:
        return cli(inference.main)(infer_args.LORA, [str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def only_png(folder):
    from PIL import Image

    (name,) = [n for n in os.listdir(folder) if n.endswith(".png")]
    with Image.open(os.path.join(folder, name)) as im:
        return np.asarray(im.convert("RGB"))


def test_lora_inference_loads_the_embeddings_beside_the_lora(tiny_flux, sample_data, tmp_path):
    """The README's prompt with TOK renders as the model card's plain-diffusers recipe with <s0><s1>;
    --embeddings PATH does the same from elsewhere; without the embeddings the image differs."""
    from diffusers import FluxPipeline

    out = str(tmp_path / "trained")
    train(ti_args(tiny_flux, sample_data, out, steps=4, enable_t5_ti=True, train_text_encoder_ti_frac=1,
                  checkpointing_steps=4))
    fast = ["--model_path", tiny_flux, "--seeds", "3", "--height", "32", "--width", "32", "--num_inference_steps", "2",
            "--dtype", "fp32"]
    assert infer(fast + ["--lora_weights", out, "--prompt", "a photo of TOK dog", "--output_dir", tmp_path / "a"]) == 0
    moved = str(tmp_path / "elsewhere.safetensors")
    lora_only = tmp_path / "lora_only"
    lora_only.mkdir()
    shutil.copy(os.path.join(out, "pytorch_lora_weights.safetensors"), lora_only)
    shutil.copy(os.path.join(out, "trained_emb.safetensors"), moved)
    assert infer(fast + ["--lora_weights", lora_only, "--embeddings", moved, "--prompt", "a photo of <s0><s1> dog",
                         "--output_dir", tmp_path / "b"]) == 0
    assert infer(fast + ["--lora_weights", lora_only, "--prompt", "a photo of TOK dog", "--output_dir", tmp_path / "c"]) == 0
    # a checkpoint folder as --lora_weights brings its rows too (the last checkpoint is the final state, in fp32)
    assert infer(fast + ["--lora_weights", os.path.join(out, "checkpoint-4"), "--prompt", "a photo of TOK dog",
                         "--output_dir", tmp_path / "d"]) == 0
    a, b, c, d = (only_png(tmp_path / x) for x in "abcd")
    assert np.array_equal(a, b) and not np.array_equal(a, c) and np.array_equal(a, d)

    pipe = plain_pipeline_with(tiny_flux, out, t5=True)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    reference = pipe("a photo of <s0><s1> dog", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                     generator=[torch.Generator("cpu").manual_seed(3)], max_sequence_length=512).images[0]
    assert np.array_equal(a, np.asarray(reference.convert("RGB")))


@pytest.mark.parametrize("flags, needle", [
    (["--train_text_encoder_ti", "--train_text_encoder_ti_frac", "1.5"], "--train_text_encoder_ti_frac 1.5"),
    (["--train_transformer_frac", "0"], "needs --train_text_encoder_ti"),
    (["--train_text_encoder_ti", "--num_new_tokens_per_abstraction", "0"], "--num_new_tokens_per_abstraction 0"),
    (["--train_text_encoder_ti", "--token_abstraction", " , "], "--token_abstraction"),
    (["--train_text_encoder_ti", "--offload_encoders"], "--offload_encoders"),
])
def test_flag_rules_are_one_line_each(tiny_flux, sample_data, tmp_path, flags, needle):
    from fluxkit.shared.errors import UserError
    from fluxkit.training.train_args import parse

    with pytest.raises(UserError, match=needle.replace("-", r"\-").replace(".", r"\.")):
        parse(trainer_args(tiny_flux, sample_data, tmp_path / "out") + flags, lora=True)
    assert not (tmp_path / "out").exists()


def test_tokens_and_prompts_as_the_advanced_script_names_them(tiny_flux, sample_data):
    from transformers import AutoTokenizer

    from fluxkit.training.pivotal import Tokens, make_tokens
    from fluxkit.training.train_args import parse

    tok = AutoTokenizer.from_pretrained(tiny_flux, subfolder="tokenizer")
    tok2 = AutoTokenizer.from_pretrained(tiny_flux, subfolder="tokenizer_2")
    args = parse(trainer_args(tiny_flux, sample_data, "o") + ["--train_text_encoder_ti", "--token_abstraction",
                                                                   "TOK, SKS", "--num_new_tokens_per_abstraction", "3"], lora=True)
    tokens = make_tokens(args, tok, tok2)
    assert tokens.by_abstraction == {"TOK": ["<s0>", "<s1>", "<s2>"], "SKS": ["<s3>", "<s4>", "<s5>"]}
    assert tokens.rewrite("TOK and SKS") == "<s0><s1><s2> and <s3><s4><s5>"
    args = dataclasses.replace(args, initializer_concept="a red circle", enable_t5_ti=True)  # as many tokens as the concept takes
    expected = max(len(tok.encode("a red circle", add_special_tokens=False)),
                   len(tok2.encode("a red circle", add_special_tokens=False)))
    assert len(make_tokens(args, tok, tok2).by_abstraction["TOK"]) == expected
    assert Tokens({"TOK": ["<s0>"]}).holds_new("x <s0> y") and not Tokens({"TOK": ["<s0>"]}).holds_new("x TOK")
    from fluxkit.training.pivotal import initial_rows

    table = torch.randn(len(tok), 8)
    ids = tok.encode("a red circle", add_special_tokens=False)
    rows = initial_rows(args, tok, table, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(rows[k], table[ids[k % len(ids)]]) for k in range(4))


def test_quantized_base_and_buckets(tiny_flux, sample_data, tmp_path):
    """An NF4 base with aspect-ratio buckets: the rows train over the quantized transformer."""
    pytest.importorskip("bitsandbytes")
    out = str(tmp_path / "nf4")
    run = train(ti_args(tiny_flux, sample_data, out, steps=4, base_quantization="nf4", aspect_ratio_buckets=True,
                        enable_t5_ti=True, train_text_encoder_ti_frac=1))
    assert_only_new_rows_changed(run, tiny_flux, ["clip_l", "t5"])
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert sorted(emb_file(out)[0]) == ["clip_l", "t5"]


def test_memory_plan_counts_the_rows_and_the_encoders_that_stay(tiny_flux, sample_data, tmp_path):
    from fluxkit.plan import plan_memory
    from fluxkit.training.train_args import parse

    base = trainer_args(tiny_flux, sample_data, tmp_path / "o", mixed_precision="bf16")
    plans = {ti: plan_memory(parse(base + list(ti), lora=True)) for ti in ((), ("--train_text_encoder_ti",),
                                                                           ("--train_text_encoder_ti", "--enable_t5_ti"))}
    plain, clip, both = plans.values()
    cfg = plain.arch.transformer
    assert clip.summary["trained_params"] - plain.summary["trained_params"] == 2 * cfg["pooled_projection_dim"]
    assert both.summary["trained_params"] - plain.summary["trained_params"] == 2 * (cfg["pooled_projection_dim"]
                                                                                    + cfg["joint_attention_dim"])
    staying = lambda plan: {i.name: i.bytes for i in plan.phase("train: forward + backward").items if "(new tokens)" in i.name}
    P = plain.arch.params
    assert staying(plain) == {}
    assert staying(clip) == {"CLIP text encoder (new tokens)": P["text_encoder"] * 2}
    assert staying(both) == {"CLIP text encoder (new tokens)": P["text_encoder"] * 2,
                             "T5 text encoder (new tokens)": P["text_encoder_2"] * 2}
    backward = lambda plan: [i for i in plan.phase("train: forward + backward").items if "new rows' gradients" in i.name]  # noqa: E731
    assert not backward(clip) and backward(both)[0].bytes > 0


def test_launcher_keys(tiny_flux, sample_data, tmp_path):
    """Launcher keys are the trainer's flags: the eight pass through, switches as yes/no; the LoRA
    launcher's full launcher has none of them (the full trainer does not take them)."""
    from test_launchers import FULL, LORA as LORA_LAUNCHER, dry, launch_inprocess

    keys = [f"--model_name={tiny_flux}", f"--instance_dir={sample_data['instance_dir']}", "--resolution=32",
            "--batch_size=1", "--num_processes=1", f"--output_dir={tmp_path / 'out'}", "--instance_prompt=a TOK dog"]
    p = dry(LORA_LAUNCHER, *keys, "--train_text_encoder_ti=yes", "--enable_t5_ti=no", "--token_abstraction=TOK,SKS",
            "--num_new_tokens_per_abstraction=3", "--initializer_concept=red circle", "--train_text_encoder_ti_frac=1",
            "--train_text_encoder_frac=1", "--train_transformer_frac=0.5")
    assert "--train_text_encoder_ti" in p.trainer and "--enable_t5_ti" not in p.trainer
    assert (p.flag("token_abstraction"), p.flag("num_new_tokens_per_abstraction"), p.flag("initializer_concept")) == \
        ("TOK,SKS", "3", "red circle")
    assert (p.flag("train_text_encoder_ti_frac"), p.flag("train_transformer_frac")) == ("1", "0.5")
    assert "CLIP text encoder (new tokens)" in p.text  # the dry run's memory plan
    proc = launch_inprocess(FULL, *keys, "--train_text_encoder_ti=yes")
    assert proc.returncode == 2 and "train_text_encoder_ti" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_text_encoder_frac_stops_the_clip_lora(tiny_flux, sample_data, tmp_path):
    """--train_text_encoder_frac gates --train_text_encoder's CLIP LoRA the same way (no new tokens)."""
    from safetensors.torch import load_file

    out = tmp_path / "te"
    train_lora = trainer_args(tiny_flux, sample_data, out, 8, mixed_precision="no", train_text_encoder=True,
                              train_text_encoder_frac=0.5, text_encoder_lr=1e-2, checkpointing_steps=2)
    from fluxkit.training import train as trainer
    from fluxkit.training.train_args import parse

    trainer.train(parse(train_lora, lora=True))
    files = {s: load_file(str(out / f"checkpoint-{s}" / "pytorch_lora_weights.safetensors")) for s in (2, 4, 8)}
    clip = [k for k in files[2] if k.startswith("text_encoder.")]
    moved = lambda a, b, keys: any(not torch.equal(files[a][k], files[b][k]) for k in keys)  # noqa: E731
    assert clip and moved(2, 4, clip) and not moved(4, 8, clip)
    assert moved(4, 8, [k for k in files[2] if k.startswith("transformer.")])
