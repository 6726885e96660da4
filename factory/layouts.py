"""Partition layouts as data, the boot methods they allow, and the sfdisk scripts made from them.

A layout is a list of partitions (role, size, type, filesystem, mount point, flags). What
boots a disk follows from its partitions and its arch (`boot_methods`): a BIOS boot
partition on a GPT means bios-gpt, an ESP means uefi, a PReP partition means prep, a dos
label on an arch whose BIOS reads an MBR means bios-mbr. The stages branch on those
methods, never on a layout's name, and the assemble job's params carry the layout's data,
so its key covers every partition.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from factory import arches, repro
from factory.arches import BootMethod

MiB = 1024 * 1024
SECTOR = 512

Role = Literal["root", "prep", "esp", "bios", "data", "swap"]
Flag = Literal["bootable"]
Filesystem = Literal["ext4", "xfs", "btrfs", "vfat", "swap"]
FILESYSTEMS: tuple[Filesystem, ...] = ("ext4", "xfs", "btrfs", "vfat", "swap")
# The roles a layout brings for its boot method; one partition each.
BOOT_ROLES: tuple[Role, ...] = ("bios", "esp", "prep")

# What grub (every boot method's loader here) reads /boot from, by the module its images
# need: grub 2.06 reads ext2/3/4, XFS (v5 with bigtime), btrfs and FAT.
GRUB_MODULES: dict[str, str] = {"ext4": "ext2", "xfs": "xfs", "btrfs": "btrfs", "vfat": "fat"}
BOOT_READS: dict[BootMethod, frozenset[str]] = {
    m: frozenset(GRUB_MODULES) for m in ("bios-mbr", "bios-gpt", "uefi", "prep")
}


class Partition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    type: str  # sfdisk type: MBR hex code or GPT type GUID
    size_mib: int | None  # None: to the end of the disk
    filesystem: str | None = None  # None: the image's filesystem for root; raw for the others
    mountpoint: str | None = None
    flags: tuple[Flag, ...] = ()
    name: str = ""  # the GPT partition name
    uuid: str | None = None  # a user partition's filesystem UUID (root: the image's)
    empty: bool = False  # made, mounted, left empty

    @property
    def fs(self) -> str | None:
        """The filesystem made in it: a root partition without one has the image's."""
        return self.filesystem

    @property
    def bootable(self) -> bool:
        return "bootable" in self.flags


