"""What a night says beyond its artifacts: each cell's clock and archive state, what
changed since the run before into the same OUT, an SBOM per cell and CHANGES.md.

Cells whose finalise job did not run this time keep what OUT holds for them: their
manifest and SBOM are not rewritten, so their files stay untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from factory import changes, outstate, sbom
from factory.distros import debian
from factory.fsutil import write_if_changed_async
from factory.plan import Job, Plan
from factory.scheduler import JobRun

CHANGES_MD = "CHANGES.md"


def _manifest_name(job: Job) -> str:
    return str(job.params["manifest"])


def sbom_name(cell: str) -> str:
    return f"{cell}/{cell}.spdx.json"


def read_rows(path: Path) -> list[dict[str, str]] | None:
    """A manifest's rows, or None where OUT has none that can be read."""
    try:
        return changes.load_manifest(path)
    except ValueError:
        return None


def manifests_before(plan: Plan, out: Path) -> dict[str, list[dict[str, str]] | None]:
    """Each cell's manifest as OUT holds it before the run rewrites it."""
    return {
        job.cell: read_rows(out / _manifest_name(job))
        for job in plan.jobs
        if job.kind == "finalise"
    }


async def record(
    plan: Plan,
    runs: Mapping[str, JobRun],
    before: Mapping[str, list[dict[str, str]] | None],
    previous: Mapping[str, Any] | None,
    out: Path,
) -> tuple[dict[str, Any], dict[str, changes.Changes | None]]:
    """Per cell: epoch, archive state, changes since the previous run, manifest and SBOM
    names; and the changes for CHANGES.md. Writes the SBOM of each cell finalised now."""
    old_cells = (previous or {}).get("cells") or {}
    cells: dict[str, Any] = {}
    per_cell: dict[str, changes.Changes | None] = {}
    finals = {j.cell: j for j in plan.jobs if j.kind == "finalise"}
    for job in plan.jobs:
        if job.kind != "rootfs":
            continue
        cell = job.cell
        info: dict[str, Any] = {
            "arch": job.arch,
            "release": job.params.get("release"),
            "epoch": job.params.get("epoch"),
            "archive": job.params.get("archive", []),
        }
        final = finals.get(cell)
        run = runs.get(final.id) if final else None
        if final is None:
            cells[cell] = info
            continue
        info["manifest"] = _manifest_name(final)
        if run is None or run.status != "done":
            # Not finalised now: what OUT holds for the cell is the earlier run's.
            old = old_cells.get(cell)
            if isinstance(old, dict) and "sbom" in old:
                info["sbom"] = old["sbom"]
            if run is None:
                info["changes"] = changes.Changes().to_json()
                per_cell[cell] = changes.Changes()
            cells[cell] = info
            continue
        rows = await anyio.to_thread.run_sync(read_rows, out / info["manifest"])  # read + parse
        if rows is None:  # finalised, but its manifest did not reach OUT
            cells[cell] = info
            continue
        old_rows = before.get(cell)
        diff = changes.diff(old_rows, rows) if old_rows is not None else None
        per_cell[cell] = diff
        info["changes"] = diff.to_json() if diff is not None else None
        try:
            data = await anyio.to_thread.run_sync(
                functools.partial(
                    sbom.json_bytes,
                    cell,
                    rows,
                    arch=job.arch,
                    distro_version=debian.version_of(str(job.params.get("release"))),
                    epoch=int(job.params.get("epoch") or 0),
                    key=final.key,
                )
            )
            await write_if_changed_async(out / sbom_name(cell), data)
            info["sbom"] = sbom_name(cell)
        except (OSError, ValueError) as exc:  # a full disk: the report is written all the same
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            info["sbom_error"] = f"{sbom_name(cell)}: {why}"
        cells[cell] = info
    return cells, per_cell


async def write_changes(
    out: Path, matrix: str, per_cell: Mapping[str, changes.Changes | None], since: float | None
) -> None:
    """CHANGES.md, rewritten only when its text changed (a no-op night leaves it as it is)."""
    stamp = outstate.utc(since) if since else None
    text = changes.markdown(f"{matrix}: changes since the previous run", dict(per_cell), stamp)
    await write_if_changed_async(out / CHANGES_MD, text.encode())
