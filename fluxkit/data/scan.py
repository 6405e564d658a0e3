"""The up-front data scan: what the training data is, and every data mistake, before any model loads.

`scan_dataset(args, world_size)` reads image headers only (size, mode, EXIF orientation, the file's
structure; pixels are not decoded), finds each image's caption, assigns aspect-ratio buckets and
checks that every process gets at least a full micro batch. It writes nothing. A bad input is one
UserError line; with --skip_bad_images an unreadable image is skipped and named instead.

Where the captions come from (first found wins, per image):
1. a metadata.jsonl or metadata.csv beside the images (imagefolder layout: a file_name column and a
   caption column: --caption_column, else `text`, else `caption`),
2. IMAGE.txt beside IMAGE.png (--caption_extension, default .txt; UTF-8),
3. for --dataset_name parquet/hub datasets, --caption_column,
4. --instance_prompt (in a kohya-style folder: the folder's prompt).
An empty caption (a zero-byte .txt file, an empty metadata cell) falls back to 4 and is counted
apart in the data line ("2 from --instance_prompt (empty caption)"); an image whose caption would
come from 4 while there is no prompt is one error line naming it.

Kohya-style folders: --instance_data_dir holding subfolders named N_prompt (`10_sks cat/`, as
kohya's sd-scripts name DreamBooth folders) is read as kohya reads it: each subfolder is a concept
whose images repeat N times per epoch, captioned by their caption file, else by the name after the
first underscore. A top level that mixes images and such folders, a subfolder without the N_
prefix beside them, a repeat count of 0, or --repeats on top of the folders' own counts is one
error line (never a silent other reading).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import pairs
from ..shared.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

logger = logging.getLogger("fluxkit.data.scan")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
DEFAULT_CAPTION_COLUMNS = ("text", "caption")
_ORIENTATION_TAG = 0x0112
HEADER_CHECKED_FORMATS = ("PNG", "JPEG", "WEBP")  # whose truncation the structural check catches


@dataclass
class ImageInfo:
    name: str           # what messages call it: a path, or DATASET[row]
    ref: object         # a path, or a row number of the scan's datasets table
    size: tuple         # (width, height), upright (EXIF orientation applied)
    mode: str           # PIL mode
    caption: str = ""
    caption_source: str = "--instance_prompt"


@dataclass
class DatasetScan:
    samples: list                      # readable instance images, in a fixed order
    class_samples: list = field(default_factory=list)
    skipped: list = field(default_factory=list)    # "NAME (reason)" per skipped image
    repeats: int = 1
    buckets: list | None = None        # (width, height) per bucket, when --aspect_ratio_buckets
    sample_bucket: np.ndarray | None = None  # bucket index per instance image
    table: object = None               # the datasets table rows refer to (parquet/hub), else None
    image_column: str | None = None
    origin: str = ""
    concepts: list = field(default_factory=list)   # kohya-style folders: (name, images, repeats, prompt)
    references: list | None = None     # editing pairs: the reference image of each sample (fluxkit.data.pairs)
    cond_column: str | None = None     # the table's reference-image column

    @property
    def num_samples(self) -> int:
        """Dataset length: images x repeats, or the class images when there are more of them."""
        return max(len(self.samples) * self.repeats, len(self.class_samples))

    def source(self, info: ImageInfo):
        """What data.open_image reads: the path, or the row's undecoded image."""
        if self.table is None:
            return info.ref
        return _row_image(self.table[int(info.ref)][self.image_column])

    def reference_source(self, info: ImageInfo):
        """What data.open_image reads for a reference image (fluxkit.data.pairs)."""
        return info.ref if self.table is None else _row_image(self.table[int(info.ref)][self.cond_column])

    def report(self) -> str:
        shown = list({s.name: s for s in self.samples}.values())  # a kohya folder's repeats count once
        sizes = Counter(f"{w}x{h}" for w, h in (s.size for s in shown))
        modes = Counter(s.mode for s in shown)
        captions = Counter(s.caption_source for s in shown)
        if self.concepts:
            images = sum(c[1] for c in self.concepts)
            repeats = "kohya folders " + ", ".join(f"{name!r} {n} x{r}" for name, n, r, _ in self.concepts)
        else:
            images, repeats = len(self.samples), f"repeats {self.repeats}"
        pairs = " editing pair(s)" if self.references else " image(s)"
        lines = [f"data: {images}{pairs} from {self.origin}; {repeats} -> "
                 f"{self.num_samples} sample(s)" + (f"; {len(self.class_samples)} class image(s)" if self.class_samples else "")
                 + "; sizes " + _top(sizes) + f"; modes {_top(modes)}; captions "
                 + ", ".join(f"{n} from {src}" for src, n in captions.most_common())]
        if self.buckets:
            used = Counter(f"{self.buckets[b][0]}x{self.buckets[b][1]}" for b in self.sample_bucket)
            lines.append(f"  buckets: {len(used)} used of {len(self.buckets)}: " + _top(used, 8))
        for s in self.skipped:
            lines.append(f"  skipped unreadable image {s}")
        return "\n".join(lines)


