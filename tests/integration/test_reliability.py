"""Bad nights: a cell that cannot build, a full disk, two runs at once, garbage input.
Each must end with a clear message, whole artifacts only, and an intact cache."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import factory
from tests.integration.conftest import CACHE, DATA, run_matrix
from tests.integration.test_interrupt import Running

CELL = "debian-bookworm-amd64"


def test_one_bad_cell_fails_alone(tmp_path: Path) -> None:
    build = run_matrix(DATA / "two-cells.toml", tmp_path / "out")
    assert build.returncode == 1
    bad = build.job("rootfs:debian-trixie-amd64")
    assert bad["status"] == "failed"
    assert any("python3.11-minimal" in line for line in bad["tail"]), bad["tail"]
    assert {
        j["status"]
        for j in build.report["jobs"]
        if j["cell"] == "debian-trixie-amd64" and j["kind"] != "rootfs"
    } == {"skipped"}
    good = [j for j in build.report["jobs"] if j["cell"] == CELL]
    assert {j["status"] for j in good} == {"done"}
    assert [a["path"] for a in build.report["artifacts"]] == [f"{CELL}/{CELL}.tar"]
    assert (tmp_path / "out" / CELL / f"{CELL}.tar").is_file()
    assert (tmp_path / "out" / "logs" / "rootfs_debian-trixie-amd64.log").is_file()


@pytest.fixture
def small_out(tmp_path: Path) -> Iterator[Path]:
    """An out folder on a 400 MiB tmpfs: too small for the disk images."""
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "factory-test", out], check=True)
    try:
        yield out
    finally:
        subprocess.run(["umount", out], check=True)


def test_full_disk_fails_clearly_and_publishes_nothing_partial(small_out: Path) -> None:
    trees_before = sorted(p.name for p in (CACHE / "trees").iterdir())
    build = run_matrix(DATA / "raw-qcow2.toml", small_out)
    assert build.returncode == 1
    failed = [j for j in build.report["jobs"] if j["status"] == "failed"]
    assert failed, build.report
    assert all(
        "no space left on device in" in j["error"] and str(small_out) in j["error"] for j in failed
    ), [j["error"] for j in failed]
    for artifact in build.report["artifacts"]:  # whatever did fit is whole
        path = small_out / artifact["path"]
        assert path.stat().st_size == artifact["size"]
        assert (path.parent / f"{path.name}.sha256").read_text().split()[0] == artifact["sha256"]
    finals = (
        {p.name for p in (small_out / CELL).glob("*")} if (small_out / CELL).exists() else set()
    )
    published = {Path(a["path"]).name for a in build.report["artifacts"]}
    assert {
        n for n in finals if not n.endswith((".sha256", ".manifest.json", ".spdx.json"))
    } == published
    assert not (small_out / ".work").exists()
    assert [p for p in small_out.rglob(".tmp-*")] == []
    trees_after = sorted(p.name for p in (CACHE / "trees").iterdir())
    assert set(trees_before) <= set(trees_after)
    for key in (build.job(f"rootfs:{CELL}")["key"], build.job(f"finalise:{CELL}")["key"]):
        assert (CACHE / "trees" / key / "meta.json").is_file()


def test_second_run_on_the_same_out_stops_with_a_clear_message(tmp_path: Path) -> None:
    first = Running(DATA / "slow-hook.toml", tmp_path / "out", CACHE)
    try:
        first.wait_for("start", "finalise")
        second = factory(
            "run", DATA / "slow-hook.toml", "--out", tmp_path / "out", "--cache", CACHE, timeout=60
        )
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"{tmp_path / 'out'}: --out: another factory run (pid {first.proc.pid}) is writing "
            "this folder (wait for it to finish, or give another --out)"
        ]
    finally:
        assert first.stop(signal.SIGINT) == 130


def test_second_run_on_the_same_cache_waits_for_the_tree(tmp_path: Path) -> None:
    first = Running(DATA / "slow-hook.toml", tmp_path / "one", CACHE)
    second = None
    try:
        first.wait_for("progress", "finalise", "hook")
        second = Running(DATA / "slow-hook.toml", tmp_path / "two", CACHE)
        event = second.wait_for("progress", "finalise", "waiting: another run is building")
        assert event["job"] == f"finalise:{CELL}"
        assert first.stop(signal.SIGINT) == 130
        # the lock is free: the second run builds the tree itself and reaches the hook
        second.wait_for("progress", "finalise", "hook")
    finally:
        if first.proc.poll() is None:
            first.stop(signal.SIGINT)
        if second is not None:
            assert second.stop(signal.SIGINT) == 130


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_garbage_matrix_never_crashes_the_cli(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "matrix.toml"
    path.write_bytes(data)
    result = factory("plan", path, "--json", timeout=60)
    assert result.returncode in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    if result.returncode == 2:
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"{path}:")
    else:
        assert json.loads(result.stdout)["jobs"]
