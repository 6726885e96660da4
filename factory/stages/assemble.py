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
from collections.abc import Iterable, Iterator
from pathlib import Path

import anyio

from factory import distros, layouts, loopdev, proc, repro, sizing
from factory.arches import BootMethod
from factory.fsutil import aside
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams, bootloader


class Params(StageParams):
    family: str
    arch: str
    layout: layouts.Layout  # its data: the key covers every partition
    boot: tuple[BootMethod, ...]  # what the boot code is written for
    size: int | None  # None: the tree's size plus extra_size
    extra_size: int
    filesystem: str
    root_uuid: str
    epoch: int


def partition(disk: Path, offset: int) -> str:
    """e2fsprogs open a filesystem inside an image file with this name."""
    return f"{disk}?offset={offset}"


def mkfs_args(
    tree: Path | None,
    disk: Path | str,
    uuid: str,
    offset: int,
    size: int,
    hash_seed: str | None = None,
) -> list[str]:
    """mkfs.ext4 into a byte range of `disk`, filled from `tree` (None: left empty).
    mke2fs keeps only its last -E, so every extended option goes into one."""
    # The journal is written out as zeros (mkfs's default, not lazy_journal_init): a
    # flashing tool that skips holes must not leave old data where a journal replay
    # would read it.
    extended = [f"offset={offset}"] if tree is not None else []
    if hash_seed is not None:
        extended.append(f"hash_seed={hash_seed}")
    fill = ["-d", str(tree)] if tree is not None else []
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
        *(["-E", ",".join(extended)] if extended else []),
        *fill,
        str(disk),
        f"{size // 1024}k",
    ]


def _debugfs_quote(path: str) -> str:
    """A path as one debugfs argument: in double quotes, a quote doubled."""
    return '"' + path.replace('"', '""') + '"'


def _tree_paths(tree: Path) -> Iterator[str]:
    """Every path under `tree` as the filesystem names it ("/usr/bin"), sorted."""
    for top, dirs, files in os.walk(tree):
        dirs.sort()
        rel = "/" + os.path.relpath(top, tree) if top != str(tree) else ""
        for name in sorted([*dirs, *files]):
            yield f"{rel}/{name}"


def clamp_script(paths: Iterable[str], epoch: int) -> tuple[str, list[str]]:
    """A debugfs script that sets atime and ctime of each path to `epoch`, and the paths
    it cannot name (a newline in them): `mkfs.ext4 -d` copies both from the source tree,
    where the ctime is when the tree was made and the atime when it was last read."""
    lines, skipped = [], []
    for path in paths:
        if "\n" in path:
            skipped.append(path)
            continue
        quoted = _debugfs_quote(path)
        lines.append(f"sif {quoted} atime {epoch}\nsif {quoted} ctime {epoch}\n")
    return "".join(lines), skipped


async def clamp_times(fs: str, tree: Path, epoch: int, work: Path) -> None:
    """The inode times the tree cannot give the same on every build, set to the epoch.
    mtimes are the tree's own, and mkfs's own inodes (/, lost+found) already carry the
    epoch from E2FSPROGS_FAKE_TIME."""
    # A walk of the whole tree: in a worker thread, off the event loop.
    script, skipped = await anyio.to_thread.run_sync(
        lambda: clamp_script(_tree_paths(tree), epoch)
    )
    for path in skipped:
        proc.note(f"times of {path!r} not clamped: debugfs cannot name it")
    cmds = work / "clamp-times.debugfs"
    cmds.write_bytes(script.encode(errors="surrogateescape"))  # names need not be UTF-8
    try:
        # stdout echoes every command: kept out of the log.
        await proc.run(
            ["debugfs", "-w", "-f", cmds, fs], capture=True, env=repro.source_date_env(epoch)
        )
    finally:
        cmds.unlink(missing_ok=True)


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
            mkfs_args(None, parts[number - 1], uuid, 0, size, hash_seed(ctx.job.key)),
            env=repro.source_date_env(int(ctx.job.params["epoch"])),
        )
        async with loopdev.mount(parts[number - 1], disk.parent / "mnt") as point:
            ctx.emit("copying tree")
            await proc.run(["cp", "-a", f"{tree}/.", point])
            await proc.run(["fstrim", point])


def hash_seed(key: str) -> str:
    """ext4's directory hash seed, random unless given."""
    return str(repro.seeded_uuid(key, "ext4-hash-seed"))


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
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
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as fh:
            fh.truncate(size.disk)
        await proc.run(
            ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", tmp],
            input=layout.sfdisk_script(size.disk, ctx.job.key).encode(),
        )
        root_offset, root_size = layout.offsets(size.disk)["root"]
        fs = partition(tmp, root_offset)
        if ctx.ws.loop:
            await _fill_through_loop(ctx, tmp, tree, layout, p.root_uuid, root_size)
        else:
            ctx.emit("mkfs.ext4 -d")
            args = mkfs_args(
                tree, tmp, p.root_uuid, root_offset, root_size, hash_seed(ctx.job.key)
            )
            await proc.run(args, env=env)
            ctx.emit("inode times")
            await clamp_times(fs, tree, p.epoch, work)
        # tune2fs stamps the superblock's write time with the clock unless told the epoch.
        await proc.run(["tune2fs", "-c", "0", "-i", "0", "-e", "remount-ro", fs], env=env)
        ctx.emit("boot code")
        await bootloader.install(
            tmp, tree, layout, p.boot, p.root_uuid, work,
            arch=p.arch, vendor=distros.get(p.family).efi_vendor, epoch=p.epoch,
            seed=ctx.job.key,
        )  # fmt: skip
        await proc.run(["e2fsck", "-fn", fs], env=env)
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


STAGE = Stage(
    kind="assemble",
    recipe=1,
    params=Params,
    run=run,
    cost=lambda p: 3.0,  # rough CPU seconds on a warm cache
    module=__name__,
)
