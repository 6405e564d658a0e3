"""The persistent latent/text cache on the tiny FLUX: reuse, exact invalidation, corrupt shards,
agreement with uncached encoding."""

import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from fluxkit import cache as fcache
from fluxkit import families
from fluxkit.data.dataset import DreamBoothDataset
from test_data import make_args


NO_VALIDATION = SimpleNamespace(validation_prompt=None)  # the one trainer setting training_prompts reads here


@pytest.fixture(scope="module")
def encoders(tiny_flux):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    kw = dict(local_files_only=True)
    return SimpleNamespace(
        vae=AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae", **kw),
        tokenizer=AutoTokenizer.from_pretrained(tiny_flux, subfolder="tokenizer", **kw),
        tokenizer_2=AutoTokenizer.from_pretrained(tiny_flux, subfolder="tokenizer_2", **kw),
        text_encoder=CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder", **kw),
        text_encoder_2=T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2", **kw),
        model_dir=tiny_flux, family=families.get("flux1"))


def _folder(tmp_path, n=3):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        Image.effect_noise((40, 32), 30 + 10 * i).convert("RGB").save(folder / f"i{i}.png")
        (folder / f"i{i}.txt").write_text(f"caption number {i}")
    return folder


def _cache(root, enc, dataset, msl=16):
    hashes = fcache.ImageHashes(os.path.join(root, fcache.FORMAT))
    keys = fcache.latent_keys(dataset, fcache.image_hashes(dataset, hashes))
    hashes.save()
    return fcache.Cache(str(root), fcache.vae_identity(enc.model_dir, torch.float32),
                        fcache.text_identity(enc.model_dir, torch.float32), msl, keys)


def _encoders(enc, msl=16):
    from fluxkit.training.encode import encode_prompts, latent_moments

    return (lambda pixels: latent_moments(enc.vae, pixels)), (lambda prompts: encode_prompts(prompts, enc, SimpleNamespace(max_sequence_length=msl), "cpu"))


def _fill(c, dataset, enc):
    image, text = _encoders(enc, c.max_sequence_length)
    return fcache.fill(c, dataset, fcache.training_prompts(dataset, NO_VALIDATION), image, text, show=False)


def test_second_fill_encodes_nothing_and_changes_reencode_exactly_those(tmp_path, encoders):
    folder = _folder(tmp_path)
    root = tmp_path / "cache"
    args = make_args(folder, repeats=2, center_crop=True)
    ds = DreamBoothDataset(args, seed=0)
    c = _cache(root, encoders, ds)
    stats = _fill(c, ds, encoders)
    assert stats["latents"] == 3 and stats["text"] == 3  # center crop: the two repeats share an entry
    assert not c.missing_latents() and not c.missing_prompts(fcache.training_prompts(ds, NO_VALIDATION))
    assert _fill(_cache(root, encoders, ds), ds, encoders)["latents"] == 0

    # cached values equal fresh encodings (one image at a time) exactly
    again = _cache(root, encoders, ds)
    image, text = _encoders(encoders)
    mean, logvar = again.latent_moments([0, 4], None, image)
    with torch.no_grad():
        fresh = image(ds[4]["pixel_values"][None])
        fresh_text = text(["caption number 1"])
    assert torch.equal(mean[1], fresh[0][0]) and torch.equal(logvar[1], fresh[1][0])
    seq, pooled = again.text_embeddings(["caption number 1"], text)
    assert torch.equal(seq[0], fresh_text[0][0]) and torch.equal(pooled[0], fresh_text[1][0])
    assert again.encoded == {"latents": 0, "text": 0}
    # disabled (--no_cache): the same numbers, encoded every time
    off = fcache.Cache(None)
    assert torch.equal(off.latent_moments([4], ds[4]["pixel_values"][None], image)[0], mean[1:])
    assert torch.equal(off.text_embeddings(["caption number 1"], text)[0], seq) and off.encoded == {"latents": 1, "text": 1}

    # one changed image, random crops, a longer T5 sequence: exactly what changed is encoded
    Image.effect_noise((40, 32), 99).convert("RGB").save(folder / "i1.png")
    stats = _fill(_cache(root, encoders, ds), ds, encoders)
    assert (stats["latents"], stats["text"]) == (1, 0)
    ds_random = DreamBoothDataset(make_args(folder, repeats=2), seed=0)
    assert _fill(_cache(root, encoders, ds_random), ds_random, encoders)["latents"] == 6 - sum(
        ds_random.placement(i) == ds.placement(i) for i in range(6))
    stats = _fill(_cache(root, encoders, ds, msl=24), ds, encoders)
    assert stats["latents"] == 0 and stats["text"] == 3



