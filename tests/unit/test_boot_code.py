"""Boot code, kernel choice, initramfs config and QEMU command lines: the pure parts of
bootloader, finalise, boot and rootfs, and the ESP made for real in a small file."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from factory import arches, distros, proc
from factory.distros import debian
from factory.results import StageError
from factory.stages import boot, bootloader, finalise, rootfs

UUID = "6d53d9fc-503d-5842-9fe5-2accc67a7fcc"
BOOT = bootloader.BootFs(UUID, "/boot/grub", "ext2")
AMD64 = arches.get("amd64")


def test_gpt_bios_patch_sets_both_sectors_and_keeps_the_rest() -> None:
    boot_img = bytes(range(256)) * 2
    core = bytes(1024)
    b, c = bootloader.patch_gpt_bios(boot_img, core, 2048)
    assert len(b) == 440  # never over the disk signature and partition table
    assert struct.unpack_from("<Q", b, 0x5C)[0] == 2048
    assert struct.unpack_from("<Q", c, 0x1F4)[0] == 2049
    assert b[:0x5C] == boot_img[:0x5C] and b[0x64:] == boot_img[0x64:440]
    assert c[:0x1F4] == core[:0x1F4] and c[0x1FC:] == core[0x1FC:]


def test_esp_config_finds_root_and_its_grub_cfg() -> None:
    cfg = bootloader.esp_grub_cfg(UUID)
    assert f"search --no-floppy --fs-uuid --set=root {UUID}" in cfg
    assert cfg.rstrip().endswith("configfile $prefix/grub.cfg")


async def test_esp_uses_shim_and_signed_grub_when_the_tree_has_them(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    signed = bootloader.SignedEfi.of(AMD64)
    for rel in (signed.shim, signed.grub):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"MZ")
    files = await bootloader.esp_files(tree, BOOT, tmp_path, AMD64, "debian")
    assert [f.dest for f in files] == [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grubx64.efi",
        "EFI/debian/grub.cfg",
    ]
    assert files[0].source == tree / "usr/lib/shim/shimx64.efi.signed"
    assert files[1].source == tree / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"


async def test_esp_without_grub_modules_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no grub modules for x86_64-efi"):
        await bootloader.esp_files(tmp_path, BOOT, tmp_path, AMD64, "debian")


@pytest.mark.skipif(not shutil.which("mkfs.vfat") or not shutil.which("mdir"), reason="mtools")
async def test_esp_made_at_an_offset_in_a_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(80 * 1024 * 1024)
    src = tmp_path / "payload"
    src.write_bytes(b"x" * 5000)
    files = [
        bootloader.EspFile("EFI/BOOT/BOOTX64.EFI", src),
        bootloader.EspFile("EFI/debian/grub.cfg", src),
    ]
    await bootloader.make_esp(disk, 4 * 1024 * 1024, 64 * 1024 * 1024, files, epoch=0, seed="")
    image = f"{disk}@@{4 * 1024 * 1024}"
    listing = (await proc.run(["mdir", "-i", image, "-b", "-/", "::/"], capture=True)).text.split()
    assert "::/EFI/BOOT/BOOTX64.EFI" in listing and "::/EFI/debian/grub.cfg" in listing
    assert disk.read_bytes()[: 4 * 1024 * 1024] == bytes(4 * 1024 * 1024)  # nothing before it


def test_newest_kernel_of_either_kind(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(StageError, match="no kernel"):
        finalise.newest_kernel(tmp_path)
    for name in ("vmlinux-6.1.0-9-powerpc64le", "vmlinux-6.1.0-50-powerpc64le"):
        (tmp_path / "boot" / name).touch()
    kernel = finalise.newest_kernel(tmp_path)
    assert kernel == finalise.Kernel("vmlinux-6.1.0-50-powerpc64le", "6.1.0-50-powerpc64le")


def test_grub_cfg_per_arch() -> None:
    ppc = finalise.grub_cfg(UUID, finalise.Kernel("vmlinux-6.1", "6.1"), "ppc64el", "t")
    assert "linux /boot/vmlinux-6.1 root=UUID=" in ppc and "console=hvc0" in ppc
    assert "initrd /boot/initrd.img-6.1" in ppc and "serial" not in ppc
    x86 = finalise.grub_cfg(UUID, finalise.Kernel("vmlinuz-6.1", "6.1"), "amd64", "t")
    assert "console=ttyS0,115200 no_timer_check" in x86 and "serial --unit=0" in x86


@pytest.mark.parametrize(
    ("arch", "filesystem", "wanted"),
    [("ppc64el", "ext4", {"ibmvscsi", "virtio_blk", "ext4"}), ("amd64", "xfs", {"nvme", "xfs"})],
)
def test_initramfs_lists_what_a_vm_image_needs(
    arch: str, filesystem: str, wanted: set[str]
) -> None:
    config = debian.initramfs_config(arch, filesystem)
    assert "MODULES=list" in config[debian.INITRAMFS_CONF]
    listed = {line for line in config[debian.INITRAMFS_LIST].splitlines() if line[:1] != "#"}
    assert wanted <= listed


def test_qemu_for_ppc64el_is_pseries_on_the_console(tmp_path: Path) -> None:
    args = boot.qemu_args(tmp_path / "d.raw", "raw", "ppc64el", "bios", None)
    assert args[0] == "qemu-system-ppc64"
    assert args[args.index("-M") + 1].startswith("pseries")
    assert "-snapshot" in args


def test_qemu_for_uefi_uses_a_writable_vars_copy(tmp_path: Path) -> None:
    vars_copy = tmp_path / "vars.fd"
    args = boot.qemu_args(tmp_path / "d.raw", "raw", "amd64", "uefi", vars_copy)
    pflash = [a for a in args if a.startswith("if=pflash")]
    assert any("readonly=on" in a and str(AMD64.uefi["uefi"][0]) in a for a in pflash)
    assert any(str(vars_copy) in a and "readonly" not in a for a in pflash)


def test_boot_refuses_what_it_cannot_boot() -> None:
    with pytest.raises(StageError, match="cannot boot s390x"):
        boot.check_tools("s390x", "bios")
    with pytest.raises(StageError, match="UEFI boot is for amd64"):
        boot.check_tools("ppc64el", "uefi")


async def test_missing_emulator_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rootfs, "BINFMT_ENTRIES", tmp_path)
    foreign = "ppc64el" if await rootfs.host_arch() != "ppc64el" else "amd64"
    with pytest.raises(StageError, match="install qemu-user-static"):
        await rootfs.ensure_runnable(foreign)
    await rootfs.ensure_runnable(await rootfs.host_arch())  # native: nothing to do


def test_a_broken_security_index_is_one_line_naming_the_setting() -> None:
    """apt's words on this machine's mirror (ppc64el bookworm-security), mirror name elided."""
    tail = [
        "Get:5 http://MIRROR/debian-security bookworm-security/main ppc64el Packages [364 kB]",
        "E: Failed to fetch http://MIRROR/debian-security/dists/bookworm-security/main/"
        "binary-ppc64el/Packages.xz  File has unexpected size (343384 != 364292). "
        "Mirror sync in progress? [IP: 192.0.2.1 80]",
        "E: mmdebstrap failed to run",
    ]
    error = proc.CommandError(["mmdebstrap"], 25, tail)
    message = rootfs.explain(error, distros.get("debian"), "ppc64el")
    assert message == (
        "the mirror's index for bookworm-security (ppc64el) failed to download "
        "(set [mirrors] security = false to leave it out)"
    )
