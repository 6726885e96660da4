"""Shared test helpers: where things are and how to run the real CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
FACTORY = [sys.executable, "-m", "factory"]

# Every process this test session starts inherits this mark, so the leak guard can tell
# ours from those of anything else running on the machine.
SESSION_MARK = f"FACTORY_TEST_SESSION={uuid.uuid4().hex}"
os.environ["FACTORY_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]

# The pid of every `factory` this session started (by `factory()` or a test's own Popen):
# a run names its folders in a shared cache after its pid, so the leak guard can tell the
# mounts and devices of our runs from those of anything else using the cache.
STARTED: set[int] = set()

T = TypeVar("T")


def factory(
    *args: str | os.PathLike[str],
    timeout: float = 1800,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `factory` command as a user would (`env`: variables added)."""
    argv = [*FACTORY, *map(str, args)]
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env} if env else None,
    ) as proc:
        STARTED.add(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def wait_until(what: str, probe: Callable[[], T], timeout: float = 600, every: float = 0.1) -> T:
    """Poll `probe` until it returns something true, and return that; fail naming `what`
    when `timeout` seconds pass first (a deadline for a condition, not a guess of time)."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)
    return found


def sha256(path: Path) -> str:
    """sha256 of a file, read as any user's checksum tool would."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def qcow2_clusters(image: Path) -> list[tuple[int, int]]:
    """(guest offset, host offset) of every data cluster of a qcow2, from its L1 and L2
    tables (compressed clusters too, whose host offsets `qemu-img map` does not give)."""
    with open(image, "rb") as fh:
        header = fh.read(104)
        assert header[:4] == b"QFI\xfb", f"{image}: not a qcow2"
        version, bits = (
            struct.unpack_from(">I", header, 4)[0],
            struct.unpack_from(">I", header, 20)[0],
        )
        l1_size, l1_offset = struct.unpack_from(">IQ", header, 36)
        if version >= 3:
            assert not struct.unpack_from(">Q", header, 72)[0] & 16, "extended L2 entries"
        cluster = 1 << bits
        per_table = cluster // 8
        compressed_bits = 62 - (bits - 8)  # a compressed entry's host offset: bits 0..x-1
        fh.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", fh.read(8 * l1_size))
        found = []
        for i, l1_entry in enumerate(l1):
            if not (table := l1_entry & 0x00FFFFFFFFFFFE00):
                continue
            fh.seek(table)
            for j, entry in enumerate(struct.unpack(f">{per_table}Q", fh.read(cluster))):
                if entry >> 62 & 1:
                    host = entry & ((1 << compressed_bits) - 1)
                else:
                    host = entry & 0x00FFFFFFFFFFFE00
                if host:
                    found.append(((i * per_table + j) * cluster, host))
    return sorted(found)


# ---- where the suite's time goes ---------------------------------------------------------

_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Every phase's time, by module (with xdist, on the controller as reports arrive)."""
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The modules that took a minute or more, longest first: what to look at when the
    suite outgrows its budget (LONGEST_FIRST in tests/integration/conftest.py)."""
    slow = sorted(((s, m) for m, s in _MODULE_SECONDS.items() if s >= 60), reverse=True)
    if slow:
        terminalreporter.section("seconds per module (setup + call + teardown)")
        for seconds, module in slow:
            terminalreporter.write_line(f"{seconds:8.1f}s {module}")
