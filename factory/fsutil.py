"""Small file helpers: atomic writes and checksums."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio

TMP_PREFIX = ".tmp-"


def aside(path: Path) -> Path:
    """Where a file is written before it is renamed to `path`: same folder, hidden name."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `path` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


async def sha256_file(path: Path) -> str:
    """sha256 of a file, in a worker thread (hashing a disk image takes seconds)."""
    return await anyio.to_thread.run_sync(_sha256, path, abandon_on_cancel=True)
