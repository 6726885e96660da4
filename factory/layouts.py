"""Partition layouts as pure data, and the sfdisk scripts made from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from factory import repro

MiB = 1024 * 1024
SECTOR = 512

Role = Literal["root", "prep", "esp", "bios"]


@dataclass(frozen=True)
class Partition:
    role: Role
    type: str  # sfdisk type: MBR hex code or GPT type GUID
    size_mib: int | None  # None: to the end of the disk
    bootable: bool = False
    name: str = ""


@dataclass(frozen=True)
class Layout:
    name: str
    label: Literal["dos", "gpt"]
    partitions: tuple[Partition, ...]
    first_mib: int = 1
    doc: str = ""

    def overhead_mib(self) -> int:
        """Disk space besides the root partition: start gap, fixed partitions, GPT backup."""
        fixed = sum(p.size_mib or 0 for p in self.partitions)
        return self.first_mib + fixed + (1 if self.label == "gpt" else 0)

    def offsets(self, disk_bytes: int) -> dict[Role, tuple[int, int]]:
        """Byte (offset, size) of each partition on a disk of `disk_bytes`."""
        end = disk_bytes - (MiB if self.label == "gpt" else 0)
        out: dict[Role, tuple[int, int]] = {}
        pos = self.first_mib * MiB
        for p in self.partitions:
            size = p.size_mib * MiB if p.size_mib is not None else end - pos
            if size <= 0:
                raise ValueError(f"disk of {disk_bytes} bytes is too small for layout {self.name}")
            out[p.role] = (pos, size)
            pos += size
        return out

    def sfdisk_script(self, disk_bytes: int, seed: str | None = None) -> str:
        """The table for sfdisk; with `seed` (the job's key) the identifiers sfdisk would
        draw at random (the disk's label-id, each GPT partition's uuid) come from it."""
        lines = [f"label: {self.label}", "unit: sectors"]
        if seed is not None:
            lines.append(f"label-id: {label_id(self.label, seed)}")
        if self.label == "gpt":
            lines.append(f"last-lba: {disk_bytes // SECTOR - 34}")
        offsets = self.offsets(disk_bytes)
        for p in self.partitions:
            start, size = offsets[p.role]
            fields = [f"start={start // SECTOR}", f"size={size // SECTOR}", f"type={p.type}"]
            if seed is not None and self.label == "gpt":
                fields.append(f"uuid={part_uuid(seed, p.role)}")
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


def part_uuid(seed: str, role: Role) -> str:
    """A GPT partition's unique GUID."""
    return str(repro.seeded_uuid(seed, f"gpt-part-{role}")).upper()


LAYOUTS: dict[str, Layout] = {
    "mbr": Layout(
        "mbr",
        "dos",
        (Partition("root", "83", None, bootable=True),),
        doc="dos label, one bootable Linux partition from 1 MiB (x86 BIOS)",
    ),
    "ppc-prep": Layout(
        "ppc-prep",
        "dos",
        (Partition("prep", "41", 8, bootable=True), Partition("root", "83", None)),
        doc="dos label, 8 MiB PReP boot partition, then root (ppc64el)",
    ),
    "gpt-efi": Layout(
        "gpt-efi",
        "gpt",
        (
            Partition("bios", "21686148-6449-6E6F-744E-656564454649", 1, name="bios"),
            Partition("esp", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", 64, name="esp"),
            Partition("root", "0FC63DAF-8483-4772-8E79-3D69D8477DE4", None, name="root"),
        ),
        doc="GPT: BIOS boot, EFI system partition, root (UEFI and BIOS)",
    ),
}

# Which layouts can boot on which architecture; the first is what "auto" picks.
ARCH_LAYOUTS: dict[str, tuple[str, ...]] = {
    "amd64": ("mbr", "gpt-efi"),
    "ppc64el": ("ppc-prep",),
}

ARCHES = tuple(ARCH_LAYOUTS)


def resolve(layout: str, arch: str) -> Layout:
    """The layout a cell uses: `auto` is the arch's default."""
    name = ARCH_LAYOUTS[arch][0] if layout == "auto" else layout
    return LAYOUTS[name]
