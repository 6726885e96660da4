"""What every disk assemble makes goes through, whichever way its filesystems are made:
the blank partitioned file, the boot code, and the trim at the end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from factory import distros, proc
from factory.layouts import Layout
from factory.stages import Context, bootloader

if TYPE_CHECKING:
    from factory.stages.assemble import Params


async def blank(ctx: Context, disk: Path, layout: Layout, size: int) -> None:
    """A sparse file of `size` bytes with the layout's partition table (its ids from the
    job's key)."""
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as fh:
        fh.truncate(size)
    await proc.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk],
        input=layout.sfdisk_script(size, ctx.job.key).encode(),
    )


async def boot_code(
    ctx: Context, disk: Path, tree: Path, layout: Layout, p: Params, work: Path
) -> None:
    """The boot code of each of the job's boot methods, written into `disk`."""
    ctx.emit("boot code")
    await bootloader.install(
        disk, tree, layout, p.boot, p.root_uuid, work,
        arch=p.arch, vendor=distros.get(p.family).efi_vendor, epoch=p.epoch,
        seed=ctx.job.key,
    )  # fmt: skip


async def trim(ctx: Context, disk: Path) -> int:
    """Blocks of `disk` that hold only zeros made holes; the bytes freed."""
    ctx.emit("trim")
    allocated = disk.stat().st_blocks * 512
    # Where the filesystem of OUT cannot punch holes, the disk is only bigger.
    await proc.run(["fallocate", "--dig-holes", disk], check=False)
    return allocated - disk.stat().st_blocks * 512
