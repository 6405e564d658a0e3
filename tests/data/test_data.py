"""The data path on its own (no model): decoding per image mode, captions, the scan's one-line
errors, buckets and their sampler, streaming and per-sample randomness."""

import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fluxkit.data.buckets import BucketSampler, assign, make_buckets
from fluxkit.data.dataset import DreamBoothDataset, EpochShuffleSampler, collate, default_num_workers, open_image, to_rgb
from fluxkit.shared.errors import UserError
from fluxkit.data.scan import scan_dataset
from fluxkit.training.train_args import parse


def make_args(folder=None, **extra):
    args = parse(["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(folder or "unused"),
                       "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1"], lora=True)
    defaults = dict(caption_extension=".txt", alpha_background="white", caption_dropout_rate=0.0,
                    aspect_ratio_buckets=False, bucket_step=16, min_bucket_side=None, max_bucket_side=None)
    import dataclasses

    return dataclasses.replace(args, **{**defaults, **extra})


def save(folder, name, image, **kw):
    folder.mkdir(exist_ok=True)
    image.save(folder / name, **kw)
    return folder / name


def decoded(path, background=(255, 255, 255)):
    return np.asarray(to_rgb(open_image(str(path), str(path)), background))


# ----------------------------------------------------------------------------- decoding

def test_sixteen_bit_and_float_grey_are_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    png = save(tmp_path, "grey16.png", Image.fromarray(ramp))
    assert Image.open(png).mode == "I;16"
    assert decoded(png)[0, :, 0].tolist() == [0, 64, 128, 255] and (decoded(png)[..., 0] == decoded(png)[..., 2]).all()

    as_i = save(tmp_path, "grey32.tif", Image.fromarray(ramp.astype(np.int32), mode="I"))
    assert Image.open(as_i).mode == "I" and decoded(as_i)[0, :, 1].tolist() == [0, 64, 128, 255]

    as_f = save(tmp_path, "float.tif", Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), mode="F"))
    assert Image.open(as_f).mode == "F" and decoded(as_f)[0, :, 2].tolist() == [0, 64, 128, 255]


