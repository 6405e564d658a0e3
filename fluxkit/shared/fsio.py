"""Filesystem safety, one rule each: atomic file writes, publishing a staged folder, and the
probe that tells whether a folder really takes files (os.access is not enough: root passes it on
read-only mounts).

Files are written through a temporary sibling and renamed into place, so a reader never sees half
a file, and they get the mode a plain open() would give (0666 less the umask): mkstemp's 0600
would make images and logs unreadable to other users of a shared machine.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Callable

from .errors import UserError

PARTIAL_PREFIX = ".partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable, mode: str = "wb") -> str:
    """Call write(f) on a temporary file beside path, then rename it over path. Returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str, obj, indent: int | None = 2) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def staging_dir(final: str) -> str:
    """A new, empty hidden sibling of final to build a folder in before publish_dir.

    Its name is unique (two builders never share one) and starts with PARTIAL_PREFIX, so readers
    that look for complete folders never pick it; its mode is a plain mkdir's, not mkdtemp's 0700.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.path.basename(final)}.", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def publish_dir(staging: str, final: str) -> str:
    """Put a completely built folder at final (replacing what was there); staging is gone after."""
    if os.path.exists(final):
        discard_dir(final)
    os.replace(staging, final)
    return final


def discard_dir(path: str) -> None:
    """Remove a folder so that a crash midway never leaves a complete-looking half of it: it is
    renamed first (atomically) to a partial name, which readers ignore, then deleted."""
    parent, name = os.path.split(os.path.abspath(path))
    doomed = os.path.join(parent, f"{PARTIAL_PREFIX}{name}.discarded")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def storage_problem(folder: str, probe_bytes: int = 4096) -> str | None:
    """Why folder cannot take a new file of probe_bytes now (e.g. 'No space left on device'), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fluxkit-write-probe-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err.strerror or str(err)
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return None


def creatable_problem(path: str) -> str | None:
    """Why a folder could not be created or written at path, judged without writing anything (a dry
    run's check): the nearest existing folder on its way must be a folder that takes new entries."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return "it is a file, not a folder"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} on its way is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable" + (" (read-only file system)" if _read_only(existing) else "")
    return None


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def ensure_writable_dir(path: str, flag: str = "--output_dir", probe_bytes: int = 4096) -> str:
    """Create path if needed and prove it takes files; a UserError naming flag otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file, not a folder; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path!r} cannot be created ({err.strerror or err}); choose another folder") from None
    problem = storage_problem(path, probe_bytes)
    if problem:
        raise UserError(f"{flag} {path!r} is not writable ({problem}); free space, fix its permissions "
                        "or choose another folder")
    return path


def write_failure(err: BaseException, folder: str, probe_bytes: int = 4096) -> str | None:
    """Why a write into folder failed when storage is to blame (full, read-only, no permission), else None.

    torch.save and safetensors report a full disk as RuntimeError or SafetensorError, not OSError,
    so for those a probe write decides: storage problems get one clear line, bugs keep their traceback.
    """
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = str(err)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(code) in text:  # e.g. safetensors: "I/O error: No space left on device (os error 28)"
            return os.strerror(code)
    return storage_problem(folder, probe_bytes)
