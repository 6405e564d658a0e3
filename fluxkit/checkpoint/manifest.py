"""What a checkpoint holds, written down before it is published: every file's size and SHA-256.

The manifest lives in the checkpoint's state file (fluxkit_state.json), which also carries a
SHA-256 of its own content ("seal"), so an edit or a damaged byte anywhere in the folder is found
before anything loads.

Who hashes what when saving: each process hashes the files it wrote itself (its random states, its
DeepSpeed shard), the main process everything else, each streaming its files once, right after
they were written (still in the page cache), several files at a time; the per-process lists are
gathered to the main process, which writes the state file. So hashing runs in parallel over the
processes, and a process never reads another machine's files: per-process files are hashed where
they were written even without a shared filesystem. (Publishing the folder, the main process's
rename, does assume the output folder is shared, as it did before manifests.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

STATE_FILE = "fluxkit_state.json"
HASH = "sha256"
_CHUNK = 16 << 20  # bytes read at a time: big enough to keep the hash busy, small enough to stream
# files written by one process each: accelerate's random states, DeepSpeed's per-rank shards
_PER_PROCESS = re.compile(r"(?:^|/)(?:(?:device_)?random_states_(\d+)\.(?:pkl|safetensors)"
                          r"|(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt)$")
# what a file of a checkpoint holds, for messages: (pattern on its path, description; {0} = the number matched)
_HOLDS = (
    (re.compile(rf"^{re.escape(STATE_FILE)}$"), "the run state: step and data position, settings, this manifest"),
    (re.compile(r"^random_states_(\d+)\.pkl$"), "process {0}'s random number generator states"),
    (re.compile(r"^device_random_states_(\d+)\.safetensors$"), "process {0}'s device random number generator states"),
    (re.compile(r"^optimizer(?:_\d+)?\.bin$"), "the optimizer state"),
    (re.compile(r"^scheduler(?:_\d+)?\.bin$"), "the learning-rate schedule's state"),
    (re.compile(r"^(?:sampler|dl_state_dict)(?:_\d+)?\.bin$"), "the data loader's position"),
    (re.compile(r"^pytorch_lora_weights\.safetensors$"), "the LoRA weights"),
    (re.compile(r"^token_embeddings\.safetensors$"), "the new tokens' embeddings (pivotal tuning)"),
    (re.compile(r"^(transformer|text_encoder)/[^/]+\.safetensors$"), "the {0}'s weights"),
    (re.compile(r"^(transformer|text_encoder)/[^/]+\.json$"), "the {0}'s config"),
    (re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$"), "DeepSpeed's optimizer state of process {0}"),
    (re.compile(r"(?:^|/)zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$"), "DeepSpeed's model state of process {0}"),
    (re.compile(r"(?:^|/)mp_rank_\d+_model_states\.pt$"), "DeepSpeed's model state (the weights the engine resumes from)"),
    (re.compile(r"^latest$"), "DeepSpeed's name of its newest engine checkpoint"),
    (re.compile(r"^zero_to_\w+\.py$"), "DeepSpeed's script that consolidates the weights"),
    (re.compile(r"^model(?:_\d+)?\.safetensors$"), "model weights saved by accelerate"),
)
# suffixes of files a resume may load: one that is not in the manifest was added after the save
LOADABLE = (".safetensors", ".bin", ".pkl", ".pt", ".pth", ".json")


def holds(rel: str) -> str:
    """What the file at rel (a path inside a checkpoint) holds, in words."""
    for pattern, text in _HOLDS:
        m = pattern.search(rel)
        if m:
            return text.format(*m.groups())
    return "a file of the checkpoint"


def owner(rel: str) -> int:
    """The process that writes rel (and hashes it when saving): per-process files their process's, others the main's."""
    m = _PER_PROCESS.search(rel)
    return int(m.group(1) or m.group(2)) if m else 0


def files_in(folder: str) -> list[str]:
    """Every file under folder as a '/'-separated relative path, sorted; the state file is not among them."""
    found = []
    for d, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(d, name), folder).replace(os.sep, "/")
            if rel != STATE_FILE:
                found.append(rel)
    return sorted(found)


def digest(path: str) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read once in chunks."""
    h, size = hashlib.new(HASH), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # hashlib releases the GIL for big updates: threads hash files in parallel
            size += n
    return size, h.hexdigest()


def hash_files(folder: str, rels: list[str]) -> dict[str, dict]:
    """{rel: {"size", "sha256", "holds"}} for the given files, several at a time."""
    if not rels:
        return {}
    workers = max(1, min(len(rels), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda rel: digest(os.path.join(folder, rel)), rels))
    return {rel: {"size": size, HASH: hexd, "holds": holds(rel)} for rel, (size, hexd) in zip(rels, results)}


def own_files(folder: str, rank: int, world: int) -> list[str]:
    """The files of folder this process hashes when saving (see the module's docstring)."""
    return [rel for rel in files_in(folder) if owner(rel) == rank or (rank == 0 and owner(rel) >= world)]


def build(accelerator, folder: str, saved: bool) -> tuple[dict | None, str | None]:
    """Every process: hash the files it wrote (when its save succeeded) and gather the lists.
    Returns, on the main process, (the manifest, None) or (None, a process's failure); elsewhere (None, None)."""
    from accelerate.utils import gather_object

    own, failure = {}, None if saved else f"process {accelerator.process_index} could not write its part"
    if saved:
        try:
            own = hash_files(folder, own_files(folder, accelerator.process_index, accelerator.num_processes))
        except OSError as err:
            failure = f"process {accelerator.process_index} could not read back what it wrote: {err}"
    parts = gather_object([{"files": own, "failure": failure}])  # a collective: every process calls it
    if not accelerator.is_main_process:
        return None, None
    failures = [p["failure"] for p in parts if p["failure"]]
    if failures:
        return None, failures[0]
    files = {}
    for part in parts:
        files.update(part["files"])
    return {"hash": HASH, "files": dict(sorted(files.items()))}, None


def seal(state: dict) -> dict:
    """state with "seal": the SHA-256 of the rest of it, so that a changed state file is found."""
    body = {k: v for k, v in state.items() if k != "seal"}
    return {**body, "seal": _canonical_hash(body)}


def seal_intact(state: dict) -> bool | None:
    """Whether the state file's seal matches its content; None when it has neither seal nor manifest
    (written before manifests existed). Only one of the two is damage too."""
    if "seal" not in state and "manifest" not in state:
        return None
    if "seal" not in state or "manifest" not in state:
        return False
    return state["seal"] == _canonical_hash({k: v for k, v in state.items() if k != "seal"})


def _canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
