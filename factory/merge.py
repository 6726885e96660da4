"""`factory merge SHARD... --out OUT`: the outputs of a pipeline's cell jobs as one OUT.

Each shard is the OUT of one `factory run --only CELL` on some CI runner, fetched as a CI
artifact: nothing proves it arrived whole. So every file its SHA256SUMS (and its
report.json) lists is hashed as it is taken, and the merge is refused, with one line
naming the shard and the file, when one differs or is missing; so is a shard made from
another matrix file or by another factory version (its report's `matrix_sha256` and
`factory_version`), and a cell that two shards both built. A failed shard is merged: its
jobs keep their failure, and the merged status is the worst of the shards'.

OUT is assembled in a hidden folder beside it and renamed into place at the end, so it
holds the whole merge or nothing; files are hard-linked from the shards when on one
filesystem, else copied.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio

from factory import changes, report_html, sign
from factory.fsutil import TMP_PREFIX, aside, atomic_write_async, sha256_of
from factory.results import StageError

REPORT, SUMS, CHANGES_MD = "report.json", "SHA256SUMS", "CHANGES.md"
# Written anew for the merged OUT, never carried from a shard.
REWRITTEN = frozenset({REPORT, report_html.NAME, SUMS, SUMS + sign.SUFFIX, CHANGES_MD})
SKIPPED_DIRS = frozenset({".work"})  # a killed run's intermediates
# Worst last: the merged status is the highest rank among the shards.
RANK = {"built": 0, "unchanged": 0, "failed": 1, "interrupted": 2}


class MergeRefused(Exception):
    """The shards cannot be merged; one line naming the shard and the file (exit 2)."""


@dataclass
class Shard:
    path: Path
    report: dict[str, Any]
    sums: dict[str, str]  # relative path → sha256: what the shard says it holds
    cells: list[str] = field(default_factory=list)


def _refuse(shard: Path, name: str, why: str) -> MergeRefused:
    return MergeRefused(f"{shard}: {name}: {why}")


def _safe(shard: Path, rel: str, source: str) -> str:
    """A listed path that stays inside the shard (no absolute paths, no `..`)."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise _refuse(shard, source, f"lists {rel!r}, not a path inside the shard")
    return str(p)


def read_shard(path: Path) -> Shard:
    """A shard's report, SHA256SUMS and cells; MergeRefused when they cannot be read or
    disagree with each other."""
    if not path.is_dir():
        raise MergeRefused(f"{path}: not a folder (give the cell jobs' output folders)")
    try:
        report = json.loads((path / REPORT).read_text())
    except FileNotFoundError:
        raise _refuse(path, REPORT, "missing (not a factory output folder)") from None
    except (OSError, ValueError) as exc:
        raise _refuse(path, REPORT, f"cannot be read ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("jobs"), list):
        raise _refuse(path, REPORT, "not a factory report")
    try:
        text = (path / SUMS).read_text()
    except FileNotFoundError:
        raise _refuse(path, SUMS, "missing (the shard arrived incomplete)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _refuse(path, SUMS, f"cannot be read ({exc})") from None
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise _refuse(path, SUMS, f"line {n} is not `SHA256  FILE`")
        sums[_safe(path, rel, SUMS)] = digest.lower()
    for art in report.get("artifacts") or []:
        rel = _safe(path, str(art.get("path", "")), REPORT)
        if sums.get(rel, art.get("sha256")) != art.get("sha256") or rel not in sums:
            raise _refuse(path, rel, f"{REPORT} and {SUMS} disagree about its sha256")
    cells = list(report.get("cells") or {})
    for job in report["jobs"]:
        if isinstance(job, dict) and job.get("cell") and job["cell"] not in cells:
            cells.append(str(job["cell"]))
    return Shard(path, report, sums, cells)


def check_shards(shards: Sequence[Shard]) -> None:
    """All from one matrix file and one factory version, and no cell twice."""
    first = shards[0]
    for key, what in (("matrix_sha256", "matrix sha256"), ("factory_version", "factory version")):
        for s in shards:
            if not s.report.get(key):
                raise _refuse(s.path, REPORT, f"has no {key} (made by a factory older than merge)")
            if s.report[key] != first.report[key]:
                raise _refuse(
                    s.path,
                    REPORT,
                    f"{what} {str(s.report[key])[:16]} is not {first.path}'s "
                    f"{str(first.report[key])[:16]} (the shards come from different "
                    "pipelines: run them again from one `factory ci`)",
                )
    owner: dict[str, Path] = {}
    for s in shards:
        for cell in s.cells:
            if cell in owner:
                raise _refuse(
                    s.path, REPORT, f"cell {cell} was built by {owner[cell]} too (one shard a cell)"
                )
            owner[cell] = s.path


def _files(shard: Path) -> list[str]:
    """Every file the shard carries to OUT, relative, sorted: all but what the merge
    writes anew and the leftovers of writes (hidden temporary names, .work)."""
    found = []
    for root, dirs, names in os.walk(shard):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), shard)
            if rel in REWRITTEN or name.startswith(TMP_PREFIX):
                continue
            found.append(PurePosixPath(*Path(rel).parts).as_posix())
    return sorted(found)


