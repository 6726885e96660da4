"""OUT/report.json and OUT/SHA256SUMS: what a run built, from the scheduler's records."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiofiles

from factory.fsutil import atomic_write_async
from factory.scheduler import JobRun, log_name


def artifacts(runs: Iterable[JobRun]) -> list[dict[str, Any]]:
    """The published files: publish jobs that finished hand back an `artifact` record."""
    out = []
    for run in runs:
        if run.status == "done" and run.output is not None and "artifact" in run.output.info:
            out.append(dict(run.output.info["artifact"]))
    return sorted(out, key=lambda a: a["path"])


async def write(
    out: Path,
    matrix: str,
    started: float,
    finished: float,
    status: str,
    runs: Iterable[JobRun],
    *,
    carried_jobs: Iterable[dict[str, Any]] = (),
    carried_artifacts: Iterable[dict[str, Any]] = (),
    cells: dict[str, Any] | None = None,
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json and SHA256SUMS. Jobs an earlier run into OUT already did with the same
    key (`carried_*`, from its report) are listed as `unchanged`, with their artifacts."""
    runs = list(runs)
    unchanged = [
        {**j, "status": "unchanged", "since": j.get("since") or j.get("finished")}
        for j in carried_jobs
    ]
    report: dict[str, Any] = {
        "matrix": matrix,
        **(about or {}),  # what made the run: factory version, matrix digest, host
        "status": status,
        "started": started,
        "finished": finished,
        "cells": cells or {},
        "jobs": unchanged
        + [
            {
                "id": r.job.id,
                "kind": r.job.kind,
                "cell": r.job.cell,
                "deps": list(r.job.deps),
                "key": r.job.key,
                "status": r.status,
                "started": r.started,
                "finished": r.finished,
                "host": r.host,
                "error": r.error,
                "tail": r.tail,
                "info": dict(r.output.info) if r.output else {},
                "log": f"logs/{log_name(r.job.id)}" if r.started else None,
            }
            for r in runs
        ],
        "artifacts": sorted([*artifacts(runs), *carried_artifacts], key=lambda a: a["path"]),
    }
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    await atomic_write_async(out / "report.json", text)
    await atomic_write_async(out / "SHA256SUMS", await _sums(out, report["artifacts"]))
    return report


async def _sums(out: Path, built: list[dict[str, Any]]) -> str:
    """This run's artifacts, and those of earlier runs into OUT (e.g. with --only) whose
    files are still there and were not rebuilt now."""
    sums = {a["path"]: a["sha256"] for a in built}
    try:
        async with aiofiles.open(out / "SHA256SUMS", encoding="utf-8") as fh:
            before = await fh.read()
        for line in before.splitlines():
            digest, _, path = line.partition("  ")
            if path and path not in sums and (out / path).is_file():
                sums[path] = digest
    except OSError:
        pass
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(sums.items()))
