"""assemble's way for a user's partitions ([[image.partitions]]): the tree split by mount
point, each part made into its partition's filesystem.

Rootless where the tool keeps the tree faithfully (owners, modes, xattrs, hard links,
device nodes): `mkfs.ext4 -d` at the partition's offset, `mkfs.btrfs --rootdir` and
`mkswap` into a file of their own that is then copied into the disk, a FAT by
`mkfs.vfat --offset` and mtools (which keep no owners: said in the job's events).
mkfs.xfs here cannot fill a filesystem from a folder, so an XFS is made in a file of its
own, mounted through a loop device and filled by `cp -a`, and the run's events say so;
with --loop every ext4 and btrfs goes that way too. A partition whose mount point has
partitions of its own below it is filled from a copy of its part of the tree with those
folders emptied (they stay as mount points, with their owners, modes and times).

ext4 partitions are as reproducible as the default disk (seeded UUID and hash seed, the
epoch's times); btrfs and XFS get seeded UUIDs, but their tools stamp times and draw
other ids of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from factory import fsutil, layouts, loopdev, proc, repro, sizing
from factory.fsutil import aside
from factory.layouts import Partition
from factory.results import Output, StageError
from factory.stages import Context, diskfile, ext4

if TYPE_CHECKING:
    from factory.stages.assemble import Params

LABEL_MAX = {"ext4": 16, "xfs": 12, "btrfs": 255, "vfat": 11, "swap": 16}


def label(part: Partition) -> str:
    """The filesystem's label: the GPT name (root, boot, var, srv-data, swap), cut to
    what the filesystem takes (FAT: upper case)."""
    name = part.name or layouts.gpt_name_of(part.mountpoint, part.filesystem or "ext4")
    name = name[: LABEL_MAX[part.filesystem or "ext4"]]
    return name.upper() if part.filesystem == "vfat" else name


def nested_in(point: str, mountpoints: list[str]) -> list[str]:
    """The mount points strictly below `point`."""
    return [m for m in mountpoints if m != point and (point == "/" or m.startswith(point + "/"))]


def _empty_folders(stage: Path, tree: Path, point: str, inner: list[str]) -> None:
    """Empty each inner mount point in the copy, its own owner, mode and times kept."""
    for m in inner:
        rel = Path(m).relative_to(point)
        folder = stage / rel
        if not folder.is_dir() or folder.is_symlink():
            continue
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        st = os.lstat(tree / m.lstrip("/"))
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@contextlib.asynccontextmanager
async def staged(tree: Path, point: str, mountpoints: list[str], work: Path) -> AsyncIterator[Path]:
    """The part of `tree` that goes into the filesystem at `point`: the tree's own folder,
    or a copy without what other partitions below it hold (removed at the end)."""
    src = tree / point.lstrip("/") if point != "/" else tree
    inner = nested_in(point, mountpoints)
    if not inner:
        yield src
        return
    stage = work / f"stage{point.replace('/', '-') if point != '/' else '-root'}"
    try:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(stage, ignore_errors=True))
        await proc.run(["cp", "-a", "--reflink=auto", f"{src}/.", stage])
        await anyio.to_thread.run_sync(_empty_folders, stage, tree, point, inner)
        yield stage
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(stage, ignore_errors=True))


def _place(image: Path, disk: Path, offset: int) -> None:
    """Copy `image`'s data (its holes skipped: the disk is zeros there) into `disk` at
    `offset`. Blocking: run it in a thread."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        for start, length in fsutil.data_extents(image):
            pos, end = start, start + length
            while pos < end:
                chunk = os.pread(src.fileno(), min(8 * layouts.MiB, end - pos), pos)
                if not chunk:
                    break
                os.pwrite(dst.fileno(), chunk, offset + pos)
                pos += len(chunk)


