"""arm64 built here under qemu-user: the gpt-efi layout with shim and Debian's signed grub
as /EFI/BOOT/BOOTAA64.EFI, booted by UEFI in qemu-system-aarch64 (virt, cpu max, AAVMF,
TCG) to a login prompt on ttyAMA0; its docker and aci archives name the arch. The tree
takes minutes under emulation, so one cached build serves every test here.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest

from tests.conftest import factory
from tests.integration.conftest import CACHE, DATA, Build
from tests.integration.conftest_images import (
    built,
    debugfs,
    fs_of,
    fs_uuid,
    partitions,
    sh,
)

# A session build (trees cold: minutes) counts against the first test that uses it.
pytestmark = pytest.mark.timeout(2400)

CELL = "debian-bookworm-arm64"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The arm64 cell, built (or its trees taken from the cache) once."""
    return built(DATA / "arm64.toml", tmp_path_factory.mktemp("arm64-out"))


def esp(build: Build) -> str:
    (_, part, _) = partitions(build.artifact("raw"))["partitions"]
    return f"{build.artifact('raw')}@@{part['start'] * 512}"


def test_gpt_with_bios_boot_esp_and_root(arm64: Build) -> None:
    table = partitions(arm64.artifact("raw"))
    assert table["label"] == "gpt"
    bios, efi, root = table["partitions"]
    assert (bios["type"], efi["type"], root["type"]) == (BIOS_BOOT, ESP, LINUX)
    assert (efi["start"], efi["size"]) == (4096, 64 * MiB // 512)
    sh("e2fsck", "-fn", fs_of(arm64, CELL))


def test_esp_has_aa64_shim_signed_grub_and_its_config(arm64: Build, tmp_path: Path) -> None:
    listing = sh("mdir", "-i", esp(arm64), "-b", "::/EFI/BOOT")
    assert sorted(Path(p).name for p in listing.split()) == [
        "BOOTAA64.EFI",
        "grubaa64.efi",
        "mmaa64.efi",
    ]
    cfg = sh("mtype", "-i", esp(arm64), "::/EFI/debian/grub.cfg")
    assert f"--fs-uuid --set=root {fs_uuid(arm64, CELL)}" in cfg
    tree = CACHE / "trees" / arm64.job(f"finalise:{CELL}")["key"] / "root"
    for name, source in [
        ("BOOTAA64.EFI", "usr/lib/shim/shimaa64.efi.signed"),
        ("grubaa64.efi", "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed"),
    ]:
        sh("mcopy", "-i", esp(arm64), f"::/EFI/BOOT/{name}", tmp_path / name)
        data = (tmp_path / name).read_bytes()
        assert data == (tree / source).read_bytes(), name
        assert data[:2] == b"MZ" and b"PE\0\0\x64\xaa" in data[:512], name  # PE for arm64


def test_tree_is_arm64_with_its_serial_console(arm64: Build) -> None:
    uuid = fs_uuid(arm64, CELL)
    cfg = debugfs(arm64, CELL, "cat /boot/grub/grub.cfg")
    assert f"root=UUID={uuid}" in cfg and "console=ttyAMA0" in cfg
    assert "linux /boot/vmlinuz-" in cfg
    modules = debugfs(arm64, CELL, "ls -p /boot/grub/arm64-efi")
    assert "/normal.mod/" in modules and "/linux.mod/" in modules
    manifest = json.loads(debugfs(arm64, CELL, f"cat /etc/factory/manifests/{CELL}.json"))
    packages = {p["package"]: p for p in manifest}
    assert packages["linux-image-arm64"]["arch"] == "arm64"
    for name in ("shim-signed", "grub-efi-arm64-signed", "grub-efi-arm64-bin"):
        assert packages[name]["status"] == "installed", name


def test_docker_and_aci_name_the_arch(arm64: Build) -> None:
    with tarfile.open(arm64.artifact("docker")) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    assert (config["architecture"], config["variant"], config["os"]) == ("arm64", "v8", "linux")
    with tarfile.open(arm64.artifact("aci")) as tar:
        aci = json.load(tar.extractfile("manifest"))  # type: ignore[arg-type]
    assert {"name": "arch", "value": "aarch64"} in aci["labels"]


def test_boots_with_secure_boot_on_arch_read_from_the_image(arm64: Build, tmp_path: Path) -> None:
    """No --arch: `factory boot` reads arm64 from BOOTAA64.EFI and boots it on virt with
    AAVMF, Microsoft's keys enrolled and Secure Boot on: shim (Microsoft-signed) → grub →
    kernel (Debian-signed) verify. The guest's console decides, not factory's word. (The
    same disk without Secure Boot is booted by test_layouts.)"""
    log = tmp_path / "console.log"
    result = factory(
        "boot",
        arm64.artifact("raw"),
        "--firmware",
        "uefi-secureboot",
        "--timeout",
        "900",  # one run here took over 600 s: load 10-15 on 2 cores under TCG
        "--log",
        log,
        timeout=1000,
    )
    console = log.read_text(errors="replace") if log.exists() else ""
    assert result.returncode == 0, result.stderr + console[-3000:]
    assert "arm64, from its ESP's EFI loader" in result.stderr
    (qemu,) = [line for line in console.splitlines() if line.startswith("$ qemu-system-")]
    assert qemu.startswith("$ qemu-system-aarch64 -M virt -cpu max"), qemu
    assert "/usr/share/AAVMF/AAVMF_CODE.ms.fd" in qemu
    assert "secureboot: Secure boot enabled" in console
    assert "Debian GNU/Linux 12" in console and "ttyAMA0" in console
    assert re.search(r"(?m)^\S+ login:\s*$", console), console[-2000:]
