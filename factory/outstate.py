"""What OUT already holds, and which of a plan's jobs it makes unnecessary.

A published artifact whose publish job has the same key as in OUT's report.json, and
whose file still has that report's sha256, need not be made again; nor a boot test of
the same disk. When that is every artifact and boot, the night is a no-op and OUT is not
touched. Knowing that a file still has its sha256 must not mean reading gigabytes each
night: the sha256 found for a (device, inode, size, mtime) is remembered outside OUT (in
the tree cache), so an untouched file is not hashed again, and any change of it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.fsutil import atomic_write, sha256_file
from factory.plan import Plan

# What a run is for; the other jobs feed them. An upload (a publish target) is done when
# its key, which covers its artifacts' keys, is the one OUT's report has as done.
LEAVES = frozenset({"publish", "boot", "upload"})
REUSABLE = frozenset({"done", "unchanged"})


def out_id(out: Path) -> str:
    """A short name for an OUT folder, for what is kept about it outside it (its lock,
    its verified sha256s)."""
    return hashlib.sha256(os.fsencode(out.resolve())).hexdigest()[:24]


def utc(stamp: float) -> str:
    """A run's time as reports and messages show it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def load_report(out: Path) -> dict[str, Any] | None:
    """OUT's report.json, or None when there is none or it cannot be read."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


class Verified:
    """sha256 of files by their stat identity, kept beside the tree cache."""

    def __init__(self, cache_root: Path, out: Path) -> None:
        self.path = cache_root / "verified" / f"{out_id(out)}.json"
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        # Each path's entry in `known` ("path|identity"): a farm's night remembers hundreds
        # of artifacts, and finding a path's old entry by a scan of `known` was quadratic.
        self._entry = {k.rpartition("|")[0]: k for k in self.known}

    @staticmethod
    def _identity(path: Path) -> str:
        st = path.stat()
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    async def sha256(self, path: Path) -> str | None:
        """The file's sha256 (None if it is gone), hashed only when its identity is new."""
        try:
            ident = self._identity(path)
        except OSError:
            return None
        digest = self.known.get(f"{path}|{ident}")
        if digest is None:
            try:
                digest = await sha256_file(path)
            except OSError:
                return None
            self.remember(path, digest, ident)
        return digest

    def remember(self, path: Path, digest: str, ident: str | None = None) -> None:
        try:
            ident = ident or self._identity(path)
        except OSError:
            return
        old = self._entry.pop(str(path), None)
        if old is not None:
            self.known.pop(old, None)
        entry = self._entry[str(path)] = f"{path}|{ident}"
        self.known[entry] = digest

    def save(self) -> None:
        """Best effort: without it the next run only hashes again."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self.known, sort_keys=True))
        except OSError:
            pass


@dataclass
class Carried:
    """The jobs of the plan that OUT already satisfies, and their records from the
    report that made them."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)


async def carried_over(
    plan: Plan, report: Mapping[str, Any] | None, out: Path, verified: Verified
) -> Carried:
    """Publish and boot jobs whose key is the one OUT's report recorded as done, with
    their artifact still intact (pure but for reading files)."""
    found = Carried()
    if not report:
        return found
    before = {j.get("id"): j for j in report.get("jobs", []) if isinstance(j, dict)}
    artifacts = {a.get("path"): a for a in report.get("artifacts", []) if isinstance(a, dict)}
    for job in plan.jobs:
        if job.kind not in LEAVES:
            continue
        old = before.get(job.id)
        if not old or old.get("key") != job.key or old.get("status") not in REUSABLE:
            continue
        if job.kind == "publish":
            art = artifacts.get(job.params["name"])
            if not art or await verified.sha256(out / job.params["name"]) != art.get("sha256"):
                continue
            found.artifacts.append(dict(art))
        found.jobs[job.id] = dict(old)
    return found


def still_needed(plan: Plan, carried: Carried) -> Plan | None:
    """The sub-plan that makes what OUT lacks; None when it lacks nothing."""
    if not any(j.kind in LEAVES for j in plan.jobs):
        return plan  # e.g. --only 'rootfs:*': nothing in OUT stands for those
    wanted = [j.id for j in plan.jobs if j.kind in LEAVES and j.id not in carried.jobs]
    # An upload whose artifacts OUT holds needs them, not their making again.
    return plan.select(wanted, given=carried.jobs) if wanted else None