def test_alpha_is_composited_on_the_background(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)    # opaque red
    rgba[0, 1] = (255, 0, 0, 0)      # fully transparent red
    rgba[0, 2] = (0, 0, 255, 128)    # half blue
    png = save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA"))
    white = decoded(png)
    assert white[0, 0].tolist() == [255, 0, 0] and white[0, 1].tolist() == [255, 255, 255]
    assert abs(int(white[0, 2, 0]) - 127) <= 1 and white[0, 2, 2] == 255
    black = decoded(png, (0, 0, 0))
    assert black[0, 1].tolist() == [0, 0, 0] and black[0, 2, 0] == 0 and abs(int(black[0, 2, 2]) - 128) <= 1

    la = save(tmp_path, "la.png", Image.fromarray(np.array([[[200, 255], [200, 0]]], dtype=np.uint8), "LA"))
    assert decoded(la)[0].tolist() == [[200] * 3, [255] * 3]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 255, 0] + [10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    gif = save(tmp_path, "p.png", pal, transparency=1)
    assert Image.open(gif).mode == "P" and decoded(gif)[0].tolist() == [[0, 255, 0], [255, 255, 255]]
    plain = save(tmp_path, "p_opaque.png", pal)
    assert decoded(plain)[0].tolist() == [[0, 255, 0], [10, 20, 30]]


def test_cmyk_grey_bilevel_and_exif_orientation(tmp_path):
    cmyk = save(tmp_path, "cmyk.jpg", Image.new("CMYK", (8, 8), (255, 0, 0, 0)), quality=100)
    px = decoded(cmyk)[4, 4]
    assert px[0] < 10 and px[1] > 245 and px[2] > 245  # cyan
    assert decoded(save(tmp_path, "l.png", Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77] * 3
    assert decoded(save(tmp_path, "one.png", Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255] * 3

    wide = np.zeros((2, 4, 3), dtype=np.uint8)
    wide[:, 0] = (255, 0, 0)  # left column red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = save(tmp_path, "rotated.png", Image.fromarray(wide), exif=exif)
    up = decoded(path)
    assert up.shape == (4, 2, 3) and up[0, :, 0].tolist() == [255, 255] and up[3, :, 0].tolist() == [0, 0]
    scan = scan_dataset(make_args(_only(tmp_path, "rotated.png")), quiet=True)
    assert scan.samples[0].size == (2, 4)  # the scan reports the upright size from the header



# the transpose that undoes each EXIF orientation (what a viewer applies to show the image upright)
_UPRIGHT = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# its inverse: how a camera stores an upright picture under that orientation
_STORED = {**_UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def test_every_exif_orientation_scans_upright_and_fills_its_bucket_without_stretch(tmp_path):
    """One tall upright picture stored eight ways (EXIF orientations 1-8): the scan reports the
    upright size for each, each lands in the tall bucket, and each decodes to the same pixels."""
    from PIL import ImageOps

    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(64, 16, 3), dtype=np.uint8))  # 16 wide
    folder = tmp_path / "orientations"
    folder.mkdir()
    for orientation, stored in _STORED.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        image = upright if stored is None else upright.transpose(stored)
        image.save(folder / f"o{orientation}.png", exif=exif)
        with Image.open(folder / f"o{orientation}.png") as check:  # the file shows the upright picture
            assert np.array_equal(np.asarray(ImageOps.exif_transpose(check)), np.asarray(upright)), orientation
    args = make_args(folder, aspect_ratio_buckets=True, train_batch_size=8)
    scan = scan_dataset(args, quiet=True)
    assert {os.path.basename(s.name): s.size for s in scan.samples} == {f"o{o}.png": (16, 64) for o in range(1, 9)}
    assert {scan.buckets[b] for b in scan.sample_bucket} == {(16, 64)}
    ds = DreamBoothDataset(args, seed=0, scan=scan)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (8, 3, 64, 16)
    for i in range(1, 8):  # the bucket is the image's own size: nothing resized, nothing stretched
        assert torch.equal(batch["pixel_values"][i], batch["pixel_values"][0]), scan.samples[i].name


def _only(tmp_path, name):
    folder = tmp_path / f"only-{name}"
    folder.mkdir()
    os.link(tmp_path / name, folder / name)
    return folder


# ----------------------------------------------------------------------------- captions

def _images(folder, n, size=(32, 32)):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        noise = np.random.default_rng(i).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"img{i}.png")  # textured: every crop and flip differs
    return folder


def test_captions_from_txt_files_with_instance_prompt_fallback(tmp_path):
    folder = _images(tmp_path / "d", 3)
    (folder / "img0.txt").write_text("a red fox\n", encoding="utf-8")
    (folder / "img1.caption").write_text("ignored: other extension", encoding="utf-8")
    scan = scan_dataset(make_args(folder), quiet=True)
    assert [s.caption for s in scan.samples] == ["a red fox", "a photo of sks dog", "a photo of sks dog"]
    scan = scan_dataset(make_args(folder, caption_extension=".caption"), quiet=True)
    assert [s.caption for s in scan.samples][:2] == ["a photo of sks dog", "ignored: other extension"]
    assert "1 from .caption files" in scan.report()



def test_caption_file_with_a_utf8_byte_order_mark(tmp_path):
    """Windows editors save UTF-8 with a BOM: the caption is the text, not U+FEFF plus the text."""
    folder = _images(tmp_path / "bom", 2)
    (folder / "img0.txt").write_bytes("\ufeffa red fox".encode("utf-8"))
    (folder / "img1.txt").write_text("a blue fox", encoding="utf-8-sig")
    scan = scan_dataset(make_args(folder), quiet=True)
    assert [s.caption for s in scan.samples] == ["a red fox", "a blue fox"]
    assert DreamBoothDataset(make_args(folder), scan=scan)[0]["prompt"] == "a red fox"


def test_class_images_beyond_images_times_repeats_are_used(tmp_path):
    """2 instance images and 5 class images: the epoch is 5 samples long, and each class image is a
    partner once (instances cycle), rather than the 2 x 1 samples of the instances alone."""
    from fluxkit.data.scan import add_class_images

    folder = _images(tmp_path / "inst", 2)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    paths = []
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(class_dir / f"class_{i}.png")
        paths.append(str(class_dir / f"class_{i}.png"))
    args = make_args(folder, with_prior_preservation=True, class_prompt="a photo of a dog")
    scan = add_class_images(scan_dataset(args, quiet=True), paths, args)
    ds = DreamBoothDataset(args, scan=scan)
    assert len(ds) == 5
    reds = sorted(round(float(ds[i]["class_pixel_values"][0].mean()), 3) for i in range(len(ds)))
    assert reds == sorted(round(40 * i / 127.5 - 1, 3) for i in range(5))  # every class image, each once
    assert {ds[i]["prompt"] for i in range(5)} == {"a photo of sks dog"}


def test_captions_from_metadata_jsonl_and_csv(tmp_path):
    folder = _images(tmp_path / "j", 3)
    rows = [{"file_name": "img0.png", "text": "zero"}, {"file_name": "img2.png", "text": "two"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (folder / "img1.txt").write_text("one from txt", encoding="utf-8")
    (folder / "img2.txt").write_text("loses to the metadata", encoding="utf-8")
    scan = scan_dataset(make_args(folder), quiet=True)
    assert [s.caption for s in scan.samples] == ["zero", "one from txt", "two"]
    assert "2 from metadata.jsonl" in scan.report()

    folder = _images(tmp_path / "c", 2)
    (folder / "metadata.csv").write_text("file_name,caption,extra\nimg0.png,\"a, comma\",x\nimg1.png,b,y\n", encoding="utf-8")
    assert [s.caption for s in scan_dataset(make_args(folder), quiet=True).samples] == ["a, comma", "b"]
    # --dataset_name pointing at such a folder reads it the same way
    assert [s.caption for s in scan_dataset(make_args(None, dataset_name=str(folder)), quiet=True).samples] == ["a, comma", "b"]


def test_captions_from_parquet_column(sample_data):
    args = make_args(None, dataset_name=sample_data["dataset_name"], caption_column="text")
    scan = scan_dataset(args, quiet=True)
    assert len(scan.samples) == 8 and all(s.caption.endswith("on a gray background") for s in scan.samples)
    ds = DreamBoothDataset(args, scan=scan)
    item = ds[3]
    assert item["prompt"] == scan.samples[3].caption and item["pixel_values"].shape == (3, 32, 32)


def test_kohya_folders_give_each_concept_its_repeats_and_prompt(tmp_path):
    """kohya's N_prompt folders: N repeats, the prompt is the name after the first underscore (the
    rest kept whole, underscores included), a caption file wins over it."""
    (tmp_path / "k").mkdir()
    cats = _images(tmp_path / "k" / "10_sks cat", 2)
    _images(tmp_path / "k" / "3_zwx_toy robot", 1)
    (cats / "img1.txt").write_text("sks cat asleep", encoding="utf-8")
    scan = scan_dataset(make_args(tmp_path / "k"), quiet=True)
    assert scan.num_samples == 2 * 10 + 3
    captions = Counter(s.caption for s in scan.samples)
    assert captions == {"sks cat": 10, "sks cat asleep": 10, "zwx_toy robot": 3}
    ds = DreamBoothDataset(make_args(tmp_path / "k"), scan=scan)
    assert Counter(ds[i]["prompt"] for i in range(len(ds))) == captions
    assert "3 image(s)" in scan.report() and "'10_sks cat' 2 x10" in scan.report()
    from fluxkit.plan.shape import _count_images  # the memory plan's cache rows count the same samples

    assert _count_images(make_args(tmp_path / "k")) == scan.num_samples
    # a plain folder with other subfolders is still a plain folder
    plain = _images(tmp_path / "plain", 2)
    _images(plain / "extra", 1)
    assert scan_dataset(make_args(plain), quiet=True).num_samples == 2


def test_empty_caption_falls_back_to_the_instance_prompt_and_is_counted(tmp_path):
    folder = _images(tmp_path / "d", 3)
    (folder / "img0.txt").write_bytes(b"")
    (folder / "img1.txt").write_text("  \n", encoding="utf-8")
    (folder / "img2.txt").write_text("a red fox", encoding="utf-8")
    scan = scan_dataset(make_args(folder), quiet=True)
    assert [s.caption for s in scan.samples] == ["a photo of sks dog", "a photo of sks dog", "a red fox"]
    assert "2 from --instance_prompt (empty .txt file), 1 from .txt files" in scan.report()


def test_caption_dropout_is_seeded_per_sample_and_epoch(tmp_path):
    folder = _images(tmp_path / "d", 1)
    args = make_args(folder, caption_dropout_rate=0.3, repeats=200)
    ds = DreamBoothDataset(args, seed=5)
    n = len(ds)
    dropped = [[ds.caption(i, e) == "" for i in range(n)] for e in range(2)]
    assert 40 <= sum(dropped[0]) <= 80 and dropped[0] != dropped[1]  # ~30%, another subset next epoch
    assert [ds.caption(i, 1) for i in range(n)] == [DreamBoothDataset(args, seed=5).caption(i, 1) for i in range(n)]
    assert ds[n + 7]["prompt"] == ds.caption(7, 1)  # the sampler's epoch * len + i
    assert all(DreamBoothDataset(make_args(folder, repeats=200), seed=5).caption(i, 0) for i in range(n))


# ----------------------------------------------------------------------------- bad input: one line each

def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_scan_rejects_bad_input_in_one_line(tmp_path):
    folder = _images(tmp_path / "bad", 2)
    data = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(data[: len(data) // 2])  # truncated, header intact
    with pytest.raises(UserError) as e:
        scan_dataset(make_args(folder), quiet=True)
    _one_line(e, "img1.png", "--skip_bad_images")
    scan = scan_dataset(make_args(folder, skip_bad_images=True), quiet=True)
    assert len(scan.samples) == 1 and "img1.png" in scan.skipped[0] and "skipped unreadable image" in scan.report()

    folder = _images(tmp_path / "latin1", 1)
    (folder / "img0.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError) as e:
        scan_dataset(make_args(folder), quiet=True)
    _one_line(e, "img0.txt", "UTF-8")

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        scan_dataset(make_args(tmp_path / "empty"), quiet=True)
    _one_line(e, "holds no images")

    folder = _images(tmp_path / "meta", 1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "label": "x"}) + "\n")
    with pytest.raises(UserError) as e:
        scan_dataset(make_args(folder), quiet=True)
    _one_line(e, "metadata.jsonl", "--caption_column", "label")

    folder = _images(tmp_path / "three", 3)
    with pytest.raises(UserError) as e:
        scan_dataset(make_args(folder, train_batch_size=2), world_size=2, quiet=True)
    _one_line(e, "--train_batch_size 2", "1 sample(s)", "2 process(es)")
    scan_dataset(make_args(folder, train_batch_size=2, repeats=2), world_size=2, quiet=True)  # 6 samples: fits


def test_missing_dataset_column_is_one_line(sample_data):
    with pytest.raises(UserError) as e:
        scan_dataset(make_args(None, dataset_name=sample_data["dataset_name"], caption_column="caption"), quiet=True)
    _one_line(e, "'caption'", "text")


# ----------------------------------------------------------------------------- buckets

def test_bucket_shapes():
    for res, step in ((512, 64), (1024, 64), (256, 32), (32, 16)):
        buckets = make_buckets(res, step)
        assert (res, res) in buckets and len(set(buckets)) == len(buckets)
        for w, h in buckets:
            assert w % 16 == 0 and h % 16 == 0 and w * h <= res * res
            assert w * h >= 0.75 * res * res or res < 64, (w, h)
    b = make_buckets(512, 64)
    assert b[assign([(3000, 200)], b)[0]] == (1024, 256) and b[assign([(300, 400)], b)[0]] == (448, 576)
    assert b[assign([(640, 640)], b)[0]] == (512, 512)
    for kw, flag in ((dict(step=40), "--bucket_step"), (dict(min_side=600), "--min_bucket_side"),
                     (dict(max_side=100), "--max_bucket_side"), (dict(min_side=72), "--min_bucket_side")):
        with pytest.raises(UserError, match=flag):
            make_buckets(512, **{"step": 64, **kw})


def test_bucket_sampler_one_bucket_per_global_batch_and_pure_in_seed_epoch():
    rng = np.random.default_rng(0)
    bucket_of_image = rng.integers(0, 4, size=23)
    length, batch, world = 23 * 3, 2, 2
    s = BucketSampler(bucket_of_image, length, batch, world, seed=7)
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == len(s) and len(s) % (batch * world) == 0
        assert {i - epoch * length for i in order} == set(range(length))  # every sample, padding repeats only
        for g in range(0, len(order), batch * world):
            assert len({bucket_of_image[(i - epoch * length) % 23] for i in order[g:g + batch * world]}) == 1
        again = BucketSampler(bucket_of_image, length, batch, world, seed=7)
        again.set_epoch(epoch)
        assert list(again) == order
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert [i - length for i in s] != first
    other = BucketSampler(bucket_of_image, length, batch, world, seed=8)
    assert list(other) != first



def test_bucket_order_does_not_depend_on_the_process(tmp_path, monkeypatch):
    """Each process builds its own sampler; accelerate hands micro batch k to process k % world, so the
    order must be the same on every rank (same seed, no rank in it) for a global batch to be one shape."""
    from fluxkit.training.train import build_data

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, size in enumerate([(64, 16), (62, 16), (32, 32), (30, 34), (16, 64), (20, 70)] * 2):
        Image.new("RGB", size, (i * 20, 0, 0)).save(folder / f"m{i}.png")
    args = make_args(folder, aspect_ratio_buckets=True, seed=3)
    orders = {}
    for rank in ("0", "1"):
        for var in ("RANK", "LOCAL_RANK", "PROCESS_INDEX"):
            monkeypatch.setenv(var, rank)
        ds = DreamBoothDataset(args, seed=3, scan=scan_dataset(args, world_size=2, quiet=True))
        sampler = build_data(args, ds, world=2).sampler
        orders[rank] = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            orders[rank].append(list(sampler))
    assert orders["0"] == orders["1"]
    ds = DreamBoothDataset(args, seed=3, scan=scan_dataset(args, world_size=2, quiet=True))
    for order in orders["0"]:  # rank k takes micro batches k, k + 2, ...: each pair is one bucket
        shapes = [ds.target_size(i % len(ds)) for i in order]
        assert all(shapes[k] == shapes[k + 1] for k in range(0, len(shapes), 2)), shapes


def test_bucketed_dataset_batches_have_the_bucket_shape(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, size in enumerate([(64, 16), (62, 16), (32, 32), (30, 34), (16, 64), (20, 70)]):
        Image.new("RGB", size, (i * 30, 0, 0)).save(folder / f"m{i}.png")
    args = make_args(folder, aspect_ratio_buckets=True, train_batch_size=2)
    scan = scan_dataset(args, quiet=True)
    assert sorted(scan.buckets[b] for b in scan.sample_bucket) == [(16, 64), (16, 64), (32, 32), (32, 32), (64, 16), (64, 16)]
    ds = DreamBoothDataset(args, seed=0, scan=scan)
    sampler = BucketSampler(scan.sample_bucket, len(ds), 2, 1, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
    shapes = sorted(tuple(b["pixel_values"].shape[2:]) for b in loader)
    assert shapes == [(16, 64), (32, 32), (64, 16)]  # (height, width) of each bucket


# ----------------------------------------------------------------------------- streaming

def test_streaming_dataset_is_deterministic_and_holds_no_pixels(tmp_path):
    folder = _images(tmp_path / "s", 3, size=(48, 40))
    args = make_args(folder, repeats=50, random_flip=True)
    ds = DreamBoothDataset(args, seed=3)
    assert len(ds) == 150
    assert not any(isinstance(v, torch.Tensor) for v in vars(ds).values())
    import pickle

    assert len(pickle.dumps(ds)) < 4096  # what workers get: paths and sizes, not pixels (nor copies per repeat)
    a = [ds[i]["pixel_values"] for i in (5, 100, 149)]
    b = [DreamBoothDataset(args, seed=3)[i]["pixel_values"] for i in (149, 100, 5)][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(ds[5]["pixel_values"], ds[150 * 4 + 5]["pixel_values"])  # same crop every epoch
    crops = {ds.placement(i) for i in range(0, 150, 3)}  # repeats of image 0: varied crops
    assert len(crops) > 5
    assert ds.placement(5) != DreamBoothDataset(args, seed=4).placement(5)
    assert not torch.equal(DreamBoothDataset(args, seed=4)[5]["pixel_values"], a[0])

    with_workers = torch.utils.data.DataLoader(ds, batch_size=4, sampler=EpochShuffleSampler(len(ds), 0),
                                               collate_fn=collate, num_workers=1)
    in_process = torch.utils.data.DataLoader(ds, batch_size=4, sampler=EpochShuffleSampler(len(ds), 0), collate_fn=collate)
    for x, y in zip(with_workers, in_process):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["pixel_values"], y["pixel_values"])


def test_default_workers_never_exceed_the_cores():
    cores = len(os.sched_getaffinity(0))
    for procs in (1, 2, 8, 64):
        n = default_num_workers(procs)
        assert 0 <= n and n * procs <= cores