def _rgba_folder(tmp_path, n=2):
    """Textured images with a transparent half: the background and the resize filter both show."""
    import numpy as np

    folder = tmp_path / "rgba"
    folder.mkdir()
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, size=(36, 40, 4), dtype=np.uint8)
        pixels[:, :20, 3] = 0
        Image.fromarray(pixels, "RGBA").save(folder / f"a{i}.png")
    return folder


def _cached_equals_fresh(c, dataset, enc):
    """Every sample's cached latent equals that sample's encoding now (--no_cache's numbers)."""
    image, _ = _encoders(enc)
    indices = list(range(len(dataset)))
    mean, logvar = c.latent_moments(indices, None, image)
    with torch.no_grad():
        for j, i in enumerate(indices):
            fresh = image(dataset[i]["pixel_values"][None])
            assert torch.equal(mean[j], fresh[0][0]) and torch.equal(logvar[j], fresh[1][0]), f"sample {i}"


def test_resize_filter_and_alpha_background_are_part_of_the_latent_key(tmp_path, encoders):
    """--image_interpolation_mode and --alpha_background change the pixels: another value re-encodes
    every latent, and what the cache then returns is the new setting's encoding."""
    folder = _rgba_folder(tmp_path)
    root = tmp_path / "cache"
    first = DreamBoothDataset(make_args(folder), seed=0)
    assert _fill(_cache(root, encoders, first), first, encoders)["latents"] == 2
    for change in (dict(image_interpolation_mode="nearest"), dict(alpha_background="black")):
        ds = DreamBoothDataset(make_args(folder, **change), seed=0)
        assert not torch.equal(ds[0]["pixel_values"], first[0]["pixel_values"]), change
        assert _fill(_cache(root, encoders, ds), ds, encoders)["latents"] == 2, change
        _cached_equals_fresh(_cache(root, encoders, ds), ds, encoders)


def test_flipped_and_unflipped_crops_of_one_image_have_their_own_latents(tmp_path, encoders):
    """--center_crop --random_flip --repeats 2: the repeats of an image share the crop box but not
    always the flip; each distinct placement is its own entry, and each sample gets its own."""
    folder = _folder(tmp_path, 2)
    ds = DreamBoothDataset(make_args(folder, repeats=2, center_crop=True, random_flip=True), seed=0)
    placements = {(i % 2, ds.placement(i)) for i in range(len(ds))}
    assert any(p.flip for _, p in placements) and not all(p.flip for _, p in placements)  # the seed gives both
    c = _cache(tmp_path / "cache", encoders, ds)
    assert len(set(c.latent_keys.values())) == len(placements)
    assert _fill(c, ds, encoders)["latents"] == len(placements)
    _cached_equals_fresh(_cache(tmp_path / "cache", encoders, ds), ds, encoders)


def test_image_rewritten_in_place_at_the_same_size_is_reencoded(tmp_path, encoders):
    """A BMP has the same byte size whatever its pixels: a new mtime alone must send the image to be
    hashed again (the remembered hash is keyed by size and mtime), so its latent is re-encoded."""
    folder = tmp_path / "bmp"
    folder.mkdir()
    path = folder / "b0.bmp"
    Image.effect_noise((40, 32), 30).convert("RGB").save(path)
    ds = DreamBoothDataset(make_args(folder), seed=0)
    root = tmp_path / "cache"
    assert _fill(_cache(root, encoders, ds), ds, encoders)["latents"] == 1
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.effect_noise((40, 32), 90).convert("RGB").save(path)
    os.utime(path, ns=(mtime + 5_000_000_000, mtime + 5_000_000_000))
    assert path.stat().st_size == size
    assert _fill(_cache(root, encoders, ds), ds, encoders)["latents"] == 1
    _cached_equals_fresh(_cache(root, encoders, ds), ds, encoders)