def _take(src: Path, dst: Path) -> str:
    """Hard-link `src` to `dst` (copy across filesystems) and return the sha256 of what
    `dst` now holds."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return ""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    else:
        return sha256_of(dst)
    h = hashlib.sha256()  # a copy: hashed as it is written
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(4 * 1024 * 1024):
            h.update(chunk)
            fout.write(chunk)
    shutil.copystat(src, dst)
    return h.hexdigest()


def _changes_of(doc: Any) -> changes.Changes | None:
    """A cell's `changes` as a run's report records it (None: a first build)."""
    if not isinstance(doc, dict):
        return None
    return changes.Changes(
        added=tuple((a["package"], a["version"]) for a in doc.get("added", [])),
        removed=tuple((r["package"], r["version"]) for r in doc.get("removed", [])),
        changed=tuple((c["package"], c["old"], c["new"]) for c in doc.get("changed", [])),
    )


def merged_report(shards: Sequence[Shard]) -> dict[str, Any]:
    """One report: every shard's cells, jobs and artifacts, the worst status. A job run
    on a shard's own machine (host None there) names that machine, from the shard's
    report, since in the merged OUT "this machine" means nothing."""
    first = shards[0].report
    jobs: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    cells: dict[str, Any] = {}
    for s in shards:
        cells.update(s.report.get("cells") or {})
        artifacts += s.report.get("artifacts") or []
        for job in s.report["jobs"]:
            jobs.append({**job, "host": job.get("host") or s.report.get("host")})
    status = max((str(s.report.get("status", "failed")) for s in shards), key=_rank)
    times = [s.report.get(k) for s in shards for k in ("started", "finished")]
    stamps = [t for t in times if isinstance(t, int | float)]
    return {
        "matrix": first.get("matrix"),
        "factory_version": first["factory_version"],
        "matrix_sha256": first["matrix_sha256"],
        "host": None,
        "sign": first.get("sign"),
        "status": status,
        "started": min(stamps, default=None),
        "finished": max(stamps, default=None),
        "cells": cells,
        "jobs": jobs,
        "artifacts": sorted(artifacts, key=lambda a: str(a["path"])),
        "shards": [
            {
                "path": str(s.path),
                "host": s.report.get("host"),
                "status": s.report.get("status"),
                "cells": s.cells,
            }
            for s in shards
        ],
    }


def _rank(status: str) -> int:
    return RANK.get(status, RANK["failed"])


def changes_md(report: Mapping[str, Any]) -> str:
    """CHANGES.md as one run of all the cells would write it: a section per cell that
    records its changes (a cell not finalised has none, as in a run). No "Since" line:
    each shard's previous run was its own, at its own time."""
    per_cell = {
        cell: _changes_of(info.get("changes"))
        for cell, info in (report.get("cells") or {}).items()
        if isinstance(info, dict) and "changes" in info
    }
    title = f"{report.get('matrix')}: changes since the previous run"
    return changes.markdown(title, per_cell, None)


