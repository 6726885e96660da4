"""Files written from the event loop through aiofiles: atomic, rewritten only when their
bytes change, whole even when the run is cancelled; job logs that never raise."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from factory import changes, nightly, report
from factory.fsutil import TMP_PREFIX, atomic_write_async, write_if_changed_async
from factory.results import Output
from factory.scheduler import JobRun
from tests.unit.test_nightly_record import setup


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(f"{TMP_PREFIX}*")]


async def test_atomic_write_makes_the_folder_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f.json"
    await atomic_write_async(target, "text\n")
    assert target.read_text() == "text\n"
    await atomic_write_async(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert leftovers(tmp_path) == []


async def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        await atomic_write_async(tmp_path / "d", "x")  # the rename onto a folder fails
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


async def test_a_cancelled_write_still_lands_whole(tmp_path: Path) -> None:
    target = tmp_path / "f"
    data = b"x" * (8 * 1024 * 1024)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await atomic_write_async(target, data)
    assert target.read_bytes() == data
    assert leftovers(tmp_path) == []


async def test_same_bytes_leave_the_file_as_it_is(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert await write_if_changed_async(target, "one\n") is True
    before = target.stat()
    assert await write_if_changed_async(target, b"one\n") is False
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert await write_if_changed_async(target, "two\n") is True
    assert target.read_text() == "two\n" and target.stat().st_ino != before.st_ino


async def test_report_and_sums(tmp_path: Path) -> None:
    plan, out, runs = setup(tmp_path)
    publish = next(j for j in plan.jobs if j.kind == "publish")
    art = {"path": f"{publish.cell}/x.tar", "sha256": "ab" * 32, "bytes": 1}
    built = JobRun(publish, status="done", started=1.0, finished=2.0)
    built.output = Output(info={"artifact": art})
    (out / "SHA256SUMS").write_text(f"{'cd' * 32}  kept.raw\n{'ef' * 32}  gone.raw\n")
    (out / "kept.raw").write_bytes(b"")
    doc = await report.write(out, "t", 1.0, 3.0, "built", [built, *runs.values()])
    assert json.loads((out / "report.json").read_text()) == doc
    assert doc["artifacts"] == [art]
    assert (out / "SHA256SUMS").read_text().splitlines() == [
        f"{'ab' * 32}  {art['path']}",  # built now
        f"{'cd' * 32}  kept.raw",  # an earlier run's, still in OUT
    ]
    assert leftovers(out) == []


async def test_changes_md_is_rewritten_only_when_its_text_changes(tmp_path: Path) -> None:
    moved = {"c": changes.Changes(changed=(("bash", "5.1", "5.2"),))}
    await nightly.write_changes(tmp_path, "t", moved, 1700000000.0)
    path = tmp_path / nightly.CHANGES_MD
    first = path.stat()
    assert "bash" in path.read_text()
    await nightly.write_changes(tmp_path, "t", moved, 1700000000.0)
    assert path.stat().st_mtime_ns == first.st_mtime_ns
    await nightly.write_changes(tmp_path, "t", {"c": changes.Changes()}, 1700000000.0)
    assert "bash" not in path.read_text()
