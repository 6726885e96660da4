"""Boot code written straight into a disk image file: no loop device, no mount.

grub's images are made with grub-mkimage from the target tree's own modules, with an
early config that finds the root filesystem by UUID.
"""

from __future__ import annotations

from pathlib import Path

from factory import proc
from factory.layouts import SECTOR, Layout
from factory.results import StageError

I386_MODULES = ("biosdisk", "part_msdos", "part_gpt", "ext2", "search_fs_uuid", "normal")


def early_cfg(uuid: str) -> str:
    return f"search.fs_uuid {uuid} root\nset prefix=($root)/boot/grub\n"


def _write_at(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


async def _core_img(
    tree: Path, platform: str, modules: tuple[str, ...], uuid: str, work: Path
) -> bytes:
    cfg = work / f"early-{platform}.cfg"
    cfg.write_text(early_cfg(uuid))
    out = work / f"core-{platform}.img"
    await proc.run(
        [
            "grub-mkimage",
            "-O",
            platform,
            "-d",
            tree / "usr/lib/grub" / platform,
            "-c",
            cfg,
            "-p",
            "/boot/grub",
            "-o",
            out,
            *modules,
        ]
    )
    return out.read_bytes()


async def install_mbr(disk: Path, tree: Path, layout: Layout, uuid: str, work: Path) -> None:
    """BIOS on a dos label: boot.img's code in sector 0 (the partition table kept),
    core.img in the gap before the first partition; no sector numbers to patch."""
    core = await _core_img(tree, "i386-pc", I386_MODULES, uuid, work)
    gap = layout.first_mib * 1024 * 1024 - SECTOR
    if len(core) > gap:
        raise StageError(f"core.img is {len(core)} bytes, the gap after the MBR only {gap}")
    boot = (tree / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    _write_at(disk, 0, boot[:440])
    _write_at(disk, SECTOR, core)


async def install(disk: Path, tree: Path, layout: Layout, uuid: str, work: Path) -> None:
    if layout.name == "mbr":
        await install_mbr(disk, tree, layout, uuid, work)
        return
    raise StageError(f"boot code for the {layout.name} layout is not built yet")