def list_images(folder: str, flag: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        raise UserError(f"{flag} {folder!r} does not exist or is not a directory; point it at a folder of images")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise UserError(f"{flag} {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or fix the path")
    return files


def _top(counter: Counter, n: int = 5) -> str:
    items = counter.most_common()
    text = ", ".join(f"{k} x{v}" for k, v in items[:n])
    return text + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _row_image(value):
    """A datasets image cell, undecoded: {bytes, path} dict, bytes or a path."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return value["path"]
    return value


# ------------------------------------------------------------------------------------ headers

def inspect_image(source, name: str) -> tuple[tuple[int, int], str]:
    """(upright size, mode) from the header, plus a structural check of the file (PNG chunk CRCs up
    to the end, a JPEG's end marker, WebP's container) that catches truncated files without decoding
    pixels. Other formats (BMP, GIF, TIFF) are decoded once, as verify() misses their truncation."""
    from PIL import Image

    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    def opened():
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)

    with opened() as img:
        size, mode, fmt = img.size, img.mode, img.format
        try:
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block: exif_transpose ignores it too
            orientation = 1
    with opened() as img:  # verify() must come first after open, and leaves the image unusable
        img.verify()
    if fmt not in HEADER_CHECKED_FORMATS:  # verify() does not see truncation there: decode (rare formats)
        with opened() as img:
            img.load()
    if orientation in (5, 6, 7, 8):
        size = (size[1], size[0])
    if fmt == "JPEG":
        tail = _tail(source, 1024)
        if b"\xff\xd9" not in tail:
            raise OSError("truncated JPEG (no end-of-image marker)")
    return size, mode


def _tail(source, n: int) -> bytes:
    if isinstance(source, bytes):
        return source[-n:]
    with open(source, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read()


def _bad_image_error(name: str, err: BaseException) -> UserError:
    return UserError(f"cannot read image {name!r} ({type(err).__name__}: {str(err)[:160]}); "
                     "fix or remove it, or pass --skip_bad_images to skip unreadable images")


# ------------------------------------------------------------------------------------ captions

def read_caption_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise UserError(f"caption file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        "re-save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read caption file {path!r} ({err.strerror or err})") from None


def read_metadata(folder: str, caption_column: str | None) -> tuple[str, dict[str, str]] | None:
    """(metadata file name, {file_name: caption}) of an imagefolder's metadata.jsonl/.csv, or None."""
    for name in METADATA_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                if name.endswith(".jsonl"):
                    rows = []
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                rows.append(json.loads(line))
                            except json.JSONDecodeError as err:
                                raise UserError(f"{path!r} line {n} is not JSON ({err.msg}); fix that line") from None
                else:
                    rows = list(csv.DictReader(f))
        except UnicodeDecodeError as err:
            raise UserError(f"{path!r} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
        columns = list(rows[0].keys()) if rows else []
        if "file_name" not in columns:
            raise UserError(f"{path!r} has no file_name column (columns: {', '.join(columns) or 'none'}); "
                            "each row needs file_name and a caption")
        column = caption_column or next((c for c in DEFAULT_CAPTION_COLUMNS if c in columns), None)
        if column is None or column not in columns:
            wanted = f"--caption_column {caption_column!r}" if caption_column else "text or caption column"
            raise UserError(f"{path!r} has no {wanted} (columns: {', '.join(columns)}); "
                            "pass --caption_column naming its caption column")
        return name, {os.path.normpath(str(r["file_name"])): ("" if r.get(column) is None else str(r[column])) for r in rows}
    return None


# ------------------------------------------------------------------------------------ sources

def _is_image_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return (any(n in METADATA_FILES for n in names) or any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
            or any(_KOHYA_FOLDER.match(n) and os.path.isdir(os.path.join(path, n)) for n in names))


def _folder_entries(folder: str, flag: str, args, prompt: str | None, prompt_source: str) -> list[tuple[str, str, str]]:
    """(path, caption, caption source) for each image of an image folder; an image without a caption
    (or with an empty one) gets `prompt`, named by `prompt_source`."""
    caption_ext = args.caption_extension or ".txt"
    meta = read_metadata(folder, args.caption_column) if os.path.isdir(folder) else None
    listed = {}
    if meta:
        meta_name, listed = meta
        missing = [f for f in listed if not os.path.isfile(os.path.join(folder, f))]
        if missing and not args.skip_bad_images:
            raise UserError(f"{os.path.join(folder, meta_name)!r} names {len(missing)} file(s) that do not exist, e.g. "
                            f"{missing[0]!r}; fix file_name or pass --skip_bad_images")
        paths = sorted(set(list_images(folder, flag) if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder)) else [])
                       | {os.path.join(folder, f) for f in listed if f not in missing})
        if not paths:
            raise UserError(f"{flag} {folder!r} holds no images; add some or fix the path")
    else:
        paths = list_images(folder, flag)
    entries, uncaptioned = [], []
    for path in paths:
        rel = os.path.normpath(os.path.relpath(path, folder))
        txt = os.path.splitext(path)[0] + caption_ext
        if rel in listed:
            caption, source, empty = listed[rel], meta[0], f"empty caption in {meta[0]}"
        elif os.path.isfile(txt):
            caption, source, empty = read_caption_file(txt), f"{caption_ext} files", f"empty {caption_ext} file"
        else:
            caption, source, empty = "", prompt_source, ""
        if not caption.strip():
            if not prompt:
                uncaptioned.append((path, empty))
            caption, source = prompt or "", prompt_source + (f" ({empty})" if empty else "")
        entries.append((path, caption, source))
    if uncaptioned:
        path, empty = uncaptioned[0]
        why = f"its {empty}" if empty else f"no {os.path.splitext(path)[0] + caption_ext} beside it"
        raise UserError(f"{len(uncaptioned)} image(s) in {folder!r} have no caption and {prompt_source} is not given, "
                        f"e.g. {os.path.basename(path)!r} ({why}); pass {prompt_source}='a photo of sks dog' "
                        f"or write a caption in IMAGE{caption_ext} beside each image")
    return entries


