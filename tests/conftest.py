"""Shared test helpers: where things are and how to run the real CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