def test_corrupt_or_truncated_shard_is_discarded_and_rebuilt(tmp_path, encoders, caplog):
    folder = _folder(tmp_path, 2)
    root = tmp_path / "cache"
    ds = DreamBoothDataset(make_args(folder), seed=0)
    _fill(_cache(root, encoders, ds), ds, encoders)
    shards = sorted((root / fcache.FORMAT / "latents").rglob("shard-*"))
    assert len(shards) == 1
    data = bytearray(shards[0].read_bytes())
    data[-5] ^= 0xFF  # a flipped bit inside the tensor data
    shards[0].write_bytes(bytes(data))
    c = _cache(root, encoders, ds)
    assert len(c.missing_latents()) == 2 and not shards[0].exists() and "corrupt" in caplog.text
    assert _fill(c, ds, encoders)["latents"] == 2

    shard = sorted((root / fcache.FORMAT / "text").rglob("shard-*"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    c = _cache(root, encoders, ds)
    assert len(c.missing_prompts(fcache.training_prompts(ds, NO_VALIDATION))) == 2
    assert _fill(c, ds, encoders)["text"] == 2


def test_another_model_never_reads_this_cache(tmp_path, encoders, tiny_flux):
    import shutil

    from fluxkit.tiny.build import build_pipeline

    other = build_pipeline(str(tmp_path / "other"), "tiny", seed=1)
    assert fcache.vae_identity(tiny_flux, torch.float32) != fcache.vae_identity(other, torch.float32)
    assert fcache.text_identity(tiny_flux, torch.float32) != fcache.text_identity(other, torch.float32)
    assert fcache.vae_identity(tiny_flux, torch.float32) != fcache.vae_identity(tiny_flux, torch.bfloat16)
    assert fcache.text_identity(tiny_flux, torch.float32) != fcache.text_identity(tiny_flux, torch.bfloat16)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_flux, copy)  # the same model elsewhere is the same model
    assert fcache.vae_identity(str(copy), torch.float32) == fcache.vae_identity(tiny_flux, torch.float32)


def test_fill_shares_partition_the_work_however_late_a_process_looks(tmp_path):
    """Two processes (threads here, with a real barrier and one shared cache folder) fill the cache;
    the second one looks at the folder only once the first has reached a barrier, i.e. as late as
    anything lets it (a first process that wrote its share before any barrier would have written it by
    then: no sleep decides it). Every prompt must still be encoded exactly once across both: shares
    come from one common view."""
    import threading

    import torch

    from fluxkit.cache import Cache, fill

    prompts = [f"prompt {i}" for i in range(6)]
    barrier = threading.Barrier(2, timeout=20)
    first_at_barrier = threading.Event()
    encoded = {0: [], 1: []}
    results = {}

    def first_waits():
        first_at_barrier.set()
        barrier.wait()

    def process(rank):
        if rank == 1:
            assert first_at_barrier.wait(timeout=60), "the first process never reached a barrier"
        cache = Cache(str(tmp_path / "cache"), vae_id="v", text_id="t", max_sequence_length=8)

        def encode_text(batch):
            encoded[rank].extend(batch)
            return torch.ones(len(batch), 3, 4), torch.ones(len(batch), 5)

        results[rank] = fill(cache, None, prompts, encode_image=None, encode_text=encode_text, rank=rank, world=2,
                             barrier=first_waits if rank == 0 else barrier.wait, show=False)

    _as_two_processes(process)
    assert sorted(results) == [0, 1], "a process failed (a barrier one process skipped, or an error)"
    assert sorted(encoded[0] + encoded[1]) == sorted(prompts), encoded  # each once, none twice, none missed
    assert len(encoded[0]) == len(encoded[1]) == 3, encoded  # each its half: no local catch-up pass


def test_unshared_cache_folders_fill_locally_without_a_hang(tmp_path, caplog):
    """Processes whose cache folders differ (machines without a shared filesystem): one already holds
    everything, the other nothing. The second encodes what it cannot see, says so, and neither waits
    for the other at a barrier it never reaches."""
    import threading

    import torch

    from fluxkit.cache import Cache, fill

    prompts = [f"prompt {i}" for i in range(6)]

    def encode_text(batch):
        return torch.ones(len(batch), 3, 4), torch.ones(len(batch), 5)

    full = Cache(str(tmp_path / "machine0"), vae_id="v", text_id="t", max_sequence_length=8)
    fill(full, None, prompts, encode_image=None, encode_text=encode_text, show=False)
    barrier = threading.Barrier(2, timeout=20)
    results = {}

    def process(rank):
        cache = Cache(str(tmp_path / f"machine{rank}"), vae_id="v", text_id="t", max_sequence_length=8)
        results[rank] = fill(cache, None, prompts, encode_image=None, encode_text=encode_text, rank=rank, world=2,
                             barrier=barrier.wait, show=False)

    _as_two_processes(process)
    assert sorted(results) == [0, 1], "a process failed: waiting at a barrier the other never reached"
    assert results[0]["text"] == 0 and results[1]["text"] == 6
    assert any("is not shared with every process" in r.getMessage() for r in caplog.records)


def _as_two_processes(process):
    """process(0) and process(1) side by side, as two threads (a barrier between them is real)."""
    import threading

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


def test_size_command_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fcache.main(["--list"]) == 2  # no cache in the default folder of runs started here
    assert fcache.main(["--list", "--latent_cache_dir", str(tmp_path / "none")]) == 2
    assert fcache.main(["--max_size_gb", "-1", "--latent_cache_dir", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 3, lines
    assert "--latent_cache_dir" in lines[0] and "holds no fluxkit cache" in lines[1] and "--max_size_gb -1" in lines[2]
    assert not (tmp_path / "none").exists()
