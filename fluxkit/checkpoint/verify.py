"""Checking a checkpoint against its manifest before anything of it loads.

`check(path)` reads the state file and compares every file the manifest lists: present, the
recorded size, the recorded SHA-256 (a deep check; a shallow one stops at sizes), and no file a
resume could load added since. A damaged part raises `Damaged`, naming the file and what it holds.
A checkpoint written before manifests existed gets what can still be checked without a record:
the random-state files every process needs are present, weights files are whole (safetensors
header against the file's size), pickled states load with torch's weights-only reader, DeepSpeed's
files pass their zip checksums; the result says the check was partial.
"""

from __future__ import annotations

import json
import os
import re
import zipfile

from ..shared.errors import UserError
from . import manifest
from .manifest import STATE_FILE, holds

_RANDOM_STATES = re.compile(r"^random_states_(\d+)\.pkl$")
# what a random-state file holds for accelerate to restore (its other keys are device states)
_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


class Damaged(UserError):
    """A part of a checkpoint that cannot be trusted: `rel` (its path inside the checkpoint) and what is wrong."""

    def __init__(self, rel: str, problem: str, what: str | None = None):
        self.rel, self.problem = rel, problem
        self.what = what or holds(rel)
        super().__init__(f"{rel} ({self.what}) {problem}")


def read_state(path: str) -> dict:
    """The checkpoint's state file, its seal checked; Damaged when unreadable or changed."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise Damaged(STATE_FILE, "is missing: deleted, or the folder was not written by this trainer")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Damaged(STATE_FILE, "is not readable JSON: damaged, or replaced by another file") from None
    if not isinstance(state, dict) or manifest.seal_intact(state) is False:
        raise Damaged(STATE_FILE, "has changed since it was written (its content does not match its seal)")
    return state


def check(path: str, deep: bool = True, trusted_seal: str | None = None) -> tuple[dict, bool]:
    """(the state, whether the check was complete) of the checkpoint at path; Damaged on damage.
    deep: compare content hashes too (else sizes only, for processes that leave hashing to the main one);
    trusted_seal: the seal of a state this process's launcher has just checked deeply (sizes suffice then)."""
    state = read_state(path)
    deep = deep and not (trusted_seal and state.get("seal") == trusted_seal)
    recorded = state.get("manifest")
    if recorded is None:
        if deep:
            _partial_check(path, state)
        return state, False
    files = recorded.get("files") if isinstance(recorded, dict) else None
    if not isinstance(files, dict) or not files:
        raise Damaged(STATE_FILE, "has no usable manifest (edited or written by another tool)")
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise Damaged(rel, "is missing", entry.get("holds"))
        size = os.path.getsize(full)
        if size != entry.get("size"):
            raise Damaged(rel, f"is {size} bytes where {entry.get('size')} were written: cut short (a full disk, "
                          "an interrupted copy) or replaced", entry.get("holds"))
    if deep:
        actual = manifest.hash_files(path, sorted(files))
        for rel, entry in files.items():
            if actual[rel][manifest.HASH] != entry.get(manifest.HASH):
                raise Damaged(rel, "has changed since it was written (its SHA-256 differs from the manifest's): "
                              "damaged on disk or in a copy, or replaced", entry.get("holds"))
        for rel in manifest.files_in(path):
            if rel not in files and rel.endswith(manifest.LOADABLE):
                raise Damaged(rel, "was added after the checkpoint was written (it is not in the manifest)")
        for rel in sorted(files):
            if _RANDOM_STATES.match(rel):
                read_random_states(path, rel)  # intact, but can this torch and numpy read it?
    return state, True


def read_random_states(path: str, rel: str) -> dict:
    """A random-state file's content, read with torch's weights-only reader (as accelerate reads it);
    Damaged when it cannot be read or lacks a state accelerate restores."""
    import pickle

    from accelerate.utils import load as safe_load  # weights_only=True with accelerate's allow-list

    try:
        states = safe_load(os.path.join(path, rel), map_location="cpu")
    except pickle.UnpicklingError:
        raise Damaged(rel, "holds objects other than tensors and plain data, which could run code when loaded, "
                      "so it was not loaded") from None
    except FileNotFoundError:
        raise Damaged(rel, "is missing") from None
    except Exception as err:  # a truncated zip, another library version's format
        raise Damaged(rel, f"cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    missing = [k for k in _RNG_KEYS if not isinstance(states, dict) or k not in states]
    if missing:
        raise Damaged(rel, f"lacks {', '.join(missing)}: not a random-state file this trainer wrote")
    return states


def _partial_check(path: str, state: dict) -> None:
    """What can be checked without a manifest (see the module's docstring)."""
    world = state.get("world_size")  # recorded by every trainer version that wrote random states per process
    rels = manifest.files_in(path)
    for n in range(world if isinstance(world, int) else 0):
        if f"random_states_{n}.pkl" not in rels:
            raise Damaged(f"random_states_{n}.pkl", f"is missing (the run had {world} process(es))")
    if "latest" in rels:  # DeepSpeed's engine checkpoint: the folder 'latest' names must hold its files
        with open(os.path.join(path, "latest"), encoding="utf-8", errors="replace") as f:
            tag = f.read().strip()
        if not any(rel.startswith(tag + "/") for rel in rels):
            raise Damaged(tag + "/", "is missing or empty", "DeepSpeed's engine checkpoint (weights and optimizer states)")
    for rel in rels:
        full = os.path.join(path, rel)
        if rel.endswith(".safetensors"):
            _check_safetensors(full, rel)
        elif rel.endswith(".pt") and "/" in rel:  # DeepSpeed's engine files: fully unpickled by DeepSpeed itself
            _check_zip(full, rel)
        elif rel.endswith((".bin", ".pkl", ".pt", ".pth")):
            read_random_states(path, rel) if _RANDOM_STATES.match(rel) else _read_pickled(path, rel)


def _read_pickled(path: str, rel: str) -> None:
    import pickle

    from accelerate.utils import load as safe_load

    try:
        safe_load(os.path.join(path, rel), map_location="cpu")
    except pickle.UnpicklingError:
        raise Damaged(rel, "holds objects other than tensors and plain data, which could run code when loaded, "
                      "so it was not loaded") from None
    except Exception as err:
        raise Damaged(rel, f"cannot be read ({type(err).__name__}: {_first_line(err)})") from None


def _check_safetensors(full: str, rel: str) -> None:
    """The header parses and the file is as long as the tensors it lists."""
    size = os.path.getsize(full)
    try:
        with open(full, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise Damaged(rel, "is not a readable safetensors file") from None
    if 8 + n + end != size:
        raise Damaged(rel, f"is {size} bytes where its header lists {8 + n + end}: cut short or damaged")


def _check_zip(full: str, rel: str) -> None:
    try:
        with zipfile.ZipFile(full) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise Damaged(rel, "is not a readable torch file (cut short or damaged)") from None
    if bad is not None:
        raise Damaged(rel, f"fails its checksum (entry {bad}): damaged")


def _first_line(err: Exception) -> str:
    """The first sentence of an exception's message (torch's go on for lines)."""
    text = str(err).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".")[:200] if text else "no detail"