_KOHYA_FOLDER = re.compile(r"^(\d+)(?:_(.*))?$", re.DOTALL)


def kohya_concepts(folder: str, flag: str, repeats: int) -> list[tuple[str, int, str]] | None:
    """(subfolder, repeats, prompt) of each N_prompt subfolder of a kohya-style folder, else None."""
    if not os.path.isdir(folder):
        return None
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    folders = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    matched = [(n, _KOHYA_FOLDER.match(n)) for n in folders]
    if not any(m for _, m in matched):
        return None
    example = next(n for n, m in matched if m)
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) or n in METADATA_FILES]
    if images:
        raise UserError(f"{flag} {folder!r} holds images ({images[0]!r}) beside kohya-style N_prompt folders "
                        f"({example!r}); move the images into an N_prompt folder, or the folders out")
    other = [n for n, m in matched if not m]
    if other:
        raise UserError(f"{flag} {folder!r}: folder {other[0]!r} has no N_ repeat prefix beside kohya-style folders "
                        f"({example!r}); rename it like '1_{other[0]}' or move it out")
    if repeats != 1:
        raise UserError(f"--repeats {repeats} with kohya-style folders ({example!r}), which carry their own repeat "
                        "counts; drop --repeats, or change the N_ prefixes")
    concepts = [(n, int(m.group(1)), (m.group(2) or "").strip()) for n, m in matched]
    zero = [n for n, r, _ in concepts if r < 1]
    if zero:
        raise UserError(f"{flag} {folder!r}: folder {zero[0]!r} repeats its images 0 times; "
                        "give it a count of 1 or more, or move it out")
    return concepts


