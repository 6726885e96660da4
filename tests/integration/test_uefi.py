"""The gpt-efi layout on amd64: one disk that boots by BIOS and by UEFI, made without a
loop device or a mount (BIOS boot partition patched in place, FAT made at an offset and
filled by mtools). One build serves every test here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from factory import proc
from factory.stages.boot import boot_image
from tests.integration.conftest import CACHE, DATA, Build
from tests.integration.conftest_images import (
    boots,
    built,
    debugfs,
    fs_of,
    fs_uuid,
    partitions,
    read_at,
    sh,
    u64,
)

# A session build (trees cold: minutes) counts against the first test that uses it.
pytestmark = pytest.mark.timeout(1800)


CELL = "debian-bookworm-amd64"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def uefi(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The gpt-efi amd64 cell, built (or its trees taken from the cache) once."""
    return built(DATA / "uefi.toml", tmp_path_factory.mktemp("uefi-out"))


def esp(build: Build) -> str:
    """The ESP inside the raw disk, as mtools name it."""
    (_, part, _) = partitions(build.artifact("raw"))["partitions"]
    return f"{build.artifact('raw')}@@{part['start'] * 512}"


def test_gpt_with_bios_boot_esp_and_root(uefi: Build) -> None:
    image = uefi.artifact("raw")
    table = partitions(image)
    assert table["label"] == "gpt"
    bios, efi, root = table["partitions"]
    assert (bios["type"], bios["start"], bios["size"]) == (BIOS_BOOT, 2048, MiB // 512)
    assert (efi["type"], efi["start"], efi["size"]) == (ESP, 4096, 64 * MiB // 512)
    assert (root["type"], root["start"]) == (LINUX, 4096 + 64 * MiB // 512)
    assert root["start"] * 512 == uefi.job(f"assemble:{CELL}")["info"]["root_offset"]
    sh("e2fsck", "-fn", fs_of(uefi, CELL))


def test_bios_boot_code_points_at_the_bios_boot_partition(uefi: Build) -> None:
    """What grub-bios-setup would write: boot.img → core.img's sector, diskboot → the next."""
    image = uefi.artifact("raw")
    mbr = read_at(image, 0, 512)
    assert b"GRUB" in mbr[:440]
    assert u64(mbr, 0x5C) == 2048
    assert mbr[446 + 4] == 0xEE  # the protective MBR's partition entry is kept
    assert mbr[510:512] == b"\x55\xaa"
    core = read_at(image, 2048 * 512, 512)
    assert u64(core, 0x1F4) == 2049


def test_esp_has_shim_signed_grub_and_its_config(uefi: Build, tmp_path: Path) -> None:
    listing = sh("mdir", "-i", esp(uefi), "-b", "::/EFI/BOOT")
    assert sorted(Path(p).name for p in listing.split()) == [
        "BOOTX64.EFI",
        "grubx64.efi",
        "mmx64.efi",
    ]
    cfg = sh("mtype", "-i", esp(uefi), "::/EFI/debian/grub.cfg")
    assert f"--fs-uuid --set=root {fs_uuid(uefi, CELL)}" in cfg
    assert "configfile $prefix/grub.cfg" in cfg
    # the signed binaries are the tree's own, byte for byte
    tree = CACHE / "trees" / uefi.job(f"finalise:{CELL}")["key"] / "root"
    for name, source in [
        ("BOOTX64.EFI", "usr/lib/shim/shimx64.efi.signed"),
        ("grubx64.efi", "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
    ]:
        sh("mcopy", "-i", esp(uefi), f"::/EFI/BOOT/{name}", tmp_path / name)
        assert (tmp_path / name).read_bytes() == (tree / source).read_bytes(), name


def test_tree_has_both_grub_platforms(uefi: Build) -> None:
    grub = debugfs(uefi, CELL, "ls -p /boot/grub")
    assert "/i386-pc/" in grub and "/x86_64-efi/" in grub
    cfg = debugfs(uefi, CELL, "cat /boot/grub/grub.cfg")
    assert f"root=UUID={fs_uuid(uefi, CELL)}" in cfg and "console=ttyS0,115200" in cfg


def test_boots_by_bios(uefi: Build, tmp_path: Path) -> None:
    console = boots(uefi.artifact("raw"), tmp_path / "console.log")
    assert "Debian GNU/Linux 12" in console


async def test_boots_with_secure_boot_on(uefi: Build, tmp_path: Path) -> None:
    """shim (Microsoft-signed) → grub → kernel (Debian-signed) verify with OVMF's
    Microsoft keys enrolled and Secure Boot enforcing. This is also the disk's UEFI boot
    (a plain UEFI boot of a gpt-efi disk is test_layouts' amd64 gpt-efi boot)."""
    log = tmp_path / "console.log"
    with proc.logging_to(log):
        await boot_image(
            uefi.artifact("raw"), firmware="uefi-secureboot", timeout=400, work=tmp_path
        )
    console = log.read_text(errors="replace")
    assert "Secure boot enabled" in console
    assert "EFI v" in console or "efi:" in console
    assert "Debian GNU/Linux 12" in console
