"""A changed stage rebuilds what it made: job keys cover the code of the stage that runs
them (factory.stages.registry), not only a recipe number someone must remember to bump.

The same matrix is built twice with one cache: once with this checkout's code, once with
a copy of it whose finalise.py differs by one comment line. The second run takes the tree
from mmdebstrap from the cache (rootfs's code did not change) and finalises it again
(finalise's did), under a new key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import CACHE

MATRIX = """\
name = "fingerprint"
arches = ["amd64"]
distros = ["debian/bookworm"]
formats = ["tar"]
[mirrors]
debian = "host"
"""


def build(code: Path, matrix: Path, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`python -m factory run` with the factory package found in `code` (its cwd)."""
    proc = subprocess.run(
        [sys.executable, "-m", "factory", "run", matrix, "--out", out, "--cache", CACHE,
         "--events", "json"],
        cwd=code, capture_output=True, text=True, timeout=1500,
        env={**os.environ, "PYTHONPATH": str(code)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads((out / "report.json").read_text()), events


def keys(report: dict[str, Any]) -> dict[str, str]:
    return {job["id"].split(":", 1)[0]: job["key"] for job in report["jobs"]}


def said(events: list[dict[str, Any]], kind: str) -> list[str]:
    return [e["message"] for e in events if e["kind"] == "progress" and e["job_kind"] == kind]


@pytest.mark.slow
def test_a_changed_stage_rebuilds_its_tree(tmp_path: Path) -> None:
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX)
    before, _ = build(ROOT, matrix, tmp_path / "o1")

    changed = tmp_path / "code"
    shutil.copytree(ROOT / "factory", changed / "factory", ignore=shutil.ignore_patterns("*.pyc"))
    with open(changed / "factory/stages/finalise.py", "a") as fh:
        # Its own change each time: the same change would find its tree in the cache
        # from the last time this test ran (keys are deterministic).
        fh.write(f"\n# a change to the finalise stage: {uuid.uuid4()}\n")
    where = subprocess.run(
        [sys.executable, "-c", "import factory; print(factory.__file__)"],
        cwd=changed, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(changed)},
    ).stdout.strip()  # fmt: skip
    assert where == str(changed / "factory/__init__.py")  # the copy runs, not the checkout

    after, events = build(changed, matrix, tmp_path / "o2")
    old, new = keys(before), keys(after)
    assert new["rootfs"] == old["rootfs"]
    assert "from cache" in said(events, "rootfs")
    assert new["finalise"] != old["finalise"]
    assert "from cache" not in said(events, "finalise")
    assert "copying tree" in said(events, "finalise")  # really finalised again
    assert new["pack"] != old["pack"]  # made from the new tree
