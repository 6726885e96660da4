"""Disk sizes from a tree: pure arithmetic, and measuring a real temp tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from factory import sizing
from factory.layouts import LAYOUTS, MiB
from factory.sizing import DiskSize, TreeUsage, disk_size, measure, round_mib

GiB = 1024 * MiB
MBR = LAYOUTS["mbr"]


def test_fixed_size_is_taken_as_given() -> None:
    for name, layout in LAYOUTS.items():
        size = disk_size(TreeUsage(500 * MiB, 20_000), layout, 256 * MiB, 3 * GiB)
        assert size.disk == 3 * GiB, name
        assert size.filesystem == 3 * GiB - layout.overhead_mib() * MiB
        # the filesystem is exactly the root partition of that disk
        assert layout.offsets(size.disk)["root"][1] == size.filesystem
        assert "3072 MiB" in size.reason


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_auto_size_is_rounded_and_fits_the_layout(name: str) -> None:
    layout = LAYOUTS[name]
    size = disk_size(TreeUsage(1_234_567_891, 45_678), layout, 256 * MiB, None)
    assert size.disk % MiB == 0
    assert size.filesystem % MiB == 0
    assert size.disk == size.filesystem + layout.overhead_mib() * MiB
    assert layout.offsets(size.disk)["root"][1] == size.filesystem


def test_auto_size_covers_data_journal_and_extra() -> None:
    usage = TreeUsage(800 * MiB, 30_000)
    extra = 256 * MiB
    size = disk_size(usage, MBR, extra, None)
    assert size.filesystem >= usage.allocated + sizing.JOURNAL + extra
    # and is not absurdly large: under twice what goes in
    assert size.filesystem < 2 * (usage.allocated + sizing.JOURNAL + extra)


def test_auto_size_grows_with_extra_size() -> None:
    usage = TreeUsage(600 * MiB, 25_000)
    sizes = [
        disk_size(usage, MBR, extra, None).filesystem for extra in (0, 256 * MiB, 1 * GiB, 4 * GiB)
    ]
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == len(sizes)
    # each extra byte of free space costs at least one byte of filesystem
    assert sizes[3] - sizes[2] >= 3 * GiB


def test_auto_size_grows_with_the_tree() -> None:
    small = disk_size(TreeUsage(100 * MiB, 5_000), MBR, 0, None)
    big = disk_size(TreeUsage(2 * GiB, 5_000), MBR, 0, None)
    assert big.filesystem - small.filesystem >= 2 * GiB - 100 * MiB


def test_inodes_bound_the_size() -> None:
    """Many tiny files: the inode count, not the bytes, decides (mkfs -i BYTES_PER_INODE)."""
    entries = 500_000
    size = disk_size(TreeUsage(10 * MiB, entries), MBR, 0, None)
    assert size.filesystem // sizing.BYTES_PER_INODE >= entries
    few = disk_size(TreeUsage(10 * MiB, 100), MBR, 0, None)
    assert size.filesystem > few.filesystem


def test_reason_mentions_the_numbers() -> None:
    size = disk_size(TreeUsage(700 * MiB, 12_345), MBR, 256 * MiB, None)
    assert "700 MiB" in size.reason
    assert "12345 inodes" in size.reason
    assert "256 MiB extra_size" in size.reason
    assert f"filesystem {size.filesystem // MiB} MiB" in size.reason
    assert f"disk {size.disk // MiB} MiB" in size.reason
    assert "mbr" in size.reason


def test_round_mib() -> None:
    assert round_mib(0) == 0
    assert round_mib(1) == MiB
    assert round_mib(MiB) == MiB
    assert round_mib(MiB + 1) == 2 * MiB
    assert round_mib(5.5 * MiB) == 6 * MiB


def test_disk_size_is_a_frozen_record() -> None:
    size = disk_size(TreeUsage(0, 1), MBR, 0, None)
    assert isinstance(size, DiskSize)
    with pytest.raises(AttributeError):
        size.disk = 0  # type: ignore[misc]


# --- measure ----------------------------------------------------------------------------------


def blocks(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def test_measure_counts_hard_links_once(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    big = tree / "usr" / "bin" / "big"
    big.write_bytes(os.urandom(256 * 1024))
    os.link(big, tree / "usr" / "bin" / "big-link")
    os.link(big, tree / "hard-at-top")
    small = tree / "small"
    small.write_text("x")
    (tree / "sym").symlink_to("usr/bin/big")

    usage = measure(tree)
    expected_bytes = sum(
        blocks(p) for p in (tree / "usr", tree / "usr" / "bin", big, small, tree / "sym")
    )
    assert usage.allocated == expected_bytes
    assert usage.allocated >= 256 * 1024
    assert usage.allocated < 2 * 256 * 1024  # the two extra links cost nothing
    # usr, usr/bin, big (once), small, sym, and the root itself
    assert usage.entries == 6


def test_measure_without_links_matches_a_copy(tmp_path: Path) -> None:
    """The same data as separate files counts twice: the link test above is not vacuous."""
    tree = tmp_path / "tree"
    tree.mkdir()
    data = os.urandom(128 * 1024)
    (tree / "a").write_bytes(data)
    (tree / "b").write_bytes(data)
    usage = measure(tree)
    assert usage.allocated == blocks(tree / "a") + blocks(tree / "b")
    assert usage.entries == 3


def test_measure_empty_tree(tmp_path: Path) -> None:
    usage = measure(tmp_path)
    assert usage == TreeUsage(0, 1)


def test_measure_sparse_file_counts_allocated_not_apparent(tmp_path: Path) -> None:
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(64 * MiB)
    assert measure(tmp_path).allocated < MiB


def test_fixed_size_is_rounded_up_to_whole_mib() -> None:
    usage = TreeUsage(allocated=10 * MiB, entries=100)
    size = disk_size(usage, LAYOUTS["mbr"], 0, 1_000_000_000)  # "1GB", not whole MiB
    assert size.disk % MiB == 0 and size.disk >= 1_000_000_000


def test_fixed_size_too_small_for_the_tree_is_refused() -> None:
    usage = TreeUsage(allocated=700 * MiB, entries=30000)
    with pytest.raises(sizing.TooSmall, match=r"image.size 512 MiB cannot hold the tree.*at least"):
        disk_size(usage, LAYOUTS["mbr"], 0, 512 * MiB)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts /proc: needs root")
def test_measure_stays_on_the_trees_filesystem(tmp_path: Path) -> None:
    """A /proc left mounted in a tree (mmdebstrap only warns when it cannot unmount it)
    is neither counted nor walked: its entries come and go while we read them."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/hostname").write_text("x\n")
    bare = measure(tmp_path)
    (tmp_path / "proc").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", tmp_path / "proc"], check=True)
    try:
        usage = measure(tmp_path)
    finally:
        subprocess.run(["umount", tmp_path / "proc"], check=True)
    assert usage == bare  # not even the mount point: lstat of it is the other filesystem's


async def test_measure_leaves_the_event_loop_free(tmp_path: Path) -> None:
    """The walk runs in a worker thread: other tasks (jobs, SSH keepalives) keep running
    while it does. Done on the loop, the ticker would not move until it returned."""
    for i in range(2000):
        (tmp_path / f"f{i}").write_bytes(b"x")
    ticks, done = 0, False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        usage = await sizing.measure_async(tmp_path)
        during = ticks - before
        done = True
    assert usage.entries >= 2000
    assert during > 0
