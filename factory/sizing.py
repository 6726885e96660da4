"""How big a disk must be for a tree: pure arithmetic, with its reasons kept for the report."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anyio

from factory.layouts import Layout, MiB

JOURNAL = 64 * MiB  # mkfs -J size=64, as diskimage-builder
BYTES_PER_INODE = 4096  # mkfs -i 4096, as diskimage-builder
INODE_SIZE = 256
SLACK = 0.05  # indirect/extent blocks, directories growing, rounding
METADATA = 0.01  # group descriptors, bitmaps


@dataclass(frozen=True)
class TreeUsage:
    allocated: int  # bytes the tree's files and folders take on disk
    entries: int  # inodes it needs


@dataclass(frozen=True)
class DiskSize:
    disk: int
    filesystem: int
    reason: str


def measure(tree: Path) -> TreeUsage:
    """Allocated bytes and inode count of a tree; hard links counted once. Like `du -x`,
    it stays on the tree's filesystem: a tool that left /proc mounted in the tree must
    not make it count (or trip over) another filesystem's entries."""
    device = os.lstat(tree).st_dev
    seen: set[int] = set()
    allocated = entries = 0
    for dirpath, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if st.st_dev != device:
                if name in dirs:
                    dirs.remove(name)  # a mount point: do not walk into it
                continue
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            allocated += st.st_blocks * 512
            entries += 1
    return TreeUsage(allocated, entries + 1)


async def measure_async(tree: Path) -> TreeUsage:
    """measure() in a worker thread: a walk of a big tree takes seconds, and on the event
    loop it would stall every other job and the SSH keepalives."""
    return await anyio.to_thread.run_sync(measure, tree)


def round_mib(n: float) -> int:
    return -(-int(n) // MiB) * MiB


class TooSmall(ValueError):
    """The user's size cannot hold the tree."""


def _needed_fs(usage: TreeUsage, extra: int) -> int:
    payload = usage.allocated * (1 + SLACK) + JOURNAL + extra
    by_data = payload / (1 - INODE_SIZE / BYTES_PER_INODE - METADATA)
    by_inodes = usage.entries * BYTES_PER_INODE * 1.2
    return round_mib(max(by_data, by_inodes))


def disk_size(usage: TreeUsage, layout: Layout, extra: int, fixed: int | None) -> DiskSize:
    """The disk for a tree: the user's size (whole MiB, big enough for the tree), or
    data + slack + journal + extra, grown to leave room for inode tables, and never
    fewer inodes than the tree has entries."""
    overhead = layout.overhead_mib() * MiB
    if fixed is not None:
        disk = round_mib(fixed)
        least = _needed_fs(usage, 0) + overhead
        if disk < least:
            raise TooSmall(
                f"image.size {fixed / MiB:.0f} MiB cannot hold the tree "
                f'({usage.allocated / MiB:.0f} MiB; set at least {least // MiB} MiB, or "auto")'
            )
        return DiskSize(disk, disk - overhead, f"size {disk // MiB} MiB as set in the matrix")
    fs = _needed_fs(usage, extra)
    reason = (
        f"tree {usage.allocated / MiB:.0f} MiB in {usage.entries} inodes; "
        f"+{SLACK:.0%} slack, {JOURNAL // MiB} MiB journal, {extra / MiB:.0f} MiB extra_size, "
        f"inode tables at one per {BYTES_PER_INODE} bytes → filesystem {fs // MiB} MiB; "
        f"+{overhead // MiB} MiB for the {layout.name} layout → disk {(fs + overhead) // MiB} MiB"
    )
    return DiskSize(fs + overhead, fs, reason)