def _kohya_entries(folder: str, flag: str, args, concepts) -> tuple[list, list]:
    """(path, caption, source) per sample, a kohya folder's images listed N times, and the concepts'
    (name, images, repeats, prompt)."""
    entries, summary = [], []
    for name, repeats, prompt in concepts:
        sub = _folder_entries(os.path.join(folder, name), flag, args, prompt or args.instance_prompt,
                              "kohya folder names" if prompt else "--instance_prompt")
        entries += [e for e in sub for _ in range(repeats)]
        summary.append((name, len(sub), repeats, prompt))
    return entries, summary


def _load_table(args):
    """--dataset_name as a parquet file, a datasets folder or a hub id: (table, image column, captions)."""
    import datasets

    name = args.dataset_name
    is_local = os.path.exists(name)
    if is_local and os.path.isfile(name) and name.endswith(".parquet"):
        spec = dict(path="parquet", data_files={"train": name})
    elif is_local:
        spec = dict(path=name)
    else:
        spec = dict(path=name, name=args.dataset_config_name)
    try:
        ds = datasets.load_dataset(**spec, cache_dir=args.cache_dir, split="train")
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise UserError(f"--dataset_name {name!r} could not be loaded ({type(err).__name__}: {str(err)[:200]}); "
                        "give a local dataset folder or parquet file") from None
    except Exception as err:  # offline hub errors come in many types
        raise UserError(f"--dataset_name {name!r} could not be loaded ({type(err).__name__}); "
                        "give a local dataset folder or parquet file, or check the hub id and network") from None
    columns = ds.column_names
    image_column = args.image_column or columns[0]
    if image_column not in columns:
        raise UserError(f"--image_column {image_column!r} is not in dataset {name!r}; its columns are: {', '.join(columns)}")
    captions = None
    if args.caption_column is not None:
        if args.caption_column not in columns:
            raise UserError(f"--caption_column {args.caption_column!r} is not in dataset {name!r}; its columns are: {', '.join(columns)}")
        captions = ds[args.caption_column]
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes stay on disk until a batch needs them
    return ds, image_column, captions


# ------------------------------------------------------------------------------------ the scan

def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    from ..shared.environment import is_rank0

    return tqdm(total=total, desc=desc, unit="img", disable=quiet or not is_rank0() or total < 64, file=sys.stderr)