@contextlib.asynccontextmanager
async def image_file(work: Path, name: str, size: int) -> AsyncIterator[Path]:
    """A sparse file of `size` for a filesystem made on its own, removed at the end."""
    path = work / f"{name}.img"
    path.unlink(missing_ok=True)
    try:
        with open(path, "wb") as fh:
            fh.truncate(size)
        os.chmod(path, 0o600)
        yield path
    finally:
        path.unlink(missing_ok=True)


def kernel_has(filesystem: str) -> bool:
    """Whether this kernel mounts `filesystem` now (built in, or its module loaded)."""
    with open("/proc/filesystems", encoding="ascii") as fh:
        return filesystem in {line.split()[-1] for line in fh if line.strip()}


async def probe_kernel(filesystem: str, point: str) -> None:
    """A filesystem the kernel here cannot mount, said before any mkfs: its module is
    loaded if it is not yet (a container may not be allowed to)."""
    if kernel_has(filesystem):
        return
    await proc.run(["modprobe", filesystem], check=False)
    if not kernel_has(filesystem):
        raise StageError(
            f"partition {point}: this kernel cannot mount {filesystem} (not in "
            f"/proc/filesystems, and modprobe {filesystem} failed; load the module on the "
            "host, or build this matrix on a host whose kernel has it)"
        )


async def _fill_mounted(image: Path, src: Path, point: Path) -> None:
    """The tree's part copied onto the filesystem in `image`, mounted through a loop
    device; each undone on every exit path."""
    async with loopdev.attached(image) as device, loopdev.mount(device, point) as mnt:
        await proc.run(["cp", "-a", f"{src}/.", mnt])
        await proc.run(["fstrim", mnt], check=False)


