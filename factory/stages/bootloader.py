"""Boot code written straight into a disk image file: no loop device, no mount.

grub's images are made with grub-mkimage from the target tree's own modules (the host's
grub may lack the target platform), with an early config that finds the root filesystem
by UUID. The ESP is a FAT made in place by mkfs.vfat --offset and filled with mtools,
since the kernel here may have no vfat and nothing may mount the image. Its serial
comes from the job's key and its times from the cell's epoch, so it is the same on every
build.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from factory import arches, proc, repro
from factory.arches import Arch, BootMethod
from factory.layouts import GRUB_MODULES, SECTOR, Layout
from factory.results import StageError

I386_MODULES = ("biosdisk", "part_msdos", "part_gpt", "ext2", "search_fs_uuid", "normal")
EFI_MODULES = ("part_gpt", "part_msdos", "ext2", "search_fs_uuid", "normal")
PPC_MODULES = ("part_msdos", "ext2", "search_fs_uuid", "normal", "linux")

# Where grub-mkimage's i386-pc images keep the sector of the next stage (grub's
# boot/i386/pc/boot.S and diskboot.S): boot.img's kernel_sector, and the first
# blocklist entry at the end of core.img's first sector (diskboot). Both u64 LE.
BOOT_KERNEL_SECTOR = 0x5C
DISKBOOT_BLOCKLIST_START = 0x1F4
MBR_CODE = 440  # boot.img bytes that fit before the disk signature and partition table


@dataclass(frozen=True)
class SignedEfi:
    """Where a tree keeps the signed EFI binaries of an arch: where it has shim and the
    signed grub, the ESP gets both (boots with Secure Boot on), else an unsigned grub
    from grub-mkimage."""

    shim: str
    mok_manager: str
    grub: str

    @classmethod
    def of(cls, arch: Arch) -> SignedEfi:
        efi, platform = arch.efi, arch.grub["uefi"]
        return cls(
            f"usr/lib/shim/shim{efi}.efi.signed",
            f"usr/lib/shim/mm{efi}.efi.signed",
            f"usr/lib/grub/{platform}-signed/grub{efi}.efi.signed",
        )


@dataclass(frozen=True)
class BootFs:
    """The filesystem grub reads its config, modules and the kernel from: /boot's own
    partition (where they sit at its top), or root's."""

    uuid: str
    prefix: str  # grub's folder on it
    module: str  # the grub module that reads it

    @classmethod
    def of(cls, layout: Layout, root_uuid: str) -> BootFs:
        part = layout.boot_partition()
        module = GRUB_MODULES[part.filesystem or "ext4"]
        if part.mountpoint == "/boot" and part.uuid is not None:
            return cls(part.uuid, "/grub", module)
        return cls(root_uuid, "/boot/grub", module)

    def modules(self, base: Sequence[str]) -> tuple[str, ...]:
        """`base` (which reads ext2/3/4) reading this filesystem instead."""
        return tuple(self.module if m == "ext2" else m for m in base)


def early_cfg(uuid: str, prefix: str = "/boot/grub") -> str:
    return f"search.fs_uuid {uuid} root\nset prefix=($root){prefix}\n"


def esp_grub_cfg(uuid: str, prefix: str = "/boot/grub") -> str:
    """What a distro's signed grub reads from its prefix (/EFI/VENDOR on the ESP)."""
    return (
        f"search --no-floppy --fs-uuid --set=root {uuid}\n"
        f"set prefix=($root){prefix}\n"
        "configfile $prefix/grub.cfg\n"
    )


def patch_gpt_bios(boot: bytes, core: bytes, core_lba: int) -> tuple[bytes, bytes]:
    """boot.img and core.img for a core.img at `core_lba` (the BIOS boot partition):
    what grub-bios-setup would write, which refuses a plain file."""
    b, c = bytearray(boot[:MBR_CODE]), bytearray(core)
    struct.pack_into("<Q", b, BOOT_KERNEL_SECTOR, core_lba)
    struct.pack_into("<Q", c, DISKBOOT_BLOCKLIST_START, core_lba + 1)
    return bytes(b), bytes(c)


