"""--loop: the disk filled diskimage-builder's way (a loop device, its partitions from
partx, mkfs, the tree copied onto it mounted), checked as the default path is, booted,
and stopped or killed on the device without leaving it attached."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import factory
from tests.integration import test_amd64 as default_path
from tests.integration.conftest import CACHE, DATA, Build, run_matrix
from tests.integration.test_interrupt import Running, mounts_under

LOOP = DATA / "loop.toml"
CELL = "debian-bookworm-amd64"

# The module build (trees cold: minutes) counts against the first test that uses it.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.usefixtures("loop_devices_alone"),
]


def loops_on(folder: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(folder) in line]


@pytest.fixture(scope="module")
def loop_build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    build = run_matrix(LOOP, tmp_path_factory.mktemp("loop-out"), "--loop")
    assert build.returncode == 0, build.stderr[-3000:]
    return build


def test_the_loop_path_was_taken(loop_build: Build) -> None:
    said = [e["message"] for e in loop_build.events if e["job"] == f"assemble:{CELL}"]
    assert "loop device" in said and "copying tree" in said, said
    assert "mkfs.ext4 -d" not in said
    assert loops_on(loop_build.out) == [] and mounts_under(loop_build.out) == []


def test_trim_punched_the_zeros_the_copy_wrote(loop_build: Build) -> None:
    """cp writes files' zero blocks out (mkfs -d does not): the trim makes them holes, so
    only the journal's zeros are stored, as on the default path."""
    assert loop_build.job(f"assemble:{CELL}")["info"]["trimmed_bytes"] > 1024 * 1024
    stored = default_path.zero_blocks_stored(loop_build.artifact("raw"))
    assert stored <= 65 * 1024 * 1024


def test_loop_disk_has_the_layout_and_the_whole_tree(loop_build: Build, tmp_path: Path) -> None:
    default_path.test_partition_table_and_filesystem(loop_build)
    default_path.test_image_keeps_owners_modes_links_and_xattrs(loop_build)
    default_path.test_hooks_ran_in_order_and_place(loop_build)
    default_path.test_image_files_match_the_tree(loop_build, tmp_path)


def test_loop_disk_boots_to_login(loop_build: Build, tmp_path: Path) -> None:
    raw = loop_build.artifact("raw")
    proc = factory("boot", raw, "--timeout", "300", "--log", tmp_path / "console.log")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "login prompt" in proc.stdout


@pytest.mark.parametrize("moment", ["mkfs.ext4 /dev/loop", "copying tree"])
def test_signal_on_the_loop_device_detaches_it(tmp_path: Path, moment: str) -> None:
    run = Running(LOOP, tmp_path / "out", CACHE, "--loop")
    run.wait_for("progress", "assemble", moment)
    assert run.stop(signal.SIGINT) == 130
    assert run.report()["status"] == "interrupted"
    assert loops_on(tmp_path) == [] and mounts_under(tmp_path) == []


def test_after_sigkill_on_the_loop_device_factory_clean_detaches_it(tmp_path: Path) -> None:
    run = Running(LOOP, tmp_path / "out", CACHE, "--loop")
    run.wait_for("progress", "assemble", "copying tree")
    run.proc.kill()  # the factory process alone: its device, mount and cp stay
    run.proc.wait()
    assert loops_on(tmp_path) and mounts_under(tmp_path)
    done = factory("clean", "--cache", CACHE, check=True)
    assert "detached /dev/loop" in done.stdout and "unmounted" in done.stdout, done.stdout
    time.sleep(0.5)
    assert loops_on(tmp_path) == [] and mounts_under(tmp_path) == []


def test_a_device_left_with_partition_entries_is_reused(tmp_path: Path) -> None:
    """Another tool freed a loop device with `losetup -d` alone: its partition entries
    stay, and a plain `partx -a` on it fails "busy". The next free device is that one."""
    other = tmp_path / "other.img"
    subprocess.run(["truncate", "-s", "64M", other], check=True)
    subprocess.run(["sfdisk", "-q", other], input=b"label: dos\nstart=2048, type=83\n", check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", other], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        # The device may already carry entries another run left: start from ours alone.
        subprocess.run(["partx", "-d", device], check=False, capture_output=True)
        subprocess.run(["partx", "-a", device], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
    try:
        assert Path(f"{device}p1").exists()
        build = run_matrix(LOOP, tmp_path / "out", "--loop")
        assert build.returncode == 0, build.stderr[-3000:]
        said = [e["message"] for e in build.events if e["job"] == f"assemble:{CELL}"]
        assert f"mkfs.ext4 {device}p1" in said, said  # it did get that device
    finally:
        subprocess.run(["partx", "-d", device], check=False, capture_output=True)
