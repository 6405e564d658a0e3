"""The data path inside real training runs on the tiny FLUX: the persistent cache (reuse, exact
invalidation, a fill killed midway, the fill command), streaming with workers, aspect-ratio
buckets (one process, and 2-process DeepSpeed killed and resumed), caption dropout, bad input."""

import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import (ROOT, accelerate_launch, count_rows, run_entry_inprocess as train_inprocess, run_inprocess, run_script,
                      with_faults)
from test_reliability import (LORA, SIGKILLED, assert_killed_at_step_3_resumes_bit_identical, steps_and_losses,
                              train_args)


def losses(out):
    return [loss for _, loss in steps_and_losses(out)]


def captioned_folder(path, sizes, seed=0):
    """Textured images of the given sizes, each with a caption file (two distinct captions)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path / f"img{i}.png")
        (path / f"img{i}.txt").write_text(f"a photo of sks dog, style {i % 2}", encoding="utf-8")
    return path


def args_for(tiny_flux, folder, out, steps=4, **extra):
    args = train_args(tiny_flux, {"instance_dir": str(folder)}, out, steps, **extra)
    return args


@pytest.fixture
def encoder_use(monkeypatch):
    """Rows the VAE encoder and T5 encode, and how often each text encoder is loaded, during a run."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    counts = Counter()

    def counting_loads(cls, key):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, **kwargs):
            counts[key] += 1
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))

    count_rows(monkeypatch, counts, AutoencoderKL, "encode", "images")
    count_rows(monkeypatch, counts, T5EncoderModel, "forward", "prompts")
    counting_loads(T5EncoderModel, "t5 loads")
    counting_loads(CLIPTextModel, "clip loads")
    return counts


# ----------------------------------------------------------------------------- the persistent cache

def test_second_run_encodes_nothing_and_each_change_reencodes_exactly_it(tiny_flux, tmp_path, encoder_use, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="fluxkit.training.train")
    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 4)
    common = dict(random_flip=True, max_sequence_length=16, latent_cache_dir=str(tmp_path / "cache"))

    def run(name, **extra):
        encoder_use.clear()
        assert train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / name, **{**common, **extra})) == 0
        return dict(encoder_use)

    assert run("cold") == {"images": 4, "prompts": 2, "t5 loads": 1, "clip loads": 1}
    assert run("warm") == {}  # nothing encoded, neither text encoder loaded
    assert "covers this run" in caplog.text
    assert losses(tmp_path / "warm") == losses(tmp_path / "cold")
    assert run("uncached", no_cache=True)["images"] == 4 and losses(tmp_path / "uncached") == losses(tmp_path / "cold")

    Image.fromarray(np.zeros((36, 40, 3), dtype=np.uint8)).save(folder / "img2.png")  # one image changes
    assert run("one_image") == {"images": 1, "t5 loads": 1, "clip loads": 1}
    assert run("longer_t5", max_sequence_length=24) == {"prompts": 2, "t5 loads": 1, "clip loads": 1}
    assert run("center_crop", center_crop=True)["images"] == 4  # a 40x36 image: every crop box moves
    assert run("center_crop_again", center_crop=True) == {}