async def make(
    ctx: Context,
    disk: Path,
    part: Partition,
    span: tuple[int, int],
    src: Path | None,
    work: Path,
    epoch: int,
) -> None:
    """One partition's filesystem, made and filled from `src` (None: left empty)."""
    offset, size = span
    fs, uuid, name = part.filesystem, str(part.uuid), label(part)
    point = part.mountpoint or "swap"
    env = repro.source_date_env(epoch)
    seed = f"{ctx.job.key}:{point}"
    tag = point.strip("/").replace("/", "-") or "root"
    mounted = src is not None and (fs == "xfs" or (ctx.ws.loop and fs in ("ext4", "btrfs")))
    if mounted:
        await probe_kernel(str(fs), point)
        why = "--loop" if fs != "xfs" else "mkfs.xfs cannot fill a filesystem from a folder"
        ctx.emit(f"{point}: {fs} filled through a loop device and a mount ({why})")
    else:
        ctx.emit(f"{point}: {fs}" + (" (empty)" if src is None and fs != "swap" else ""))
    if fs == "ext4" and not mounted:
        target = ext4.partition(disk, offset)
        await proc.run(
            ext4.mkfs_args(
                src, disk, uuid, offset, size, ext4.hash_seed(seed), name, sizing.ext4_journal(size)
            ),
            env=env,
        )
        if src is not None:
            await ext4.clamp_times(target, src, epoch, work)
        await proc.run(["tune2fs", "-c", "0", "-i", "0", "-e", "remount-ro", target], env=env)
        return
    if fs == "vfat":
        serial = uuid.replace("-", "").lower()  # the plan's XXXX-XXXX: fstab names it
        await proc.run(
            ["mkfs.vfat", "-F", "32", "-s", "1", "-n", name, "--invariant", "-i", serial,
             f"--offset={offset // layouts.SECTOR}", str(disk), str(size // 1024)],
            env=env,
        )  # fmt: skip
        if src is not None and any(src.iterdir()):
            ctx.emit(f"{point}: vfat keeps no owners, modes, symlinks or hard links")
            entries = sorted(src.iterdir())
            await proc.run(["mcopy", "-s", "-i", f"{disk}@@{offset}", *entries, "::/"], env=env)
        return
    async with image_file(work, f"part-{tag}", size) as image:
        if fs == "swap":
            await proc.run(["mkswap", "-q", "-U", uuid, "-L", name, image], env=env)
        elif fs == "btrfs":
            fill = ["--rootdir", str(src)] if src is not None and not mounted else []
            await proc.run(
                ["mkfs.btrfs", "-q", "-f", "-U", uuid, "-L", name, *fill, image], env=env
            )
        elif fs == "xfs":
            await proc.run(
                ["mkfs.xfs", "-q", "-f", "-m", f"uuid={uuid}", "-L", name, image], env=env
            )
        elif fs == "ext4":
            await proc.run(
                ext4.mkfs_args(
                    None,
                    image,
                    uuid,
                    None,
                    size,
                    ext4.hash_seed(seed),
                    name,
                    sizing.ext4_journal(size),
                ),
                env=env,
            )
        else:
            raise StageError(f"partition {point}: no way to make {fs}")
        if mounted and src is not None:
            await _fill_mounted(image, src, work / f"mnt-{tag}")
        await anyio.to_thread.run_sync(_place, image, disk, offset)


async def check(disk: Path, part: Partition, offset: int, epoch: int) -> None:
    """A read-only check of what the tools can check in a file: ext4 and btrfs."""
    if part.filesystem == "ext4":
        target = ext4.partition(disk, offset)
        await proc.run(["e2fsck", "-fn", target], env=repro.source_date_env(epoch))


async def run(ctx: Context, p: Params) -> Output:
    """The disk of a layout whose root is the user's partitions."""
    tree = ctx.input_path("finalise")
    ctx.emit("sizing")
    filled = [v.mountpoint for v in p.volumes if v.mountpoint is not None and not v.empty]
    usages = await anyio.to_thread.run_sync(sizing.measure_split, tree, filled)
    try:
        sized = sizing.partition_sizes(usages, p.volumes, p.layout, p.extra_size, p.size)
    except sizing.TooSmall as exc:
        raise StageError(str(exc)) from None
    layout = layouts.compose(p.layout, p.volumes, sized.mib)
    size = sized.disk
    work = ctx.layout_work(layout.name)
    disk = work / "disk.raw"
    tmp = aside(disk)
    info: list[dict[str, object]] = []
    try:
        await diskfile.blank(ctx, tmp, layout, size.disk)
        spans = layout.spans(size.disk)
        for number, (part, span) in enumerate(zip(layout.partitions, spans, strict=True), 1):
            if part.uuid is None:  # the boot method's: made with the boot code
                continue
            point = part.mountpoint
            if point is None or part.empty or not (tree / point.lstrip("/")).is_dir():
                await make(ctx, tmp, part, span, None, work, p.epoch)  # nothing of the tree
            else:
                async with staged(tree, point, filled, work) as src:
                    await make(ctx, tmp, part, span, src, work, p.epoch)
            info.append(
                {
                    "number": number,
                    "mountpoint": point,
                    "filesystem": part.filesystem,
                    "uuid": part.uuid,
                    "offset": span[0],
                    "size": span[1],
                }
            )
        await diskfile.boot_code(ctx, tmp, tree, layout, p, work)
        for part, (offset, _) in zip(layout.partitions, spans, strict=True):
            if part.uuid is not None:
                await check(tmp, part, offset, p.epoch)
        trimmed = await diskfile.trim(ctx, tmp)
        os.replace(tmp, disk)
    finally:
        tmp.unlink(missing_ok=True)
    root_offset = next(
        s[0] for q, s in zip(layout.partitions, spans, strict=True) if q.role == "root"
    )
    return Output(
        disk,
        {
            "virtual_size": size.disk,
            "filesystem_bytes": size.filesystem,
            "size_reason": size.reason,
            "shared": True,
            "root_offset": root_offset,
            "trimmed_bytes": trimmed,
            "partitions": info,
        },
    )
