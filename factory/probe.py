"""What a disk image is, read from the image itself: its arch and the firmware that boots it.

`factory boot` without --arch asks here. Nothing is mounted: the partition table comes
from sfdisk, the ESP's files from mtools and the root filesystem's from debugfs, each at
its byte offset in a raw file. A disk in another format (qcow2, vmdk, ...) is first
written out as a sparse raw copy by qemu-img, which reads every format QEMU boots.
Evidence is taken in the order firmware would see it: the EFI removable-media loader's
name (BOOTX64.EFI, BOOTAA64.EFI), a PReP partition, then the ELF machine of a program
in a Linux root filesystem.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory import arches, proc
from factory.arches import Firmware

SECTOR = 512
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
PREP = ("41", "9E1A2D38-C612-4316-AA26-8B49521E5A8B")  # dos type, GPT type GUID
LINUX = ("83", "0FC63DAF-8483-4772-8E79-3D69D8477DE4")
# Programs every Debian-like root has (merged /usr or not): their ELF header names the arch.
PROGRAMS = ("/usr/bin/env", "/bin/ls", "/usr/bin/ls")


class ProbeError(ValueError):
    """The image does not say what it is."""


@dataclass(frozen=True)
class Found:
    arch: str
    firmware: Firmware
    why: str  # the evidence, for the user


@dataclass(frozen=True)
class Part:
    type: str
    start: int  # bytes
    size: int


def parse_table(sfdisk_json: str) -> tuple[str, list[Part]]:
    """sfdisk --json's label and partitions, types upper-cased (GPT GUIDs differ in case)."""
    table: dict[str, Any] = json.loads(sfdisk_json)["partitiontable"]
    parts = [
        Part(str(p["type"]).upper(), int(p["start"]) * SECTOR, int(p["size"]) * SECTOR)
        for p in table.get("partitions", [])
    ]
    return str(table["label"]), parts


def arch_of_loader(names: list[str]) -> str | None:
    """The arch of an ESP's /EFI/BOOT/BOOT{suffix}.EFI (each arch's removable-media name)."""
    found = {n.rsplit("/", 1)[-1].upper() for n in names}
    hits = [a.name for a in arches.ARCHES.values() if a.efi and f"BOOT{a.efi.upper()}.EFI" in found]
    return hits[0] if len(hits) == 1 else None


def arch_of_prep() -> str | None:
    """The arch whose firmware boots from a PReP partition, if only one can."""
    hits = [a.name for a in arches.ARCHES.values() if "prep" in a.boot_methods]
    return hits[0] if len(hits) == 1 else None


def arch_of_elf(header: bytes) -> str | None:
    """The arch an ELF file is for: its e_machine and byte order (EI_DATA)."""
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[5] not in (1, 2):
        return None
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    hits = [a.name for a in arches.ARCHES.values() if a.elf == (machine, header[5])]
    return hits[0] if hits else None


def firmware_for(arch: str, label: str, parts: list[Part]) -> Firmware:
    """UEFI where BIOS (or Open Firmware) cannot boot the disk: the arch has only UEFI, or
    a GPT has an ESP and no BIOS boot partition. Otherwise the firmware that also boots
    an mbr disk, as before."""
    types = {p.type for p in parts}
    known = arches.ARCHES.get(arch)  # an unknown one fails later, naming the valid ones
    uefi_only = known is not None and known.boot_methods == ("uefi",)
    esp_only = label == "gpt" and ESP in types and BIOS_BOOT not in types
    return "uefi" if uefi_only or esp_only else "bios"


@asynccontextmanager
async def as_raw(image: Path, fmt: str, work: Path) -> AsyncIterator[Path]:
    """The image as a raw file: itself, or a sparse raw copy in `work`, removed after."""
    if fmt == "raw":
        yield image
        return
    fd, name = tempfile.mkstemp(prefix="probe.", suffix=".raw", dir=work)
    os.close(fd)
    raw = Path(name)
    try:
        await proc.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw", image, raw])
        yield raw
    finally:
        raw.unlink(missing_ok=True)


async def _esp_loaders(raw: Path, part: Part) -> list[str]:
    out = await proc.run(
        ["mdir", "-b", "-i", f"{raw}@@{part.start}", "::/EFI/BOOT"], capture=True, check=False
    )
    return out.text.split() if out.returncode == 0 else []


async def _elf_header(raw: Path, part: Part) -> bytes:
    for program in PROGRAMS:
        out = await proc.run(
            ["debugfs", "-R", f"cat {program}", f"{raw}?offset={part.start}"],
            capture=True,
            check=False,
        )
        if out.stdout.startswith(b"\x7fELF"):
            return bytes(out.stdout[:64])
    return b""


async def detect(image: Path, fmt: str, work: Path) -> Found:
    """The image's arch and firmware, from its ESP, PReP partition or root filesystem."""
    async with as_raw(image, fmt, work) as raw:
        out = await proc.run(["sfdisk", "--json", raw], capture=True, check=False)
        if out.returncode != 0:
            raise ProbeError(f"{image}: no partition table (give --arch)")
        label, parts = parse_table(out.text)
        arch, why = None, ""
        for part in parts:
            if part.type == ESP:
                arch = arch_of_loader(await _esp_loaders(raw, part))
                why = "its ESP's EFI loader"
            elif part.type in PREP:
                arch, why = arch_of_prep(), "its PReP partition"
            if arch:
                break
        if arch is None:
            for part in parts:
                if part.type in LINUX:
                    arch = arch_of_elf(await _elf_header(raw, part))
                    why = "the programs in its root filesystem"
                    if arch:
                        break
        if arch is None:
            raise ProbeError(
                f"{image}: cannot tell its arch (no EFI loader, PReP partition or known "
                "ELF program in a root filesystem): give --arch"
            )
        return Found(arch, firmware_for(arch, label, parts), why)