@dataclass(frozen=True)
class EspFile:
    """A file for the ESP: its path there and where its bytes are."""

    dest: str  # e.g. "EFI/BOOT/BOOTX64.EFI"
    source: Path


def _write_at(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


async def _mkimage(
    tree: Path, platform: str, modules: Sequence[str], boot: BootFs, work: Path, out: Path
) -> Path:
    moddir = tree / "usr/lib/grub" / platform
    if not moddir.is_dir():
        raise StageError(f"the tree has no grub modules for {platform} (/usr/lib/grub/{platform})")
    cfg = work / f"early-{platform}.cfg"
    cfg.write_text(early_cfg(boot.uuid, boot.prefix))
    await proc.run(
        [
            "grub-mkimage",
            "-O",
            platform,
            "-d",
            moddir,
            "-c",
            cfg,
            "-p",
            boot.prefix,
            "-o",
            out,
            *boot.modules(modules),
        ]
    )
    return out


async def _core_img(
    tree: Path, platform: str, modules: Sequence[str], boot: BootFs, work: Path
) -> bytes:
    out = await _mkimage(tree, platform, modules, boot, work, work / f"core-{platform}.img")
    return out.read_bytes()


async def install_bios_mbr(
    disk: Path, tree: Path, layout: Layout, boot: BootFs, work: Path, platform: str = "i386-pc"
) -> None:
    """BIOS on a dos label: boot.img's code in sector 0 (the partition table kept),
    core.img in the gap before the first partition; no sector numbers to patch."""
    core = await _core_img(tree, platform, I386_MODULES, boot, work)
    gap = layout.first_mib * 1024 * 1024 - SECTOR
    if len(core) > gap:
        raise StageError(f"core.img is {len(core)} bytes, the gap after the MBR only {gap}")
    boot_img = (tree / "usr/lib/grub" / platform / "boot.img").read_bytes()
    _write_at(disk, 0, boot_img[:MBR_CODE])
    _write_at(disk, SECTOR, core)


async def install_gpt_bios(
    disk: Path, tree: Path, layout: Layout, boot: BootFs, work: Path, platform: str = "i386-pc"
) -> None:
    """BIOS on a GPT: core.img in the BIOS boot partition, boot.img's code in the
    protective MBR (its partition entry kept), both told where core.img lies."""
    start, size = layout.offsets(disk.stat().st_size)["bios"]
    core = await _core_img(tree, platform, I386_MODULES, boot, work)
    if len(core) > size:
        raise StageError(f"core.img is {len(core)} bytes, the BIOS boot partition only {size}")
    boot_img = (tree / "usr/lib/grub" / platform / "boot.img").read_bytes()
    boot_img, core = patch_gpt_bios(boot_img, core, start // SECTOR)
    _write_at(disk, 0, boot_img)
    _write_at(disk, start, core)


async def esp_files(tree: Path, boot: BootFs, work: Path, arch: Arch, vendor: str) -> list[EspFile]:
    """shim as the removable-media loader with the distro's signed grub beside it (its
    config is read from /EFI/VENDOR), or else an unsigned grub with an early config."""
    efi, signed = arch.efi, SignedEfi.of(arch)
    loader = f"EFI/BOOT/BOOT{efi.upper()}.EFI"
    if (tree / signed.shim).is_file() and (tree / signed.grub).is_file():
        cfg = work / "esp-grub.cfg"
        cfg.write_text(esp_grub_cfg(boot.uuid, boot.prefix))
        files = [
            EspFile(loader, tree / signed.shim),
            EspFile(f"EFI/BOOT/grub{efi}.efi", tree / signed.grub),
            EspFile(f"EFI/{vendor}/grub.cfg", cfg),
        ]
        if (tree / signed.mok_manager).is_file():
            files.append(EspFile(f"EFI/BOOT/mm{efi}.efi", tree / signed.mok_manager))
        return files
    platform = arch.grub["uefi"]
    grub = await _mkimage(tree, platform, EFI_MODULES, boot, work, work / f"grub{efi}.efi")
    return [EspFile(loader, grub)]


def esp_serial(seed: str) -> str:
    """The FAT volume serial (mkfs.vfat -i, 8 hex digits), random unless given."""
    return repro.seeded_bytes(seed, "esp-serial", 4).hex()


def mkfs_vfat_args(disk: Path, offset: int, size: int, serial: str) -> list[str]:
    """mkfs.vfat into a byte range of `disk`. --invariant: dosfstools 4.2 ignores
    SOURCE_DATE_EPOCH and stamps the volume label's entry with the clock; with it the
    time is a constant, and the serial given after it still wins."""
    return [
        "mkfs.vfat",
        "-F",
        "32",
        "-s",
        "1",
        "-n",
        "EFI",
        "--invariant",
        "-i",
        serial,
        f"--offset={offset // SECTOR}",
        str(disk),
        str(size // 1024),
    ]


async def make_esp(
    disk: Path, offset: int, size: int, files: Sequence[EspFile], *, epoch: int, seed: str
) -> None:
    """A FAT32 in the ESP's byte range, filled by mtools. One-sector clusters: mtools
    cannot read the FAT mkfs.vfat lays out with larger ones at an offset. mtools stamps
    directories and files with SOURCE_DATE_EPOCH (no -m: some sources were just
    written here and carry the clock)."""
    env = repro.source_date_env(epoch)
    await proc.run(mkfs_vfat_args(disk, offset, size, esp_serial(seed)), env=env)
    image = f"{disk}@@{offset}"
    dirs = sorted({p for f in files for p in _parents(f.dest)})
    if dirs:
        await proc.run(["mmd", "-i", image, *(f"::/{d}" for d in dirs)], env=env)
    for f in files:
        await proc.run(["mcopy", "-i", image, f.source, f"::/{f.dest}"], env=env)


def _parents(dest: str) -> list[str]:
    parts = dest.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


async def install_uefi(
    disk: Path,
    tree: Path,
    layout: Layout,
    boot: BootFs,
    work: Path,
    *,
    arch: Arch,
    vendor: str,
    epoch: int,
    seed: str,
) -> None:
    """The ESP: a FAT with the EFI loaders, made in its byte range."""
    start, size = layout.offsets(disk.stat().st_size)["esp"]
    files = await esp_files(tree, boot, work, arch, vendor)
    await make_esp(disk, start, size, files, epoch=epoch, seed=seed)


async def install_prep(
    disk: Path, tree: Path, layout: Layout, boot: BootFs, work: Path, platform: str
) -> None:
    """Open Firmware (SLOF) loads the ELF it finds in the PReP partition."""
    start, size = layout.offsets(disk.stat().st_size)["prep"]
    core = await _core_img(tree, platform, PPC_MODULES, boot, work)
    if len(core) > size:
        raise StageError(f"core.elf is {len(core)} bytes, the PReP partition only {size}")
    _write_at(disk, start, core)


async def install(
    disk: Path,
    tree: Path,
    layout: Layout,
    methods: Sequence[BootMethod],
    uuid: str,
    work: Path,
    *,
    arch: str,
    vendor: str,
    epoch: int,
    seed: str,
) -> None:
    """The boot code of every boot method the disk has (a GPT disk may boot by BIOS and
    by UEFI); `epoch` and `seed` (the job's key) stand for the clock and the randomness of
    the tools that would use them (only the ESP's do). grub reads /boot from its own
    partition where the layout has one."""
    a = arches.get(arch)
    boot = BootFs.of(layout, uuid)
    for method in sorted(methods, key=arches.BOOT_METHODS.index):  # one order: one disk
        platform = a.grub[method]
        if method == "bios-mbr":
            await install_bios_mbr(disk, tree, layout, boot, work, platform)
        elif method == "bios-gpt":
            await install_gpt_bios(disk, tree, layout, boot, work, platform)
        elif method == "uefi":
            await install_uefi(
                disk, tree, layout, boot, work, arch=a, vendor=vendor, epoch=epoch, seed=seed
            )
        elif method == "prep":
            await install_prep(disk, tree, layout, boot, work, platform)
        else:
            raise StageError(f"no boot code for boot method {method!r}")
