"""Shared test helpers: where things are and how to run the real CLI."""

from __future__ import annotations

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
    *args: str | os.PathLike[str], timeout: float = 1800, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the real `factory` command as a user would."""
    return subprocess.run(
        [*FACTORY, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        cwd=ROOT,
    )


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)
