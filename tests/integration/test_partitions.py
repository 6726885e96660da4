"""Partitions of one's own (matrix/partitions.toml's example, amd64, gpt-efi): the disk
is built, its partition table, filesystems and fstab agree by UUID, and the booted guest
reports from inside what is mounted where with which filesystem (a unit from the
findmnt hook prints `findmnt` to the serial console before the login prompt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.conftest import CACHE, DATA, Build
from tests.integration.conftest_images import boots, built, partitions, sh

# A session build (trees cold: minutes) counts against the first test that uses it.
# XFS is filled through a loop device: see loop_devices_alone.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.usefixtures("loop_devices_alone")]

CELL = "debian-bookworm-amd64"
MiB = 1024 * 1024
SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
EXPECTED = {  # mount point → (filesystem, fixed size in MiB or None for auto)
    "/boot": ("ext4", 512),
    "/": ("xfs", None),
    "/var": ("btrfs", 2048),
    None: ("swap", 256),
    "/srv/data": ("ext4", 1024),
}


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return built(DATA / "partitions.toml", tmp_path_factory.mktemp("partitions-out"))


def probe(image: Path, start: int, size: int) -> dict[str, str]:
    """blkid's view of the filesystem in one partition of the image (no loop device)."""
    out = sh("blkid", "-p", "-o", "export", "-O", str(start), "-S", str(size), image)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fstab(build: Build) -> list[list[str]]:
    tree = CACHE / "trees" / build.job(f"finalise:{CELL}")["key"] / "root"
    text = (tree / "etc/fstab").read_text()
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


def test_table_filesystems_and_fstab_agree_by_uuid(build: Build) -> None:
    image = build.artifact("raw")
    table = partitions(image)
    assert table["label"] == "gpt"
    found = table["partitions"][2:]  # after the BIOS boot partition and the ESP
    info = build.job(f"assemble:{CELL}")["info"]["partitions"]
    assert [p["mountpoint"] for p in info] == list(EXPECTED)
    entries = {f[0].removeprefix("UUID="): f for f in fstab(build)}
    assert len(entries) == 5
    for part, made in zip(found, info, strict=True):
        fs, size = EXPECTED[made["mountpoint"]]
        assert part["type"] == (SWAP if fs == "swap" else LINUX)
        assert part["start"] * 512 == made["offset"] and part["size"] * 512 == made["size"]
        if size is not None:
            assert part["size"] * 512 == size * MiB
        seen = probe(image, made["offset"], made["size"])
        assert (seen["TYPE"], seen["UUID"]) == (fs, made["uuid"])
        line = entries[made["uuid"]]  # fstab names this partition by its filesystem's UUID
        assert line[1:3] == [made["mountpoint"] or "none", fs]
    assert "nofail" in entries[info[4]["uuid"]][3]
    assert entries[info[0]["uuid"]][5] == "2" and entries[info[1]["uuid"]][5] == "0"


def test_the_xfs_way_is_said_in_the_events_and_the_size_names_each_partition(
    build: Build,
) -> None:
    said = [e["message"] for e in build.events if e.get("job") == f"assemble:{CELL}"]
    why = "mkfs.xfs cannot fill a filesystem from a folder"
    assert f"/: xfs filled through a loop device and a mount ({why})" in said
    reason = build.job(f"assemble:{CELL}")["info"]["size_reason"]
    for name in ("/boot ext4 512 MiB", "/ xfs", "/var btrfs 2048 MiB", "swap swap 256 MiB"):
        assert name in reason


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_the_guest_mounts_each_partition_where_fstab_says(
    build: Build, tmp_path: Path, firmware: str
) -> None:
    """By BIOS (core.img in the BIOS boot partition) and by UEFI (shim and the signed
    grub, told by the ESP's grub.cfg to read /grub on the /boot partition)."""
    console = boots(build.artifact("raw"), tmp_path / "console.log", "--firmware", firmware)
    block = re.search(r"FINDMNT-BEGIN(.*?)FINDMNT-END", console, re.S)
    assert block, console[-3000:]
    mounted = {}
    swap = []
    for line in block.group(1).replace("\r", "").splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].startswith("/"):
            mounted[fields[0]] = (fields[1], fields[2])
        elif fields[:1] == ["SWAP"] and len(fields) == 2:
            swap.append(fields[1])
    by_uuid = {f[0].removeprefix("UUID="): f for f in fstab(build)}
    for made in build.job(f"assemble:{CELL}")["info"]["partitions"]:
        fs, _ = EXPECTED[made["mountpoint"]]
        assert by_uuid[made["uuid"]][2] == fs
        if fs == "swap":
            assert swap == [made["uuid"]]
        else:
            assert mounted[made["mountpoint"]] == (fs, made["uuid"]), mounted
