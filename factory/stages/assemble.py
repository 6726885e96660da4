"""assemble: the raw disk from the finalised tree, without loop devices or mounts.

A sparse file, partitioned by sfdisk from the layout's data, the filesystem made by
mkfs.ext4 -d straight into the root partition's byte range, then the boot code. Last,
the trim: blocks that hold only zeros become holes, so the raw and every conversion of it
read and store less. With --loop, the filesystem is made on a loop device's partition and
the tree copied onto it mounted instead (diskimage-builder's way).
"""

from __future__ import annotations

import os
from pathlib import Path

from factory import layouts, loopdev, proc, sizing
from factory.fsutil import aside
from factory.results import Output, StageError
from factory.stages import Context, bootloader


def partition(disk: Path, offset: int) -> str:
    """e2fsprogs open a filesystem inside an image file with this name."""
    return f"{disk}?offset={offset}"


def mkfs_args(tree: Path | None, disk: Path | str, uuid: str, offset: int, size: int) -> list[str]:
    """mkfs.ext4 into a byte range of `disk`, filled from `tree` (None: left empty)."""
    # The journal is written out as zeros (mkfs's default, not lazy_journal_init): a
    # flashing tool that skips holes must not leave old data where a journal replay
    # would read it.
    fill = ["-E", f"offset={offset}", "-d", str(tree)] if tree is not None else []
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-U",
        uuid,
        "-L",
        "root",
        "-i",
        str(sizing.BYTES_PER_INODE),
        "-J",
        f"size={sizing.JOURNAL // layouts.MiB}",
        *fill,
        str(disk),
        f"{size // 1024}k",
    ]


async def _fill_through_loop(
    ctx: Context, disk: Path, tree: Path, layout: layouts.Layout, uuid: str, size: int
) -> None:
    """diskimage-builder's way, for kernels and tools where it is wanted: a loop device,
    its partitions from partx, mkfs on the root partition, the tree copied onto it
    mounted, fstrim; each undone on every exit path."""
    number = [p.role for p in layout.partitions].index("root") + 1
    ctx.emit("loop device")
    async with (
        loopdev.attached(disk) as device,
        loopdev.partitions(device, len(layout.partitions)) as parts,
    ):
        ctx.emit(f"mkfs.ext4 {parts[number - 1]}")
        await proc.run(mkfs_args(None, parts[number - 1], uuid, 0, size))
        async with loopdev.mount(parts[number - 1], disk.parent / "mnt") as point:
            ctx.emit("copying tree")
            await proc.run(["cp", "-a", f"{tree}/.", point])
            await proc.run(["fstrim", point])


async def run(ctx: Context) -> Output:
    p = ctx.job.params
    layout = layouts.LAYOUTS[p["layout"]]
    tree = ctx.input_path("finalise")
    ctx.emit("sizing")
    try:
        size = sizing.disk_size(sizing.measure(tree), layout, p["extra_size"], p["size"])
    except sizing.TooSmall as exc:
        raise StageError(str(exc)) from None
    work = ctx.layout_work(layout.name)
    disk = work / "disk.raw"
    tmp = aside(disk)
    try:
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as fh:
            fh.truncate(size.disk)
        await proc.run(
            ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", tmp],
            input=layout.sfdisk_script(size.disk).encode(),
        )
        root_offset, root_size = layout.offsets(size.disk)["root"]
        if ctx.ws.loop:
            await _fill_through_loop(ctx, tmp, tree, layout, p["root_uuid"], root_size)
        else:
            ctx.emit("mkfs.ext4 -d")
            await proc.run(mkfs_args(tree, tmp, p["root_uuid"], root_offset, root_size))
        fs = partition(tmp, root_offset)
        await proc.run(["tune2fs", "-c", "0", "-i", "0", "-e", "remount-ro", fs])
        ctx.emit("boot code")
        await bootloader.install(tmp, tree, layout, p["root_uuid"], work)
        await proc.run(["e2fsck", "-fn", fs])
        ctx.emit("trim")
        allocated = tmp.stat().st_blocks * 512
        # Where the filesystem of OUT cannot punch holes, the disk is only bigger.
        await proc.run(["fallocate", "--dig-holes", tmp], check=False)
        trimmed = allocated - tmp.stat().st_blocks * 512
        os.replace(tmp, disk)
    finally:
        tmp.unlink(missing_ok=True)
    return Output(
        disk,
        {
            "virtual_size": size.disk,
            "filesystem_bytes": size.filesystem,
            "size_reason": size.reason,
            "shared": True,
            "root_offset": root_offset,
            "trimmed_bytes": trimmed,
        },
    )
