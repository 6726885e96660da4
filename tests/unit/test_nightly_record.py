"""The night's record: per-cell epoch, archive state and changes; the SBOM written only
when its bytes change, and a failed SBOM write never costs the report."""

from __future__ import annotations

import json
from pathlib import Path

from factory import nightly
from factory.plan import Plan, make_plan
from factory.scheduler import JobRun
from factory.spec import load_matrix

CELL = "debian-bookworm-amd64"


def rows(version: str) -> list[dict[str, str]]:
    return [
        {"package": "bash", "version": "5.2", "arch": "amd64", "status": "installed",
         "source": "bash", "source_version": "5.2", "maintainer": "M <m@example.invalid>"},
        {"package": "factory-marker", "version": version, "arch": "all", "status": "installed",
         "source": "factory-marker", "source_version": version, "maintainer": ""},
    ]  # fmt: skip


def setup(tmp_path: Path) -> tuple[Plan, Path, dict[str, JobRun]]:
    m = tmp_path / "m.toml"
    m.write_text(
        'name = "t"\narches = ["amd64"]\ndistros = ["debian/bookworm"]\nformats = ["tar"]\n'
        "[image]\nepoch = 1700000000\n"
    )
    plan = make_plan(load_matrix(m))
    out = tmp_path / "out"
    (out / CELL).mkdir(parents=True)
    final = next(j for j in plan.jobs if j.kind == "finalise")
    return plan, out, {final.id: JobRun(final, status="done")}


async def test_changes_and_sbom(tmp_path: Path) -> None:
    plan, out, runs = setup(tmp_path)
    manifest = out / CELL / f"{CELL}.manifest.json"
    before = {CELL: rows("1.0")}
    manifest.write_text(json.dumps(rows("1.1")))
    cells, per_cell = await nightly.record(plan, runs, before, None, out)
    info = cells[CELL]
    assert info["epoch"] == 1700000000
    assert info["changes"]["changed"] == [{"package": "factory-marker", "old": "1.0", "new": "1.1"}]
    sbom = out / info["sbom"]
    first = sbom.stat()
    await nightly.record(plan, runs, before, None, out)
    again = sbom.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert per_cell[CELL] is not None and not per_cell[CELL].empty


async def test_first_build_has_no_changes(tmp_path: Path) -> None:
    plan, out, runs = setup(tmp_path)
    (out / CELL / f"{CELL}.manifest.json").write_text(json.dumps(rows("1.0")))
    cells, per_cell = await nightly.record(plan, runs, {CELL: None}, None, out)
    assert cells[CELL]["changes"] is None and per_cell[CELL] is None


async def test_a_failed_sbom_write_is_recorded_not_raised(tmp_path: Path) -> None:
    plan, out, runs = setup(tmp_path)
    (out / CELL / f"{CELL}.manifest.json").write_text(json.dumps(rows("1.0")))
    (out / CELL / f"{CELL}.spdx.json").mkdir()  # cannot be replaced by a file
    cells, _ = await nightly.record(plan, runs, {CELL: None}, None, out)
    assert "sbom" not in cells[CELL]
    assert cells[CELL]["sbom_error"].startswith(f"{CELL}/{CELL}.spdx.json: ")


async def test_a_cell_not_finalised_now_keeps_what_out_holds(tmp_path: Path) -> None:
    plan, out, _ = setup(tmp_path)
    previous = {"cells": {CELL: {"sbom": f"{CELL}/{CELL}.spdx.json"}}}
    cells, _ = await nightly.record(plan, {}, {}, previous, out)
    assert cells[CELL]["sbom"] == f"{CELL}/{CELL}.spdx.json"
    assert cells[CELL]["changes"] == {"added": [], "removed": [], "changed": []}
    assert not list((out / CELL).iterdir())  # nothing written