def scan_dataset(args, world_size: int = 1, class_images: list[str] | None = None, quiet: bool = False) -> DatasetScan:
    """Scan the training data of a trainer's args (see the module notes). Raises UserError on bad input."""
    skip_bad = bool(args.skip_bad_images)
    skipped: list[str] = []
    samples: list[ImageInfo] = []
    table, image_column, concepts = None, None, []

    if args.dataset_name and not _is_image_folder(args.dataset_name):
        table, image_column, captions = _load_table(args)
        origin = f"--dataset_name {args.dataset_name}"
        if captions is None and not args.instance_prompt:
            raise UserError(f"--dataset_name {args.dataset_name!r} is read without captions (no --caption_column) and "
                            "--instance_prompt is not given; pass --caption_column=COLUMN or --instance_prompt='a photo of sks dog'")
        bar = _progress(len(table), "scanning images", quiet)
        row = 0
        for chunk in table.select_columns([image_column]).iter(batch_size=64):
            for value in chunk[image_column]:
                name = f"{args.dataset_name}[{row}]"
                caption = captions[row] if captions is not None else None
                try:
                    size, mode = inspect_image(_row_image(value), name)
                except Exception as err:
                    if not skip_bad:
                        raise _bad_image_error(name, err) from None
                    skipped.append(f"{name} ({type(err).__name__}: {str(err)[:120]})")
                else:
                    source = "--instance_prompt" if caption is None else f"column {args.caption_column}"
                    text = (args.instance_prompt or "") if caption is None else str(caption)
                    samples.append(ImageInfo(name, row, size, mode, text, source))
                row += 1
                bar.update(1)
        bar.close()
    else:
        folder, flag = (args.dataset_name, "--dataset_name") if args.dataset_name else (args.instance_data_dir, "--instance_data_dir")
        origin = f"{flag} {folder}"
        concepts = kohya_concepts(folder, flag, int(args.repeats)) or []
        if concepts:
            entries, concepts = _kohya_entries(folder, flag, args, concepts)
        else:
            entries = _folder_entries(folder, flag, args, args.instance_prompt, "--instance_prompt")
        bar = _progress(len(entries), "scanning images", quiet)
        inspected = {}  # a kohya folder lists each image once per repeat
        for path, caption, source in entries:
            if path not in inspected:
                inspected[path] = _inspect_path(path, skip_bad, skipped)
            info = inspected[path]
            if info is not None:
                samples.append(ImageInfo(path, path, info[0], info[1], caption, source))
            bar.update(1)
        bar.close()
    if not samples:
        raise UserError(f"no readable training images in {origin} (all {len(skipped)} were skipped); "
                        "check --instance_data_dir or --dataset_name")

    scan = DatasetScan(samples, [], skipped, max(1, int(args.repeats)), table=table, image_column=image_column, origin=origin,
                       concepts=concepts)
    if pairs.editing_requested(args):
        pairs.check_flags(args)
        attach_references(scan, args, skipped)
    add_class_images(scan, class_images or [], args)
    if args.aspect_ratio_buckets:
        from .buckets import assign, make_buckets

        scan.buckets = make_buckets(args.resolution, args.bucket_step,
                                    args.min_bucket_side, args.max_bucket_side)
        scan.sample_bucket = assign([s.size for s in samples], scan.buckets)

    per_process = scan.num_samples // max(1, world_size)
    if args.train_batch_size > per_process:
        raise UserError(f"--train_batch_size {args.train_batch_size} is larger than the {per_process} sample(s) each of "
                        f"{world_size} process(es) gets ({scan.num_samples} in all); lower it, add images or raise --repeats")
    if not quiet:
        from ..shared.environment import is_rank0

        if is_rank0():
            print(scan.report(), file=sys.stderr, flush=True)
    return scan


def add_class_images(scan: DatasetScan, paths: list[str], args) -> DatasetScan:
    """Prior preservation's class images (known only once generated) join a scan."""
    skip_bad = bool(args.skip_bad_images)
    for path in paths:
        info = _inspect_path(path, skip_bad, scan.skipped)
        if info is not None:
            scan.class_samples.append(ImageInfo(path, path, info[0], info[1], args.class_prompt or "", "--class_prompt"))
    return scan


