"""Files that are never seen half-written: atomic writes, locks, checksums, stale temporaries.

Every hpsearch file (checkpoints, manifests, the report, status files) is written to a
temporary name in its own folder, fsynced, then ``os.replace``d. A written file gets the
permissions a plain ``open`` would give it under the process's umask (``mkstemp`` alone would
leave it readable by its owner only), so a team can share a results folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hpsearch.errors import FileWriteError

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    # Read once per write: an application may change its umask after importing hpsearch.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse directory fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_error(path: Path, err: OSError) -> FileWriteError:
    """The error to raise for a failed write of ``path``."""
    return FileWriteError(err.errno, f"cannot write {path}: {err.strerror or err}", str(path))


def atomic_write_bytes(path: Path, data: bytes | memoryview, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    ``durable=False`` skips the fsyncs, for status files that only need atomicity.

    Raises:
        FileWriteError: The write failed; the message names ``path``. No temporary is left.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            fsync_dir(path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", durable=durable)


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(obj: Any, path: Path) -> str:
    """Save ``obj`` with torch.save atomically; returns the file's sha256."""
    data = serialize(obj)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def clean_stale_temporaries(root: Path) -> int:
    """Remove temporary files a crash left behind. Returns how many were removed."""
    removed = 0
    if not root.exists():
        return 0
    for tmp in root.rglob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock between processes on this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
