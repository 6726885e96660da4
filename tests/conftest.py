"""Shared test helpers: where things are and how to run the real CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACTORY = [sys.executable, "-m", "factory"]

# Every process this test session starts inherits this mark, so the leak guard can tell
# ours from those of anything else running on the machine.
SESSION_MARK = f"FACTORY_TEST_SESSION={uuid.uuid4().hex}"
os.environ["FACTORY_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def factory(
    *args: str | os.PathLike[str],
    timeout: float = 1800,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `factory` command as a user would (`env`: variables added)."""
    return subprocess.run(
        [*FACTORY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        cwd=ROOT,
        env={**os.environ, **env} if env else None,
    )


def sha256(path: Path) -> str:
    """sha256 of a file, read as any user's checksum tool would."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)