KILL_FILL = """
import os, runpy, signal, sys
import fluxkit.cache.store as cache
cache.SHARD_MAX_SECONDS = 0.0  # commit every entry as its own shard
original = cache.ShardStore.add
added = []
def add(self, key, tensors):
    original(self, key, tensors)
    if self.fields == cache.LATENT_FIELDS:
        added.append(key)
        if len(added) == int(os.environ["KILL_AFTER_LATENTS"]):
            os.kill(os.getpid(), signal.SIGKILL)
cache.ShardStore.add = add
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.cli
def test_fill_killed_midway_resumes_with_what_was_committed(tiny_flux, tmp_path, encoder_use):
    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 5)
    cache_dir = tmp_path / "cache"
    wrapper = tmp_path / "kill_fill.py"
    wrapper.write_text(KILL_FILL)
    args = args_for(tiny_flux, folder, tmp_path / "killed", steps=2, latent_cache_dir=str(cache_dir))
    proc = run_script([sys.executable, str(wrapper), LORA] + args, env={"KILL_AFTER_LATENTS": "3"})
    assert proc.returncode == SIGKILLED, proc.stderr[-3000:]
    shards = list((cache_dir / "v1" / "latents").rglob("shard-*.safetensors"))
    assert len(shards) == 3 and not list(cache_dir.rglob("*.partial"))

    encoder_use.clear()
    assert train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / "rerun", steps=2, latent_cache_dir=str(cache_dir))) == 0
    assert encoder_use["images"] == 2 and encoder_use["prompts"] == 0  # the 3 committed latents and the text are reused
    assert train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / "clean", steps=2, no_cache=True)) == 0
    assert losses(tmp_path / "rerun") == losses(tmp_path / "clean")


@pytest.mark.cli
def test_fill_command_ahead_of_training(tiny_flux, tmp_path, encoder_use):
    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 3)
    args = args_for(tiny_flux, folder, tmp_path / "run", steps=2, latent_cache_dir=str(tmp_path / "cache"))
    proc = run_script([sys.executable, "-m", "fluxkit.cache"] + args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["latents_encoded"] == 3 and report["prompts_encoded"] == 2
    assert "caching latents and text" in proc.stderr  # the progress bar
    from fluxkit.shared.quiet import LOG_NOISE

    noise = [piece for pieces in LOG_NOISE.values() for piece in pieces if piece in proc.stderr]
    assert not noise, noise  # the loads are the trainer's, and so is the filter of known library noise
    encoder_use.clear()
    assert train_inprocess(LORA, args) == 0
    assert dict(encoder_use) == {}
    proc = run_script([sys.executable, "-m", "fluxkit.cache"] + args, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["latents_encoded"] == 0


# ----------------------------------------------------------------------------- streaming, buckets, dropout

def test_streaming_with_workers_gives_the_same_losses(tiny_flux, tmp_path):
    import multiprocessing

    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 4)
    for workers in (0, 2):
        before = set(multiprocessing.active_children())
        args = args_for(tiny_flux, folder, tmp_path / f"w{workers}", steps=5, no_cache=True, random_flip=True,
                        dataloader_num_workers=workers, repeats=3)
        assert train_inprocess(LORA, args) == 0
        # the run stopped its workers itself (left to the garbage collector, each stalled a later run 5 s)
        assert set(multiprocessing.active_children()) <= before
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2") and len(losses(tmp_path / "w0")) == 5


MIXED = [(64, 32), (32, 64), (32, 32), (64, 16), (16, 64), (36, 32), (32, 36), (60, 20)]


def test_buckets_and_caption_dropout_in_one_process(tiny_flux, tmp_path, encoder_use, capfd, monkeypatch):
    import fluxkit.training.train

    trained_prompts = []
    micro_step = fluxkit.training.train.micro_step

    def recording(run, batch):
        trained_prompts.extend(batch["prompts"])
        return micro_step(run, batch)

    monkeypatch.setattr(fluxkit.training.train, "micro_step", recording)
    folder = captioned_folder(tmp_path / "data", MIXED)
    args = args_for(tiny_flux, folder, tmp_path / "out", steps=6, aspect_ratio_buckets=True, bucket_step=16,
                    train_batch_size=2, caption_dropout_rate=0.5, validation_prompt="a photo of sks dog",
                    num_validation_images=1, num_validation_steps=1, latent_cache_dir=str(tmp_path / "cache"))
    assert train_inprocess(LORA, args) == 0
    err = capfd.readouterr().err
    assert "buckets: 5 used" in err
    # prompts: two captions, the dropped (empty) caption and the validation prompt, each once
    assert encoder_use["prompts"] == 4 and encoder_use["images"] == 8
    # the cache holds the empty caption whenever the rate is above 0; dropout must also reach batches
    assert len(trained_prompts) == 12 and "" in trained_prompts and set(trained_prompts) - {""}, trained_prompts
    with Image.open(tmp_path / "out" / "validation" / "validation-final.png") as im:
        assert im.size == (32, 32)  # validation renders at --resolution


@pytest.mark.multiproc
def test_buckets_under_deepspeed_two_processes_kill_resume_bit_identical(tiny_flux, tmp_path):
    """Buckets under ZeRO-2 bf16 on 2 processes, over an NF4 base: each rank trains one shape per step, and a run
    killed after step 3 (checkpoint-2 on disk) and resumed from DeepSpeed's own checkpoint (which holds the
    quantized module) equals the uninterrupted run. (test_quant's 2-process NF4 kill/resume, merged into these
    launches; int8 and fp8 are refused under DeepSpeed before anything loads: test_quant's refusal test.)"""
    folder = captioned_folder(tmp_path / "data", MIXED)

    def launch(out, env=None, **extra):
        args = args_for(tiny_flux, folder, out, 4, checkpointing_steps=2, aspect_ratio_buckets=True, bucket_step=16,
                        latent_cache_dir=str(tmp_path / "cache"), base_quantization="nf4", **extra)
        args[args.index("--mixed_precision") + 1] = "bf16"
        return accelerate_launch([LORA] + args, num_processes=2, timeout=600, env=with_faults(env))

    reference, record = tmp_path / "uninterrupted", tmp_path / "batches"
    proc = launch(reference, env={"FLUXKIT_TEST_RECORD_BATCHES": str(record)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "buckets: 5 used" in proc.stderr
    # what each rank trained, as each rank recorded it: at every step both ranks' samples have one shape
    # (a bit-identical resume alone would hold if both runs mixed shapes alike)
    ranks = [[json.loads(line) for line in open(record / f"rank-{r}.jsonl")] for r in (0, 1)]
    assert [b["step"] for b in ranks[0]] == [b["step"] for b in ranks[1]] == [0, 1, 2, 3]
    for mine, theirs in zip(*ranks):
        assert len({tuple(size) for size in mine["sizes"] + theirs["sizes"]}) == 1, (mine, theirs)
    assert len({tuple(b["sizes"][0]) for b in ranks[0]}) > 1  # and the shape changes between steps
    assert_killed_at_step_3_resumes_bit_identical(launch, tmp_path / "crashed", reference)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["cache dir is a file", "impossible buckets", "batch larger than the data"])
def test_bad_data_input_is_one_line_and_writes_nothing(tiny_flux, tmp_path, capsys, case):
    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 3)
    (tmp_path / "a_file").write_text("x")
    extra, needle = {
        "cache dir is a file": (dict(latent_cache_dir=str(tmp_path / "a_file")), "--latent_cache_dir"),
        "impossible buckets": (dict(aspect_ratio_buckets=True, bucket_step=40), "--bucket_step 40"),
        "batch larger than the data": (dict(train_batch_size=4), "--train_batch_size 4"),
    }[case]
    rc = train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / "out", **extra))
    lines = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / ".fluxkit-cache").exists()


