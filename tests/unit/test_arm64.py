"""arm64 as one row of the arch table: what its row says and what the stages make of it
(kernel package, layouts, EFI file names, QEMU's command line, container arch names)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from factory import arches
from factory.distros import debian
from factory.layouts import fitting, resolve
from factory.results import StageError
from factory.stages import boot, bootloader, pack, rootfs

ARM64 = arches.get("arm64")


def test_row_names_debian_qemu_and_its_firmware() -> None:
    assert (ARM64.qemu_user, ARM64.qemu_system, ARM64.qemu_package) == (
        "aarch64",
        "qemu-system-aarch64",
        "qemu-system-arm",
    )
    assert ARM64.boot_methods == ("uefi",) and ARM64.firmware("uefi") == "uefi"
    assert ARM64.grub == {"uefi": "arm64-efi"}
    assert ARM64.console == "console=ttyAMA0"
    code, vars_ = ARM64.uefi["uefi"]
    assert (code.name, vars_.name, ARM64.uefi_package) == (
        "AAVMF_CODE.fd",
        "AAVMF_VARS.fd",
        "qemu-efi-aarch64",
    )
    assert not ARM64.kvm  # TCG: KVM is only probed for the host's own arch


def test_kernel_and_boot_packages() -> None:
    packages = debian.packages_for("bookworm", "arm64", ["uefi"], [])
    assert "linux-image-arm64" in packages
    assert {"grub-efi-arm64-bin", "shim-signed", "grub-efi-arm64-signed"} <= set(packages)
    assert not any(p.startswith(("grub-pc", "grub-ieee1275")) for p in packages)


def test_layouts_default_gpt_efi_and_only_what_uefi_boots() -> None:
    assert resolve("auto", "arm64").name == "gpt-efi"
    assert fitting("arm64") == ("gpt-efi",)
    assert resolve("gpt-efi", "arm64").boot_methods("arm64") == ("uefi",)


async def test_esp_gets_aa64_shim_and_signed_grub(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    signed = bootloader.SignedEfi.of(ARM64)
    assert signed.shim == "usr/lib/shim/shimaa64.efi.signed"
    assert signed.grub == "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed"
    for rel in (signed.shim, signed.grub, signed.mok_manager):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"MZ")
    root = bootloader.BootFs("u", "/boot/grub", "ext2")
    files = await bootloader.esp_files(tree, root, tmp_path, ARM64, "debian")
    assert [f.dest for f in files] == [
        "EFI/BOOT/BOOTAA64.EFI",
        "EFI/BOOT/grubaa64.efi",
        "EFI/debian/grub.cfg",
        "EFI/BOOT/mmaa64.efi",
    ]


def test_qemu_is_virt_cpu_max_with_aavmf(tmp_path: Path) -> None:
    vars_copy = tmp_path / "vars.fd"
    args = boot.qemu_args(tmp_path / "d.raw", "raw", "arm64", "uefi", vars_copy)
    assert args[0] == "qemu-system-aarch64"
    assert args[args.index("-M") + 1] == "virt"
    assert args[args.index("-cpu") + 1].split(",")[0] == "max"
    assert "-accel" not in args and "-machine" not in args
    pflash = [a for a in args if a.startswith("if=pflash")]
    assert pflash == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]


def test_bios_boot_of_arm64_is_refused_naming_uefi() -> None:
    with pytest.raises(StageError, match="cannot boot arm64 by bios"):
        boot.check_tools("arm64", "bios")


def test_container_arch_names() -> None:
    layer = hashlib.sha256(b"layer").hexdigest()
    config = pack.docker_config("arm64", layer, "2024-01-01T00:00:00Z")
    assert (config["architecture"], config["variant"], config["os"]) == ("arm64", "v8", "linux")
    assert "variant" not in pack.docker_config("amd64", layer, "2024-01-01T00:00:00Z")
    labels = pack.aci_manifest("Debian-Bookworm-arm64", "arm64")["labels"]
    assert {"name": "arch", "value": "aarch64"} in labels  # type: ignore[operator]


async def test_missing_aarch64_emulator_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if await rootfs.host_arch() == "arm64":
        pytest.skip("arm64 is native here")
    monkeypatch.setattr(rootfs, "BINFMT_ENTRIES", tmp_path)
    with pytest.raises(StageError, match=r"^cannot run arm64 programs .*install qemu-user-static"):
        await rootfs.ensure_runnable("arm64")