class Layout(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    label: Literal["dos", "gpt"]
    partitions: tuple[Partition, ...]
    first_mib: int = 1
    doc: str = ""

    def roles(self) -> set[str]:
        return {p.role for p in self.partitions}

    def boot_methods(self, arch: str) -> tuple[BootMethod, ...]:
        """How firmware of `arch` can boot a disk of this layout, the arch's preferred first;
        none: the layout does not fit the arch."""
        roles = self.roles()
        found: set[BootMethod] = set()
        if "esp" in roles and self.label == "gpt":
            found.add("uefi")
        if "bios" in roles and self.label == "gpt":
            found.add("bios-gpt")
        if "prep" in roles:
            found.add("prep")
        if self.label == "dos" and "prep" not in roles:
            found.add("bios-mbr")
        return tuple(m for m in arches.get(arch).boot_methods if m in found)

    def fits(self, arch: str) -> bool:
        return bool(self.boot_methods(arch))

    def overhead_mib(self) -> int:
        """Disk space besides the root partition: start gap, fixed partitions, GPT backup."""
        fixed = sum(p.size_mib or 0 for p in self.partitions)
        return self.first_mib + fixed + (1 if self.label == "gpt" else 0)

    def spans(self, disk_bytes: int) -> list[tuple[int, int]]:
        """Byte (offset, size) of each partition, in table order, on a disk of `disk_bytes`."""
        end = disk_bytes - (MiB if self.label == "gpt" else 0)
        out: list[tuple[int, int]] = []
        pos = self.first_mib * MiB
        for p in self.partitions:
            size = p.size_mib * MiB if p.size_mib is not None else end - pos
            if size <= 0 or pos + size > end:
                raise ValueError(f"disk of {disk_bytes} bytes is too small for layout {self.name}")
            out.append((pos, size))
            pos += size
        return out

    def offsets(self, disk_bytes: int) -> dict[Role, tuple[int, int]]:
        """Byte (offset, size) of the partition of each role (the first, for data)."""
        out: dict[Role, tuple[int, int]] = {}
        for p, span in zip(self.partitions, self.spans(disk_bytes), strict=True):
            out.setdefault(p.role, span)
        return out

    def root(self) -> Partition:
        return next(p for p in self.partitions if p.role == "root")

    def boot_partition(self) -> Partition:
        """Where grub finds /boot: a partition of its own, else root's."""
        return next((p for p in self.partitions if p.mountpoint == "/boot"), self.root())

    def user_defined(self) -> bool:
        """Whether the partitions besides the boot method's came from [[image.partitions]]."""
        return any(p.uuid is not None for p in self.partitions)

    def number(self, role: Role) -> int:
        """The partition number (from 1) of the partition of `role`."""
        return [p.role for p in self.partitions].index(role) + 1

    def sfdisk_script(self, disk_bytes: int, seed: str | None = None) -> str:
        """The table for sfdisk; with `seed` (the job's key) the identifiers sfdisk would
        draw at random (the disk's label-id, each GPT partition's uuid) come from it."""
        lines = [f"label: {self.label}", "unit: sectors"]
        if seed is not None:
            lines.append(f"label-id: {label_id(self.label, seed)}")
        if self.label == "gpt":
            lines.append(f"last-lba: {disk_bytes // SECTOR - 34}")
        for n, (p, (start, size)) in enumerate(
            zip(self.partitions, self.spans(disk_bytes), strict=True)
        ):
            fields = [f"start={start // SECTOR}", f"size={size // SECTOR}", f"type={p.type}"]
            if seed is not None and self.label == "gpt":
                # Data and swap partitions may be many: their number tells them apart.
                tag = p.role if p.role in (*BOOT_ROLES, "root") else f"{p.role}-{n + 1}"
                fields.append(f"uuid={part_uuid(seed, tag)}")
            if p.bootable:
                fields.append("bootable")
            if p.name and self.label == "gpt":
                fields.append(f'name="{p.name}"')
            lines.append(", ".join(fields))
        return "\n".join(lines) + "\n"


def label_id(label: str, seed: str) -> str:
    """The disk identifier: a GPT disk GUID, or the 32-bit MBR disk signature (never 0,
    which some tools read as "none")."""
    if label == "gpt":
        return str(repro.seeded_uuid(seed, "gpt-disk")).upper()
    return f"0x{int.from_bytes(repro.seeded_bytes(seed, 'dos-disk', 4), 'big') or 1:08x}"


def part_uuid(seed: str, tag: str) -> str:
    """A GPT partition's unique GUID."""
    return str(repro.seeded_uuid(seed, f"gpt-part-{tag}")).upper()


ROOT = {"dos": "83", "gpt": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
SWAP = {"dos": "82", "gpt": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"}
FAT = {"dos": "0c", "gpt": "EBD0A0A2-B9E5-4433-87C0-68B99B26599C"}  # FAT32 LBA; basic data

LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout(
            name="mbr",
            label="dos",
            partitions=(
                Partition(
                    role="root",
                    type=ROOT["dos"],
                    size_mib=None,
                    mountpoint="/",
                    flags=("bootable",),
                ),
            ),
            doc="dos label, one bootable Linux partition from 1 MiB (x86 BIOS)",
        ),
        Layout(
            name="ppc-prep",
            label="dos",
            partitions=(
                Partition(role="prep", type="41", size_mib=8, flags=("bootable",)),
                Partition(role="root", type=ROOT["dos"], size_mib=None, mountpoint="/"),
            ),
            doc="dos label, 8 MiB PReP boot partition, then root (ppc64el)",
        ),
        Layout(
            name="gpt-efi",
            label="gpt",
            partitions=(
                Partition(role="bios", type=BIOS_BOOT, size_mib=1, name="bios"),
                Partition(role="esp", type=ESP, size_mib=64, filesystem="vfat", name="esp"),
                Partition(
                    role="root", type=ROOT["gpt"], size_mib=None, mountpoint="/", name="root"
                ),
            ),
            doc="GPT: BIOS boot, EFI system partition, root (UEFI and BIOS)",
        ),
    )
}


def fitting(arch: str) -> tuple[str, ...]:
    """The layouts that can boot on `arch`, its default first."""
    default = arches.get(arch).default_layout
    return (default, *(n for n, lay in LAYOUTS.items() if n != default and lay.fits(arch)))


def resolve(layout: str, arch: str) -> Layout:
    """The layout a cell uses: `auto` is the arch's default."""
    return LAYOUTS[arches.get(arch).default_layout if layout == "auto" else layout]


class Volume(BaseModel):
    """A partition of the user's ([[image.partitions]]), as the plan hands it on: its
    filesystem's UUID is drawn by the plan, so fstab can name it before the disk exists."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mountpoint: str | None
    filesystem: Filesystem
    size: int | None  # bytes; None: auto (its share of the tree plus extra_size)
    empty: bool = False
    uuid: str


def gpt_name_of(mountpoint: str | None, filesystem: str) -> str:
    """ "root", "swap", or the mount point as a name: /srv/data is srv-data."""
    if mountpoint == "/":
        return "root"
    return mountpoint.strip("/").replace("/", "-") if mountpoint else filesystem


def gpt_name(v: Volume) -> str:
    return gpt_name_of(v.mountpoint, v.filesystem)


def compose(layout: Layout, volumes: tuple[Volume, ...], sizes_mib: list[int]) -> Layout:
    """`layout` with its root partition replaced by the user's partitions of `sizes_mib`
    each, in the order given; the boot method's partitions stay where they were."""
    parts: list[Partition] = []
    for p in layout.partitions:
        if p.role != "root":
            parts.append(p)
            continue
        for v, size in zip(volumes, sizes_mib, strict=True):
            role: Role = (
                "root" if v.mountpoint == "/" else "swap" if v.filesystem == "swap" else "data"
            )
            kind = (SWAP if v.filesystem == "swap" else FAT if v.filesystem == "vfat" else ROOT)[
                layout.label
            ]
            parts.append(
                Partition(
                    role=role,
                    type=kind,
                    size_mib=size,
                    filesystem=v.filesystem,
                    mountpoint=v.mountpoint,
                    flags=p.flags if role == "root" else (),
                    name=gpt_name(v) if layout.label == "gpt" else "",
                    uuid=v.uuid,
                    empty=v.empty,
                )
            )
    return layout.model_copy(update={"partitions": tuple(parts)})
