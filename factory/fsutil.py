"""Small file helpers: atomic writes, checksums and where a sparse file holds data.

The `_async` writers are for the event loop: each runs whole in one anyio worker thread,
so a slow disk stalls one task and not the run's progress, signals and other jobs. The
sync ones stay for sync callers. Whole computations (a checksum, a tree walk) run in one
worker thread too: one hop, not one per chunk or per system call.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable
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


def write_if_changed(path: Path, data: str | bytes) -> bool:
    """atomic_write, unless the file already holds these bytes: then it is left as it is
    (same inode, same mtime), so a rerun that changes nothing touches nothing."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        if path.read_bytes() == raw:
            return False
    except OSError:
        pass
    atomic_write(path, raw)
    return True


async def atomic_write_async(path: Path, data: str | bytes) -> None:
    """atomic_write from the event loop, whole in one worker thread (one hop: through
    aiofiles it took seven, each a thread handoff, and a farm's controller writes
    thousands). Shielded: a cancel waits for these few KB or MB to land, so no worker
    thread writes on after the run has cleaned up."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(atomic_write, path, data)


async def write_if_changed_async(path: Path, data: str | bytes) -> bool:
    """write_if_changed from the event loop (one worker-thread hop, shielded): same
    bytes, same file (inode and mtime)."""
    with anyio.CancelScope(shield=True):
        changed = await anyio.to_thread.run_sync(write_if_changed, path, data)
    return changed


def sha256_of(path: Path, report: Callable[[int, int], None] | None = None) -> str:
    """sha256 of a file, read here (in a worker thread already, or a small file);
    `report(bytes hashed, size)` after each chunk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        total, done = os.fstat(fh.fileno()).st_size, 0
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
            done += len(chunk)
            if report is not None:
                report(done, total)
    return h.hexdigest()


REPORT_EVERY = 0.25  # seconds between two hops to the event loop with a checksum's progress


async def sha256_file(path: Path, meter: Callable[[float, float], None] | None = None) -> str:
    """sha256 of a file, in a worker thread (hashing a disk image takes seconds); with
    `meter` (the job's proc.Meter, called in the event loop), how far it is, by bytes."""
    if meter is None:
        return await anyio.to_thread.run_sync(sha256_of, path, abandon_on_cancel=True)
    last = 0.0

    def report(done: int, total: int) -> None:  # in the worker thread
        nonlocal last
        now = time.monotonic()
        if now - last >= REPORT_EVERY:
            last = now
            anyio.from_thread.run_sync(meter, float(done), float(total))

    return await anyio.to_thread.run_sync(sha256_of, path, report, abandon_on_cancel=True)


def data_extents(path: Path, merge_gap: int = 1024 * 1024) -> list[tuple[int, int]]:
    """(offset, length) of the parts of a file that hold data, holes left out; extents
    closer than `merge_gap` are joined, so a fragmented file gives few, larger reads."""
    found: list[tuple[int, int]] = []
    with open(path, "rb") as fh:
        fd, pos = fh.fileno(), 0
        end = os.fstat(fd).st_size
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole to the end
                    break
                return [(0, end)]  # no SEEK_DATA here: all of it is data
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            if found and start - (found[-1][0] + found[-1][1]) < merge_gap:
                start = found.pop()[0]
            found.append((start, pos - start))
    return found
