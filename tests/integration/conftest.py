"""Integration fixtures: one real build per session, shared by every assertion on it,
and a guard that fails any test leaving a mount, loop device or process behind.

Trees come from the default cache (/var/cache/factory), so a warm machine rebuilds
nothing; FACTORY_TEST_CACHE points the tests at another cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SESSION_MARK, STARTED, factory

DATA = Path(__file__).parent / "data"
CACHE = Path(os.environ.get("FACTORY_TEST_CACHE", "/var/cache/factory"))
OURS = ("qemu-system", "qemu-img", "mmdebstrap", "mksquashfs", "sshd", "apt-get", "dpkg")


# The integration modules, longest first (their last measured times): scripts/test runs
# two pytest-xdist workers, each taking whole modules in this order, and the longest
# first leaves the least for one worker to finish alone. One not listed goes last.
LONGEST_FIRST = (
    "test_layouts",
    "test_amd64",
    "test_formats",
    "test_publish_oci",
    "test_cli_options",
    "test_nightly",
    "test_repro",
    "test_cloud_init",
    "test_remote",
    "test_publish_sftp",
    "test_arm64",
    "test_uefi",
    "test_partitions",
    "test_loop",
    "test_ppc64el",
    "test_reliability",
    "test_progress_tty",
    "test_ci",
    "test_container",
    "test_repro_disk",
    "test_interrupt",
    "test_fingerprint",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the integration modules longest first (the unit tests stay ahead of them),
    and skip every integration test when not root (a `pytestmark` in a conftest is
    ignored: the skip has to be put on the items)."""
    here = Path(__file__).parent

    def rank(item: pytest.Item) -> int:
        if not item.path.is_relative_to(here):
            return -1
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order
    if os.geteuid() == 0:
        return
    needs_root = pytest.mark.skip(reason="builds images: needs root")
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(needs_root)


@contextlib.contextmanager
def alone(what: str) -> Iterator[None]:
    """Hold a lock that every test session on this machine takes for `what` (scripts/test
    runs two workers): for tests that need, say, the loop devices to themselves."""
    with open(f"/tmp/factory-test-{what}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def loop_devices_alone() -> Iterator[None]:
    """The loop devices to one module at a time: test_loop asserts which device a build
    gets, and a --loop or XFS build in the other worker could take it first."""
    with alone("loop"):
        yield


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


def _ours(path: str, base: Path) -> bool:
    """Whether `path` is in a folder this session made: pytest's base folder (every
    tmp_path, OUT and private cache of the tests), or a run's own folder in the shared
    cache (`tmp/KEY.PID...`, named after the pid of a `factory` we started)."""
    p = Path(path)
    if p.is_relative_to(base):
        return True
    if not p.is_relative_to(CACHE / "tmp"):
        return False
    parts = p.relative_to(CACHE / "tmp").parts
    return bool(parts) and any(
        parts[0].endswith(f".{pid}") or f".{pid}." in parts[0] for pid in STARTED
    )


def mounts_ours(base: Path) -> set[str]:
    """The mount points in folders this session made (see _ours)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        points = {line.split()[4].replace("\\040", " ") for line in fh}
    return {m for m in points if _ours(m, base)}


def loops_ours(base: Path) -> set[str]:
    """The loop devices whose backing file is in a folder this session made."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = set()
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip().removesuffix(" (deleted)")
        if back and _ours(back, base):
            found.add(f"{name} {back}")
    return found


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def processes_ours(base: Path, pattern: str = "") -> set[tuple[int, str]]:
    """Live processes this session made whose command line matches `pattern` (a regular
    expression; empty: those of the kinds we start, OURS or a `factory`). A process is
    ours when it descends from this pytest, carries this session's mark in its
    environment, or has its working folder, root (a chroot) or an argument in a folder
    this session made (see _ours): orphans of a killed run are found by the last two."""
    table: dict[int, tuple[int, str, bytes, Path]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat").decode(errors="replace")
        cmdline = _read(entry / "cmdline")
        if not stat or not cmdline:  # gone, or a kernel thread
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        start = stat.rpartition(")")[2].split()[19]
        table[int(entry.name)] = (ppid, start, cmdline, entry)
    me = os.getpid()

    def descends(pid: int) -> bool:
        seen = set()
        while pid in table and pid not in seen:
            seen.add(pid)
            pid = table[pid][0]
            if pid == me:
                return True
        return False

    found = set()
    for pid, (_, start, cmdline, entry) in table.items():
        if pid == me:
            continue
        args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
        line = " ".join(args)
        if pattern:
            if not re.search(pattern, line):
                continue
        elif not (Path(args[0]).name.startswith(OURS) or "factory" in args[1:3]):
            continue
        if (
            descends(pid)
            or SESSION_MARK.encode() in _read(entry / "environ").split(b"\0")
            or any(
                _ours(p, base)
                for p in (_link(entry / "cwd"), _link(entry / "root"), *args)
                if p.startswith("/") and p != "/"
            )
        ):
            found.add((pid, f"{start} {line[:200]}"))
    return found


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the test that leaves a mount, a loop device or a process of ours behind. Only
    what this session made counts (see _ours): other work on the machine, another test
    session among it, neither fails nor hides behind this guard."""
    base = tmp_path_factory.getbasetemp()

    def now() -> tuple[set[str], set[str], set[tuple[int, str]]]:
        return mounts_ours(base), loops_ours(base), processes_ours(base)

    before = now()
    yield
    after = now()
    leaked = [sorted(map(str, new - old)) for old, new in zip(before, after, strict=True)]
    assert leaked == [[], [], []], f"left behind (mounts, loop devices, processes): {leaked}"
