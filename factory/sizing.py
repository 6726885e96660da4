"""How big a disk must be for a tree: pure arithmetic, with its reasons kept for the report."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio

from factory.layouts import BOOT_ROLES, Layout, MiB, Volume

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
    return _measure(tree, frozenset())


def measure_split(tree: Path, mountpoints: Iterable[str]) -> dict[str, TreeUsage]:
    """The tree's usage by the mount point whose filesystem each entry goes into (the
    deepest that holds it): what each partition has to hold. Blocking: run in a thread."""
    points = sorted(set(mountpoints), key=lambda m: -m.count("/") if m != "/" else 1)
    out = {}
    for point in points:
        top = tree / point.lstrip("/") if point != "/" else tree
        inner = frozenset(
            tree / m.lstrip("/")
            for m in points
            if m != point and (point == "/" or m.startswith(point + "/"))
        )
        out[point] = _measure(top, inner) if top.is_dir() else TreeUsage(0, 1)
    return out


def _measure(tree: Path, skip: frozenset[Path]) -> TreeUsage:
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
        if skip:  # another partition's mount point: its folder counts here, not its files
            dirs[:] = [d for d in dirs if Path(dirpath, d) not in skip]
    return TreeUsage(allocated, entries + 1)


async def measure_async(tree: Path) -> TreeUsage:
    """measure() in a worker thread: a walk of a big tree takes seconds, and on the event
    loop it would stall every other job and the SSH keepalives."""
    return await anyio.to_thread.run_sync(measure, tree)


def round_mib(n: float) -> int:
    return -(-int(n) // MiB) * MiB


class TooSmall(ValueError):
    """The user's size cannot hold the tree."""


def _needed_fs(usage: TreeUsage, extra: int, journal: int = JOURNAL) -> int:
    payload = usage.allocated * (1 + SLACK) + journal + extra
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


# What each mkfs here needs beyond the files' blocks, as (share of the data, fixed
# bytes, bytes per inode), and its smallest filesystem. XFS: 512-byte inodes and a log;
# btrfs: metadata twice (DUP on one device) and its chunks; FAT: its tables.
OVERHEAD: dict[str, tuple[float, int, int]] = {
    "xfs": (0.10, 64 * MiB, 1024),
    "btrfs": (0.15, 96 * MiB, 2048),
    "vfat": (0.10, 4 * MiB, 512),
}
MIN_BYTES = {"ext4": 32 * MiB, "xfs": 300 * MiB, "btrfs": 128 * MiB, "vfat": 33 * MiB}


def ext4_journal(size: int) -> int:
    """The journal of a user's ext4 partition of `size`: 64 MiB as the root's, less on a
    small one (mke2fs refuses a journal near half the filesystem), 4 MiB at least."""
    return max(4 * MiB, min(JOURNAL, size // 8 // MiB * MiB))


def needed(filesystem: str, usage: TreeUsage, extra: int, size: int | None = None) -> int:
    """The smallest `filesystem` (whole MiB) for `usage` plus `extra` free bytes (in a
    partition of `size`, when it is set: an ext4's journal follows its size)."""
    if filesystem == "ext4":
        journal = JOURNAL if size is None else ext4_journal(size)
        return max(MIN_BYTES["ext4"], _needed_fs(usage, extra, journal))
    share, fixed, per_inode = OVERHEAD[filesystem]
    payload = usage.allocated * (1 + share) + fixed + usage.entries * per_inode + extra
    return round_mib(max(MIN_BYTES[filesystem], payload))


@dataclass(frozen=True)
class PartitionSizes:
    """The user's partitions' sizes (MiB, in their order) and the disk around them."""

    mib: list[int]
    disk: DiskSize


def partition_sizes(
    usages: dict[str, TreeUsage],
    volumes: tuple[Volume, ...],
    layout: Layout,
    extra: int,
    fixed: int | None,
) -> PartitionSizes:
    """Each partition of the user's: a set size (checked against its share of the tree),
    or "auto": its share plus an even share of `extra`. With the disk's size set, what the
    partitions leave is shared by the "auto" ones, after their needs."""
    boot = layout.first_mib * MiB + (MiB if layout.label == "gpt" else 0)
    boot += sum((p.size_mib or 0) * MiB for p in layout.partitions if p.role in BOOT_ROLES)
    autos = [i for i, v in enumerate(volumes) if v.size is None]
    extra_each = round_mib(extra / len(autos)) if autos and fixed is None else 0
    sizes: list[int] = []
    reasons: list[str] = []
    for v in volumes:
        name = v.mountpoint or "swap"
        usage = usages.get(v.mountpoint or "", TreeUsage(0, 1)) if not v.empty else TreeUsage(0, 1)
        held = f"tree {usage.allocated / MiB:.0f} MiB in {usage.entries} inodes"
        if v.filesystem == "swap" or v.size is not None:
            size = round_mib(v.size or 0)
            least = needed(v.filesystem, usage, 0, size) if v.filesystem != "swap" else size
            if size < least:
                raise TooSmall(
                    f"partition {name} ({v.filesystem}) of {size // MiB} MiB cannot hold its "
                    f'{held} (set its size to at least {least // MiB} MiB, or "auto")'
                )
            sizes.append(size)
            reasons.append(
                f"{name} {v.filesystem} {size // MiB} MiB as set"
                + ("" if v.filesystem == "swap" else f" ({held})")
            )
        else:
            size = needed(v.filesystem, usage, extra_each)
            sizes.append(size)
            reasons.append(
                f"{name} {v.filesystem} {size // MiB} MiB auto ({held}, "
                f"+{extra_each // MiB} MiB extra_size)"
            )
    total = boot + sum(sizes)
    if fixed is not None:
        disk = round_mib(fixed)
        spare = disk - total
        if spare < 0:
            raise TooSmall(
                f"image.size {fixed / MiB:.0f} MiB cannot hold the partitions "
                f'({total // MiB} MiB; set at least {total // MiB} MiB, or "auto")'
            )
        if autos:  # whole MiB each, the rest to the first
            each = spare // len(autos) // MiB * MiB
            for i in autos:
                share = each + (spare - each * len(autos) if i == autos[0] else 0)
                sizes[i] += share
                reasons[i] += f", +{share // MiB} MiB of image.size"
        total = disk
    root = next(s for v, s in zip(volumes, sizes, strict=True) if v.mountpoint == "/")
    reason = (
        "; ".join(reasons)
        + f"; +{boot // MiB} MiB for the {layout.name} layout → disk {total // MiB} MiB"
    )
    return PartitionSizes([s // MiB for s in sizes], DiskSize(total, root, reason))
