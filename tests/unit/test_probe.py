"""`factory boot`'s reading of an image's arch and firmware: the pure rules, and small real
disks (a GPT with an ESP, a dos label with a PReP partition, a root filesystem alone, a
qcow2) read without mounting them."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from factory import probe
from factory.probe import Part

MiB = 1024 * 1024
TOOLS = ("sfdisk", "mkfs.vfat", "mmd", "mcopy", "mdir", "mkfs.ext4", "debugfs", "qemu-img")
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS), reason="sfdisk, dosfstools, mtools, e2fsprogs"
)


def elf(machine: int, data: int = 1) -> bytes:
    """An ELF header as far as e_machine: 64-bit, byte order `data`, an executable."""
    order = "<" if data == 1 else ">"
    return b"\x7fELF" + bytes([2, data, 1]) + bytes(9) + struct.pack(f"{order}HH", 2, machine)


@pytest.mark.parametrize(
    ("header", "arch"),
    [(elf(62), "amd64"), (elf(183), "arm64"), (elf(21), "ppc64el"), (elf(21, 2), None)],
)
def test_elf_machine_names_the_arch(header: bytes, arch: str | None) -> None:
    assert probe.arch_of_elf(header) == arch


def test_not_elf_is_no_arch() -> None:
    assert probe.arch_of_elf(b"#!/bin/sh\n" + bytes(30)) is None
    assert probe.arch_of_elf(b"") is None


def test_efi_loader_names_the_arch() -> None:
    assert probe.arch_of_loader(["::/EFI/BOOT/BOOTAA64.EFI", "::/EFI/BOOT/grubaa64.efi"]) == "arm64"
    assert probe.arch_of_loader(["::/EFI/BOOT/bootx64.efi"]) == "amd64"
    assert probe.arch_of_loader(["::/EFI/BOOT/BOOTRISCV64.EFI"]) is None
    assert probe.arch_of_loader([]) is None


def test_prep_is_ppc64el() -> None:
    assert probe.arch_of_prep() == "ppc64el"


def test_firmware_uefi_only_where_bios_cannot_boot() -> None:
    esp = Part(probe.ESP, MiB, MiB)
    bios = Part(probe.BIOS_BOOT, MiB, MiB)
    root = Part(probe.LINUX[1], 2 * MiB, MiB)
    assert probe.firmware_for("arm64", "gpt", [bios, esp, root]) == "uefi"
    assert probe.firmware_for("arm64", "", []) == "uefi"
    assert probe.firmware_for("amd64", "gpt", [bios, esp, root]) == "bios"
    assert probe.firmware_for("amd64", "gpt", [esp, root]) == "uefi"
    assert probe.firmware_for("amd64", "dos", [Part("83", MiB, MiB)]) == "bios"
    assert probe.firmware_for("ppc64el", "dos", [Part("41", MiB, MiB)]) == "bios"
    assert probe.firmware_for("sparc64", "", []) == "bios"  # boot names the valid arches


def sh(*args: str | Path, data: str | None = None) -> None:
    subprocess.run(list(map(str, args)), input=data, text=True, check=True, capture_output=True)


def disk(path: Path, table: str, size_mib: int = 40) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size_mib * MiB)
    sh("sfdisk", "-q", path, data=table)
    return path


def root_fs(image: Path, tmp: Path, offset_mib: int, size_mib: int, machine: int) -> None:
    tree = tmp / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/env").write_bytes(elf(machine) + bytes(100))
    sh("mkfs.ext4", "-q", "-F", "-E", f"offset={offset_mib * MiB}", "-d", tree, image,
       f"{size_mib}M")  # fmt: skip


@needs_tools
async def test_gpt_with_an_aa64_loader_is_arm64_by_uefi(tmp_path: Path) -> None:
    image = disk(
        tmp_path / "d.raw",
        f"label: gpt\nstart=2048, size=2048, type={probe.BIOS_BOOT}\n"
        f"start=4096, size=131072, type={probe.ESP}\n",
        size_mib=80,
    )
    sh("mkfs.vfat", "-F", "32", "-s", "1", "--offset=4096", image, str(64 * 1024))
    esp = f"{image}@@{4096 * 512}"
    loader = tmp_path / "BOOTAA64.EFI"
    loader.write_bytes(b"MZ")
    sh("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT")
    sh("mcopy", "-i", esp, loader, "::/EFI/BOOT/BOOTAA64.EFI")
    found = await probe.detect(image, "raw", tmp_path)
    assert (found.arch, found.firmware) == ("arm64", "uefi")
    assert "EFI loader" in found.why
    # The same disk as qcow2: read through a raw copy that is gone afterwards.
    qcow2 = tmp_path / "d.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2)
    image.unlink()
    assert (await probe.detect(qcow2, "qcow2", tmp_path)).arch == "arm64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BOOTAA64.EFI", "d.qcow2"]


@needs_tools
async def test_prep_partition_is_ppc64el_by_its_firmware(tmp_path: Path) -> None:
    image = disk(tmp_path / "d.raw", "label: dos\nstart=2048, size=16384, type=41, bootable\n")
    found = await probe.detect(image, "raw", tmp_path)
    assert (found.arch, found.firmware) == ("ppc64el", "bios")


@pytest.mark.parametrize(("machine", "arch"), [(62, "amd64"), (183, "arm64")])
@needs_tools
async def test_root_filesystem_alone_by_its_programs(
    tmp_path: Path, machine: int, arch: str
) -> None:
    image = disk(tmp_path / "d.raw", "label: dos\nstart=2048, type=83, bootable\n")
    root_fs(image, tmp_path, 1, 39, machine)
    found = await probe.detect(image, "raw", tmp_path)
    assert (found.arch, found.why) == (arch, "the programs in its root filesystem")
    assert found.firmware == ("uefi" if arch == "arm64" else "bios")


@needs_tools
async def test_nothing_to_tell_by_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    image = disk(tmp_path / "d.raw", "label: dos\nstart=2048, type=83\n")
    with pytest.raises(probe.ProbeError, match=r"cannot tell its arch .*: give --arch$"):
        await probe.detect(image, "raw", tmp_path)
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(MiB))
    with pytest.raises(probe.ProbeError, match="no partition table"):
        await probe.detect(blank, "raw", tmp_path)
