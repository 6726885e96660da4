"""assemble: the raw disk from the finalised tree, without loop devices or mounts.

A sparse file, partitioned by sfdisk from the layout's data, the filesystem made by
mkfs.ext4 -d straight into the root partition's byte range, then the boot code. Last,
the trim: blocks that hold only zeros become holes, so the raw and every conversion of it
read and store less. With --loop, the filesystem is made on a loop device's partition and
the tree copied onto it mounted instead (diskimage-builder's way).

What the tools would draw at random or read from the clock (the partition table's ids,
ext4's hash seed, the ESP's serial, every timestamp) comes from the job's key and the
cell's epoch, so the same tree gives the same disk, byte for byte (not on the --loop way:
the kernel writes its own times and allocation).
"""

from __future__ import annotations

import os
from pathlib import Path

from factory import layouts, loopdev, proc, repro, sizing
from factory.arches import BootMethod
from factory.fsutil import aside
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams, diskfile, partitions
from factory.stages.ext4 import clamp_script, clamp_times, hash_seed, mkfs_args, partition


class Params(StageParams):
    family: str
    arch: str
    layout: layouts.Layout  # its data: the key covers every partition
    boot: tuple[BootMethod, ...]  # what the boot code is written for
    size: int | None  # None: the tree's size plus extra_size
    extra_size: int
    filesystem: str
    root_uuid: str
    # The user's partitions, in place of the layout's root (and their UUIDs).
    volumes: tuple[layouts.Volume, ...] = ()
    epoch: int


async def _fill_through_loop(
    ctx: Context, disk: Path, tree: Path, layout: layouts.Layout, uuid: str, size: int
) -> None:
    """diskimage-builder's way, for kernels and tools where it is wanted: a loop device,
    its partitions from partx, mkfs on the root partition, the tree copied onto it
    mounted, fstrim; each undone on every exit path."""
    number = layout.number("root")
    ctx.emit("loop device")
    async with (
        loopdev.attached(disk) as device,
        loopdev.partitions(device, len(layout.partitions)) as parts,
    ):
        ctx.emit(f"mkfs.ext4 {parts[number - 1]}")
        await proc.run(
            mkfs_args(None, parts[number - 1], uuid, None, size, hash_seed(ctx.job.key)),
            env=repro.source_date_env(int(ctx.job.params["epoch"])),
        )
        async with loopdev.mount(parts[number - 1], disk.parent / "mnt") as point:
            ctx.emit("copying tree")
            await proc.run(["cp", "-a", f"{tree}/.", point])
            await proc.run(["fstrim", point])


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    if p.volumes:
        return await partitions.run(ctx, p)
    env = repro.source_date_env(p.epoch)
    layout = p.layout
    tree = ctx.input_path("finalise")
    ctx.emit("sizing")
    try:
        usage = await sizing.measure_async(tree)
        size = sizing.disk_size(usage, layout, p.extra_size, p.size)
    except sizing.TooSmall as exc:
        raise StageError(str(exc)) from None
    work = ctx.layout_work(layout.name)
    disk = work / "disk.raw"
    tmp = aside(disk)
    try:
        await diskfile.blank(ctx, tmp, layout, size.disk)
        root_offset, root_size = layout.offsets(size.disk)["root"]
        fs = partition(tmp, root_offset)
        if ctx.ws.loop:
            await _fill_through_loop(ctx, tmp, tree, layout, p.root_uuid, root_size)
        else:
            ctx.emit("mkfs.ext4 -d")
            args = mkfs_args(tree, tmp, p.root_uuid, root_offset, root_size, hash_seed(ctx.job.key))
            await proc.run(args, env=env)
            ctx.emit("inode times")
            await clamp_times(fs, tree, p.epoch, work)
        # tune2fs stamps the superblock's write time with the clock unless told the epoch.
        await proc.run(["tune2fs", "-c", "0", "-i", "0", "-e", "remount-ro", fs], env=env)
        await diskfile.boot_code(ctx, tmp, tree, layout, p, work)
        await proc.run(["e2fsck", "-fn", fs], env=env)
        trimmed = await diskfile.trim(ctx, tmp)
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


__all__ = ["Params", "clamp_script", "clamp_times", "hash_seed", "mkfs_args", "partition", "run"]

STAGE = Stage(
    kind="assemble",
    recipe=1,
    params=Params,
    run=run,
    cost=lambda p: 3.0,  # rough CPU seconds on a warm cache
    module=__name__,
)
