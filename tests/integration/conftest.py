"""Integration fixtures: one real build per session, shared by every assertion on it,
and a guard that fails any test leaving a mount, loop device or process behind.

Trees come from the default cache (/var/cache/factory), so a warm machine rebuilds
nothing; FACTORY_TEST_CACHE points the tests at another cache.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SESSION_MARK, factory

DATA = Path(__file__).parent / "data"
CACHE = Path(os.environ.get("FACTORY_TEST_CACHE", "/var/cache/factory"))
OURS = ("qemu-system", "qemu-img", "mmdebstrap", "mksquashfs", "sshd", "apt-get", "dpkg")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds images: needs root")


@dataclass
class Build:
    out: Path
    returncode: int
    stderr: str
    events: list[dict[str, Any]]
    report: dict[str, Any]

    def artifact(self, fmt: str) -> Path:
        (found,) = [a for a in self.report["artifacts"] if a["format"] == fmt]
        return self.out / found["path"]

    def job(self, jid: str) -> dict[str, Any]:
        (found,) = [j for j in self.report["jobs"] if j["id"] == jid]
        return found


def run_matrix(matrix: Path, out: Path, *args: str) -> Build:
    proc = factory("run", matrix, "--out", out, "--cache", CACHE, "--events", "json", *args)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return Build(out, proc.returncode, proc.stderr, events, report)


@pytest.fixture(scope="session")
def amd64(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The amd64 cell in all ten formats, built once for the whole session."""
    build = run_matrix(DATA / "amd64.toml", tmp_path_factory.mktemp("amd64-out"))
    assert build.returncode == 0, build.stderr[-3000:] + json.dumps(
        [j for j in build.report.get("jobs", []) if j["status"] != "done"], indent=1
    )
    return build


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return {line.split()[4] for line in fh}


def _loops() -> set[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return set(out.splitlines())


def _processes() -> set[tuple[int, str]]:
    """Processes of the kinds we start (by name) that carry this session's mark."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
                if not comm.startswith(OURS):
                    continue
                if SESSION_MARK.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:
                continue
            found.add((int(entry.name), comm))
    return found


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test that leaves a mount, a loop device or a process of ours behind."""
    before = (_mounts(), _loops(), _processes())
    yield
    after = (_mounts(), _loops(), _processes())
    leaked = [sorted(map(str, now - then)) for then, now in zip(before, after, strict=True)]
    assert leaked == [[], [], []], f"left behind (mounts, loop devices, processes): {leaked}"
