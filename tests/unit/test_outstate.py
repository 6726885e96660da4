"""What OUT already holds: jobs whose key and artifact are unchanged are not run again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from factory import outstate
from factory.plan import Plan, make_plan
from factory.spec import load_matrix


def plan_of(tmp_path: Path, formats: str = '["raw", "tar"]') -> Plan:
    path = tmp_path / "m.toml"
    path.write_text(
        'name = "t"\narches = ["amd64"]\ndistros = ["debian/bookworm", "debian/trixie"]\n'
        f"formats = {formats}\n[image]\nepoch = 1700000000\n"
    )
    return make_plan(load_matrix(path))


def built(plan: Plan, out: Path) -> dict[str, Any]:
    """A report as a run of `plan` into `out` leaves it, with the files."""
    jobs, arts = [], []
    for job in plan.jobs:
        jobs.append({"id": job.id, "key": job.key, "status": "done", "finished": 1.0})
        if job.kind == "publish":
            f = out / job.params["name"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(job.id.encode())
            arts.append(
                {"path": job.params["name"], "sha256": hashlib.sha256(job.id.encode()).hexdigest()}
            )
    return {"jobs": jobs, "artifacts": arts, "finished": 1.0}


async def test_nothing_moved_is_a_no_op(tmp_path: Path) -> None:
    plan, out = plan_of(tmp_path), tmp_path / "out"
    report = built(plan, out)
    carried = await outstate.carried_over(plan, report, out, outstate.Verified(tmp_path / "c", out))
    assert outstate.still_needed(plan, carried) is None
    assert len(carried.artifacts) == 4


async def test_first_run_needs_everything(tmp_path: Path) -> None:
    plan = plan_of(tmp_path)
    carried = await outstate.carried_over(
        plan, None, tmp_path, outstate.Verified(tmp_path, tmp_path)
    )
    assert outstate.still_needed(plan, carried) == plan


async def test_a_moved_cell_alone_runs(tmp_path: Path) -> None:
    plan, out = plan_of(tmp_path), tmp_path / "out"
    report = built(plan, out)
    for job in report["jobs"]:
        if "trixie" in job["id"]:
            job["key"] = "0" * 64  # that cell's archive moved since
    carried = await outstate.carried_over(plan, report, out, outstate.Verified(tmp_path / "c", out))
    todo = outstate.still_needed(plan, carried)
    assert todo is not None
    assert {j.cell for j in todo.jobs} == {"debian-trixie-amd64"}
    assert len(todo.jobs) == len(plan.jobs) // 2


async def test_a_changed_or_missing_file_is_made_again(tmp_path: Path) -> None:
    plan, out = plan_of(tmp_path), tmp_path / "out"
    report = built(plan, out)
    verified = outstate.Verified(tmp_path / "c", out)
    await outstate.carried_over(plan, report, out, verified)  # hashes and remembers
    verified.save()
    raw = next(
        out / a["path"] for a in report["artifacts"] if a["path"].endswith("bookworm-amd64.raw")
    )
    tar = next(
        out / a["path"] for a in report["artifacts"] if a["path"].endswith("trixie-amd64.tar")
    )
    raw.write_bytes(b"tampered")
    os.utime(raw, ns=(1, 1))
    tar.unlink()
    again = outstate.Verified(tmp_path / "c", out)
    carried = await outstate.carried_over(plan, report, out, again)
    todo = outstate.still_needed(plan, carried)
    assert todo is not None
    leaves = {j.id for j in todo.jobs if j.kind == "publish"}
    assert leaves == {"publish:debian-bookworm-amd64:raw", "publish:debian-trixie-amd64:tar"}


async def test_an_untouched_file_is_not_read_again(tmp_path: Path) -> None:
    plan, out = plan_of(tmp_path, '["tar"]'), tmp_path / "out"
    report = built(plan, out)
    verified = outstate.Verified(tmp_path / "c", out)
    await outstate.carried_over(plan, report, out, verified)
    verified.save()
    f = out / report["artifacts"][0]["path"]
    st = f.stat()
    # Same size and mtime, other bytes: trusted by identity (as make does) …
    f.write_bytes(b"X" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    trusted = outstate.Verified(tmp_path / "c", out)
    assert await trusted.sha256(f) == report["artifacts"][0]["sha256"]
    # … but nothing is trusted once the file is another (a new inode).
    new = f.with_name("new")
    new.write_bytes(b"X" * st.st_size)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)
    assert (
        await outstate.Verified(tmp_path / "c", out).sha256(f) != report["artifacts"][0]["sha256"]
    )


async def test_failed_jobs_are_not_carried(tmp_path: Path) -> None:
    plan, out = plan_of(tmp_path, '["tar"]'), tmp_path / "out"
    report = built(plan, out)
    for job in report["jobs"]:
        job["status"] = "failed"
    carried = await outstate.carried_over(plan, report, out, outstate.Verified(tmp_path / "c", out))
    assert outstate.still_needed(plan, carried) == plan


def test_a_plan_without_leaves_always_runs(tmp_path: Path) -> None:
    plan = plan_of(tmp_path)
    only_trees = plan.select([j.id for j in plan.jobs if j.kind == "rootfs"])
    assert outstate.still_needed(only_trees, outstate.Carried()) == only_trees


def test_a_path_keeps_one_remembered_sha256(tmp_path: Path) -> None:
    """A file remembered again (it changed) replaces its old entry, also after a reload."""
    out = tmp_path / "out"
    out.mkdir()
    art, other = out / "a.raw", out / "a.raw.sha256"
    art.write_bytes(b"one")
    other.write_bytes(b"x")
    verified = outstate.Verified(tmp_path / "c", out)
    verified.remember(art, "1" * 64)
    verified.remember(other, "2" * 64)
    verified.save()
    again = outstate.Verified(tmp_path / "c", out)
    art.write_bytes(b"two!")
    again.remember(art, "3" * 64)
    assert sorted(again.known.values()) == ["2" * 64, "3" * 64]
    assert [k for k in again.known if k.startswith(f"{art}|")] == [
        f"{art}|{outstate.Verified._identity(art)}"
    ]