def _empty_or_absent(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise MergeRefused(
            f"{out}: --out: not empty (give a new folder: a merge writes all of it or nothing)"
        )
    if out.exists() and not out.is_dir():
        raise MergeRefused(f"{out}: --out: not a folder")


def expect(
    report: dict[str, Any], shards: Sequence[Shard], matrix: Path, digest: str, cells: Sequence[str]
) -> None:
    """With the matrix at hand (`--matrix`): the shards must come from it, and a cell of
    it that no shard holds (its job died before writing an OUT, or its artifact never
    came) is listed as `missing` and fails the merge, instead of vanishing from it."""
    for s in shards:
        if s.report.get("matrix_sha256") != digest:
            raise _refuse(
                s.path,
                REPORT,
                f"matrix sha256 {str(s.report.get('matrix_sha256'))[:16]} is not "
                f"{matrix}'s {digest[:16]} (the shard was built from another version of it)",
            )
    missing = [c for c in cells if c not in report["cells"]]
    report["missing"] = missing
    if missing and _rank(report["status"]) < RANK["failed"]:
        report["status"] = "failed"


async def merge(
    paths: Sequence[Path],
    out: Path,
    *,
    gnupghome: Path | None = None,
    matrix: tuple[Path, str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Merge the shards at `paths` into `out` (absent or empty); returns the merged
    report. `matrix`: (its path, its digest, its cells), to check the shards against.
    MergeRefused (one line) before anything is in `out`."""
    if not paths:
        raise MergeRefused("give at least one shard (a cell job's output folder)")
    _empty_or_absent(out)
    shards = [read_shard(p) for p in paths]
    check_shards(shards)
    report = merged_report(shards)
    if matrix is not None:
        expect(report, shards, *matrix)
    key = report.get("sign")
    if key:
        try:
            await sign.check_key(str(key), gnupghome=gnupghome)
        except StageError as exc:
            raise _refuse(shards[0].path, REPORT, f"sign: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = aside(out)
    await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
    staging.mkdir()
    try:
        sums = await _gather(shards, staging)
        await atomic_write_async(staging / REPORT, json.dumps(report, indent=2) + "\n")
        await report_html.write(staging, report)
        text = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))
        await atomic_write_async(staging / SUMS, text)
        await atomic_write_async(staging / CHANGES_MD, changes_md(report))
        if key:
            try:
                await sign.sign_sums(staging / SUMS, str(key), gnupghome=gnupghome)
            except StageError as exc:
                raise MergeRefused(f"{out}: {SUMS}{sign.SUFFIX}: {exc}") from None
        _empty_or_absent(out)  # nobody wrote there meanwhile
        if out.is_dir():
            out.rmdir()
        os.replace(staging, out)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)
    return report


async def _gather(shards: Sequence[Shard], staging: Path) -> dict[str, str]:
    """Every shard's files into `staging`, each listed one verified; the merged sums."""
    merged: dict[str, str] = {}
    taken: dict[str, Path] = {}
    for s in shards:
        files = _files(s.path)
        missing = sorted(set(s.sums) - set(files))
        if missing:
            raise _refuse(s.path, missing[0], f"missing ({SUMS} lists it)")
        for rel in files:
            if rel in taken:
                raise _refuse(s.path, rel, f"{taken[rel]} holds it too (one shard a file)")
            taken[rel] = s.path
            got = await anyio.to_thread.run_sync(_take, s.path / rel, staging / rel)
            want = s.sums.get(rel)
            if want is not None and got != want:
                raise _refuse(
                    s.path,
                    rel,
                    f"sha256 {got[:16]}… is not {want[:16]}… as {SUMS} says "
                    "(corrupt or changed: fetch the shard again)",
                )
            if want is not None:
                merged[rel] = want
    return merged