def _inspect_path(path: str, skip_bad: bool, skipped: list) -> tuple | None:
    try:
        return inspect_image(path, path)
    except Exception as err:
        if not skip_bad:
            raise _bad_image_error(path, err) from None
        skipped.append(f"{path} ({type(err).__name__}: {str(err)[:120]})")
        return None


# ------------------------------------------------------------------------------------ editing pairs

def _reference_in_folder(folder: str, target: str, root: str) -> str:
    """The reference image of target path `target` (an image under `root`, --instance_data_dir): the file
    of the same stem at the same place under `folder` (in a kohya-style folder, its N_prompt subfolder)."""
    stem = os.path.splitext(os.path.basename(target))[0]
    where = os.path.normpath(os.path.join(folder, os.path.relpath(os.path.dirname(target), root)))
    names = sorted(os.listdir(where)) if os.path.isdir(where) else []
    found = [os.path.join(where, n) for n in names if os.path.splitext(n)[0] == stem and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        expected = os.path.relpath(os.path.join(where, stem), folder)
        mirror = "; --cond_image_dir mirrors the N_prompt folders" if where != os.path.normpath(folder) else ""
        raise UserError(f"target image {target!r} has no reference image in --cond_image_dir {folder!r} "
                        f"(expected {expected}.png/.jpg/...{mirror}); add it, or move the target out of --instance_data_dir")
    return found[0]


def attach_references(scan, args, skipped: list) -> None:
    """Editing pairs (fluxkit.data.pairs): give each scanned target its reference (scan.references, parallel to scan.samples); a pair whose
    reference is missing or unreadable is one error line, or skipped with --skip_bad_images."""
    folder = args.cond_image_dir
    if folder and not os.path.isdir(folder):
        raise UserError(f"--cond_image_dir {folder!r} does not exist or is not a directory; point it at the folder "
                        "of reference images (same file names as the targets)")
    if scan.table is not None and args.cond_image_column not in scan.table.column_names:
        raise UserError(f"--cond_image_column {args.cond_image_column!r} is not in dataset {args.dataset_name!r}; its "
                        f"columns are: {', '.join(scan.table.column_names)}")
    if scan.table is not None:
        import datasets

        if isinstance(scan.table.features[args.cond_image_column], datasets.Image):  # bytes stay on disk, as the targets'
            scan.table = scan.table.cast_column(args.cond_image_column, datasets.Image(decode=False))
    kept, references, inspected = [], [], {}  # a kohya folder lists each target once per repeat
    for sample in scan.samples:
        if sample.ref not in inspected:
            inspected[sample.ref] = _reference(scan, args, folder, sample, skipped)
        if inspected[sample.ref] is not None:
            kept.append(sample)
            references.append(inspected[sample.ref])
    if not kept:
        raise UserError("no training pair has a readable reference image; check --cond_image_dir / --cond_image_column")
    scan.samples, scan.references, scan.cond_column = kept, references, args.cond_image_column


def _reference(scan, args, folder: str | None, sample, skipped: list):
    """The reference ImageInfo of one target, or None when it is missing or unreadable and --skip_bad_images."""
    if scan.table is not None:
        ref, name = int(sample.ref), f"{args.dataset_name}[{sample.ref}].{args.cond_image_column}"
        source = _row_image(scan.table[ref][args.cond_image_column])
    else:
        try:
            ref = name = source = _reference_in_folder(folder, sample.ref, args.instance_data_dir)
        except UserError:
            if not args.skip_bad_images:
                raise
            skipped.append(f"{sample.ref} (no reference image of its name in --cond_image_dir {folder})")
            return None
    try:
        if source is None:
            raise OSError("the row has no reference image")
        size, mode = inspect_image(source, name)
    except Exception as err:
        if not args.skip_bad_images:
            raise _bad_image_error(name, err) from None
        skipped.append(f"{name} ({type(err).__name__}: {str(err)[:120]})")
        return None
    return ImageInfo(name, ref, size, mode, sample.caption, "reference")