# ----------------------------------------------------------------------------- images that pass the scan but do not decode

def damaged_png(path, size=(40, 36), seed=7):
    """A PNG the header scan accepts (signature, IHDR, every chunk's CRC and IEND intact) whose
    compressed pixel data is damaged, so decoding it fails: what bit rot before a CRC was computed,
    or a broken encoder, leaves behind. The CRCs are recomputed over the damaged bytes."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    data, chunks, pos = buf.getvalue(), [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    out = data[:8]
    for kind, body in chunks:
        if kind == b"IDAT":
            body = body[:10] + bytes(20) + body[30:]
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(out)
    return path


def folder_with_damaged_image(tmp_path):
    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 3)
    damaged_png(folder / "img3.png")
    (folder / "img3.txt").write_text("a photo of sks dog, style 1", encoding="utf-8")
    return folder


def test_damaged_png_passes_the_scan_but_not_the_decoder(tmp_path):
    from fluxkit.data.dataset import UnreadableImage, open_image
    from fluxkit.data.scan import inspect_image

    path = damaged_png(tmp_path / "bad.png")
    assert inspect_image(str(path), "bad.png") == ((40, 36), "RGB")
    with pytest.raises(UnreadableImage):
        open_image(str(path), "bad.png")


def _error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


@pytest.mark.parametrize("workers,cache", [(0, False), (2, False), (2, True)])
def test_undecodable_image_is_one_error_line_with_or_without_workers(tiny_flux, tmp_path, capfd, workers, cache):
    folder = folder_with_damaged_image(tmp_path)
    extra = dict(latent_cache_dir=str(tmp_path / "cache")) if cache else dict(no_cache=True)
    rc = train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / "out", steps=4, dataloader_num_workers=workers, **extra))
    err = capfd.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert "img3.png" in lines[0] and "--skip_bad_images" in lines[0] and "remove or repair" in lines[0]
    assert "Traceback" not in err and "DataLoader worker" not in err
    if cache:  # recorded: the next run says so before any model loads
        rc = train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / "again", steps=4, **extra))
        lines = _error_lines(capfd.readouterr().err)
        assert rc == 2 and len(lines) == 1 and "img3.png" in lines[0] and "earlier run" in lines[0]
        assert not (tmp_path / "again").exists()  # stopped before loading a model: nothing written (not even the folder)


def test_skip_bad_images_replaces_undecodable_samples_the_same_way_everywhere(tiny_flux, tmp_path, encoder_use, caplog):
    """--skip_bad_images: the damaged image's samples are replaced by other samples from (seed, epoch,
    index): the same losses with and without workers and the cache, a warm cache loads no encoder,
    the file is named once per run, and a run resumed mid-epoch equals the uninterrupted one."""
    import logging

    caplog.set_level(logging.INFO)
    folder = folder_with_damaged_image(tmp_path)
    common = dict(skip_bad_images=True, random_flip=True, max_sequence_length=16, latent_cache_dir=str(tmp_path / "cache"))

    def run(name, steps=8, **extra):
        encoder_use.clear()
        caplog.clear()
        assert train_inprocess(LORA, args_for(tiny_flux, folder, tmp_path / name, steps=steps, **{**common, **extra})) == 0
        named = [r for r in caplog.records if "skipped undecodable image" in r.getMessage()]
        assert len(named) == 1 and "img3.png" in named[0].getMessage(), [r.getMessage() for r in named]
        return dict(encoder_use)

    assert run("cold")["images"] == 3  # the three good images; two epochs, so each sample is drawn twice
    reference = losses(tmp_path / "cold")
    assert len(reference) == 8
    run("uncached_workers", no_cache=True, dataloader_num_workers=2)
    assert losses(tmp_path / "uncached_workers") == reference
    assert run("warm") == {} and losses(tmp_path / "warm") == reference
    run("resumed", steps=5, checkpointing_steps=5)
    run("resumed", steps=8, resume_from_checkpoint="latest")
    assert losses(tmp_path / "resumed") == reference



def test_skip_bad_images_replacement_comes_from_the_same_bucket(tmp_path):
    """With buckets and batch 2, a damaged image's sample is replaced by a sample of its own bucket
    (another shape could not be stacked with its batch partner), in every epoch."""
    import torch

    from fluxkit.data.buckets import BucketSampler
    from fluxkit.data.dataset import DreamBoothDataset, collate
    from fluxkit.data.scan import scan_dataset
    from test_data import make_args

    folder = captioned_folder(tmp_path / "data", [(64, 16), (64, 16), (16, 64), (16, 64), (32, 32), (32, 32), (32, 32)])
    damaged_png(folder / "img7.png", size=(64, 16))  # a third wide image, and it does not decode
    args = make_args(folder, aspect_ratio_buckets=True, train_batch_size=2, skip_bad_images=True)
    scan = scan_dataset(args, quiet=True)
    ds = DreamBoothDataset(args, seed=0, scan=scan)
    bad = next(i for i, s in enumerate(scan.samples) if s.name.endswith("img7.png"))
    for epoch in range(12):
        shown, _, skipped = ds.readable_sample(bad, epoch)
        assert skipped and ds.target_size(shown) == ds.target_size(bad) == (64, 16), (epoch, shown)
    sampler = BucketSampler(scan.sample_bucket, len(ds), 2, 1, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for batch in loader:  # stacking a wide and a tall image would raise here
            assert len({ds.target_size(int(i)) for i in batch["index"]}) == 1


# ----------------------------------------------------------------------------- listing and pruning the cache

def test_cache_list_prune_and_size_limit_beside_a_run_using_it(tiny_flux, tmp_path, encoder_use, capsys):
    import torch

    from fluxkit import cache as fcache
    from fluxkit.data.dataset import DreamBoothDataset
    from fluxkit.training.train_args import parse

    a = captioned_folder(tmp_path / "a", [(40, 36)] * 3)
    b = captioned_folder(tmp_path / "b", [(40, 36)] * 2, seed=1)  # the same two captions, and ...
    (b / "img0.png").write_bytes((a / "img0.png").read_bytes())  # ... A's first image: a latent both use
    cache_dir = tmp_path / "cache"

    def flags(folder, name):
        return args_for(tiny_flux, folder, tmp_path / name, steps=2, max_sequence_length=16, latent_cache_dir=str(cache_dir))

    def train(folder, name):
        encoder_use.clear()
        assert train_inprocess(LORA, flags(folder, name)) == 0
        return dict(encoder_use)

    def command(*argv):
        capsys.readouterr()
        assert fcache.main(list(argv)) == 0
        return capsys.readouterr().out

    train(a, "a")
    train(b, "b")
    listing = command("--list", "--latent_cache_dir", str(cache_dir))
    named = {line.split()[0]: line for line in listing.splitlines()[1:]}
    # namespaces are named in words (the model folder, the encoders, the precision), not by their hash alone
    assert f"VAE latents of {tiny_flux} (float32)" in named["4"], listing
    assert f"text_encoder + text_encoder_2 embeddings of {tiny_flux} (float32) [text/" in named["2"], listing
    # with no flag: the default folder of runs started here (OUTPUT/../.fluxkit-cache), as a user types it
    (tmp_path / ".fluxkit-cache").symlink_to(cache_dir)
    typed = run_inprocess([sys.executable, "-m", "fluxkit.cache", "--list"], cwd=str(tmp_path))
    assert typed.returncode == 0 and typed.stderr == "", typed.stderr  # no library noise
    assert typed.stdout.splitlines()[1:] == listing.splitlines()[1:]

    # a run of A is using the cache (its shards indexed and mapped, as a trainer holds them) ...
    args = parse(flags(a, "live"), lora=True)
    dataset = DreamBoothDataset(args, seed=0)
    live = fcache.build(args, dataset, tiny_flux, torch.float32)
    held = live.latent_moments([0, 1, 2], None, encode=None)
    # ... while the cache is pruned to what B uses: two of A's latents go (A's shard is rewritten
    # with the one B shares), the shared captions stay
    report = json.loads(command("--prune", *flags(b, "b")).strip().splitlines()[-1])
    assert report["removed_entries"] == 2 and report["rewritten_shards"] == 1
    again = live.latent_moments([0, 1, 2], None, encode=None)  # the live run reads on, unchanged
    assert all(torch.equal(x, y) for x, y in zip(held, again))
    assert train(a, "a2")["images"] == 2 and "prompts" not in encoder_use  # removed: encoded again, nothing else
    assert losses(tmp_path / "a2") == losses(tmp_path / "a")

    # size limit: the least recently used shard goes (B's latents: A's were used since)
    total = sum(r["bytes"] for r in fcache.usage(str(cache_dir / fcache.FORMAT)))
    report = json.loads(command("--max_size_gb", str((total - 1) / 2**30), "--latent_cache_dir", str(cache_dir)))
    assert report["removed_shards"] == 1
    assert train(a, "a3") == {}  # A's entries were kept
    latents = [r for r in fcache.usage(str(cache_dir / fcache.FORMAT)) if r["namespace"].startswith("latents/")]
    assert [r["entries"] for r in latents] == [3]

    # prompts of another --max_sequence_length go to the same text folder (the length is in each entry's key),
    # so its name, written by the first run, claims no length (it said "16 tokens" of 8-token entries too)
    before = os.listdir(cache_dir / fcache.FORMAT / "text")
    assert fcache.main(args_for(tiny_flux, a, tmp_path / "fill", steps=2, max_sequence_length=8,
                                latent_cache_dir=str(cache_dir))) == 0
    assert os.listdir(cache_dir / fcache.FORMAT / "text") == before
    text = next(line for line in command("--list", "--latent_cache_dir", str(cache_dir)).splitlines() if "embeddings of" in line)
    assert "tokens" not in text and text.split()[0] == "4", text


# ----------------------------------------------------------------------------- machines that share no cache folder

@pytest.mark.multiproc
def test_processes_without_a_shared_cache_folder_fill_their_own_and_say_so(tiny_flux, tmp_path):
    """Two real processes (accelerate, gloo), each with a cache folder of its own as on two machines
    without a shared filesystem: no hang at the fill's barriers, each machine fills what the other's
    folder holds, one notice line per machine, and the run trains."""
    from conftest import free_port

    folder = captioned_folder(tmp_path / "data", [(40, 36)] * 4)
    cache_dir = tmp_path / "cache"
    wrapper = os.path.join(ROOT, "tests", "scripts", "cache_per_machine.py")
    args = args_for(tiny_flux, folder, tmp_path / "out", steps=2, max_sequence_length=16, latent_cache_dir=str(cache_dir))
    # plain DDP over gloo (--multi_gpu starts 2 CPU processes; no DeepSpeed needed for the cache's barriers)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--main_process_port", str(free_port())]
    proc = run_script(launch + [wrapper, LORA] + args, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notices = [line for line in proc.stderr.splitlines() if "is not shared with every process" in line]
    assert len(notices) == 2 and {"machine-0" in n for n in notices} == {True, False}, notices
    for machine in ("machine-0", "machine-1"):  # each folder ends up with every latent and prompt
        shards = list((cache_dir / machine / "v1").rglob("shard-*.safetensors"))
        from safetensors import safe_open

        keys = set()
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                keys |= {k.rsplit(".", 1)[0] for k in f.keys()}
        assert len(keys) == 4 + 2, (machine, len(keys))  # 4 latents, 2 captions
