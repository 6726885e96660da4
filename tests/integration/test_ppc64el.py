"""ppc64el built here under qemu-user: the ppc-prep layout with grub's powerpc-ieee1275
core in the PReP partition, booted in qemu-system-ppc64 (pseries, TCG). The tree takes
minutes under emulation, so one cached build serves every test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
)

# A session build (trees cold: minutes) counts against the first test that uses it.
pytestmark = pytest.mark.timeout(1800)


CELL = "debian-bookworm-ppc64el"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def ppc64el(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The ppc64el cell, built (or its trees taken from the cache) once."""
    return built(DATA / "ppc64el.toml", tmp_path_factory.mktemp("ppc64el-out"))


def test_prep_partition_then_root(ppc64el: Build) -> None:
    image = ppc64el.artifact("raw")
    table = partitions(image)
    assert table["label"] == "dos"
    prep, root = table["partitions"]
    assert (prep["start"], prep["size"], prep["type"]) == (2048, 8 * MiB // 512, "41")
    assert prep.get("bootable") is True
    assert (root["start"], root["type"]) == (2048 + 8 * MiB // 512, "83")
    assert root["start"] + root["size"] == image.stat().st_size // 512
    sh("e2fsck", "-fn", fs_of(ppc64el, CELL))


def test_grub_core_in_the_prep_partition(ppc64el: Build) -> None:
    """An ELF that Open Firmware loads, with the early config that finds root by UUID."""
    prep = read_at(ppc64el.artifact("raw"), MiB, 8 * MiB)
    assert prep[:4] == b"\x7fELF"
    assert f"search.fs_uuid {fs_uuid(ppc64el, CELL)} root".encode() in prep
    assert b"powerpc-ieee1275" in prep or b"ieee1275" in prep
    modules = debugfs(ppc64el, CELL, "ls -p /boot/grub/powerpc-ieee1275")
    assert "/normal.mod/" in modules and "/linux.mod/" in modules


def test_tree_is_ppc64el_with_hvc_console(ppc64el: Build) -> None:
    uuid = fs_uuid(ppc64el, CELL)
    cfg = debugfs(ppc64el, CELL, "cat /boot/grub/grub.cfg")
    assert f"root=UUID={uuid}" in cfg and "console=hvc0" in cfg
    assert "linux /boot/vmlinux-" in cfg
    assert debugfs(ppc64el, CELL, "cat /etc/fstab").startswith(f"UUID={uuid} / ext4 ")
    manifest = json.loads(debugfs(ppc64el, CELL, f"cat /etc/factory/manifests/{CELL}.json"))
    packages = {p["package"]: p for p in manifest}
    assert packages["linux-image-powerpc64le"]["arch"] == "ppc64el"
    assert packages["grub-ieee1275-bin"]["status"] == "installed"


def test_initramfs_built_once_from_a_module_list(ppc64el: Build) -> None:
    """Once in finalise (never while packages install), with the listed modules only."""
    trees = CACHE / "trees"
    rootfs_log = (trees / ppc64el.job(f"rootfs:{CELL}")["key"] / "build.log").read_text()
    finalise_log = (trees / ppc64el.job(f"finalise:{CELL}")["key"] / "build.log").read_text()
    assert "update-initramfs: Generating" not in rootfs_log
    assert finalise_log.count("update-initramfs: Generating /boot/initrd.img") == 1
    conf = debugfs(ppc64el, CELL, "cat /etc/initramfs-tools/conf.d/factory.conf")
    assert "MODULES=list" in conf
    listed = debugfs(ppc64el, CELL, "cat /etc/initramfs-tools/modules").split()
    assert {"ibmvscsi", "virtio_blk", "ext4"} <= set(listed)


def test_boots_to_login_arch_read_from_the_image(ppc64el: Build, tmp_path: Path) -> None:
    """No --arch: `factory boot` reads ppc64el from the PReP partition (it once booted
    such a disk as x86 and waited out the timeout)."""
    console = boots(ppc64el.artifact("raw"), tmp_path / "console.log")
    assert "$ qemu-system-ppc64 -M pseries " in console
    assert "Debian GNU/Linux 12" in console
    assert "hvc0" in console
