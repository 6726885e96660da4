"""Two builds with different TMPDIR and OUT paths, minutes apart, are bit-identical.

A ppc64el cell (its tree made under qemu-user): the first build may take its tree from
the shared cache, the second rebuilds it with --refresh; every artifact, the SBOM and the
package manifest must come out the same, byte for byte. Its formats are those whose bytes
hold the arch: the disk (PReP, ppc64el's grub), the tree as tar, and docker's config.
The other formats' code does not look at the arch; test_nightly rebuilds an amd64 cell
in all ten and compares them the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import factory, sha256
from tests.integration.conftest import CACHE

CELL = "debian-bookworm-ppc64el"
FORMATS = ["raw", "tar", "docker"]
MATRIX = f"""\
name = "repro-ppc"
arches = ["ppc64el"]
distros = ["debian/bookworm"]
formats = {json.dumps(FORMATS)}

[image]
layout = "ppc-prep"

[mirrors]
debian = "host"
# as tests/integration/data/ppc64el.toml: the mirror's bookworm-security index for
# ppc64el does not match its Release file
security = false
"""


def ppc64le_runs_here() -> str | None:
    """Why ppc64el programs cannot run here under qemu-user, or None when they can (or
    factory can enable them: it mounts binfmt_misc and enables the entry itself)."""
    if shutil.which("qemu-ppc64le-static") is None and shutil.which("qemu-ppc64le") is None:
        return "qemu-user-static is not installed"
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-ppc64le")
    if entry.exists():
        return None
    if not Path("/usr/share/binfmts/qemu-ppc64le").exists():
        return "no binfmt entry for qemu-ppc64le (install binfmt-support and qemu-user-static)"
    if shutil.which("update-binfmts") is None or shutil.which("arch-test") is None:
        return "update-binfmts or arch-test is missing"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # two builds of every format, the second with --refresh
    pytest.mark.skipif(ppc64le_runs_here() is not None, reason=str(ppc64le_runs_here())),
]


@pytest.fixture(scope="module", autouse=True)
def binfmt_misc() -> None:
    """factory mounts binfmt_misc for the whole machine and leaves it mounted (as systemd
    would); mount it before the leak guard's first look, so it is not counted as a mount
    this test left behind."""
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"],
            check=True,
            capture_output=True,
        )


def build(matrix: Path, out: Path, tmpdir: Path, *args: str) -> dict[str, Any]:
    tmpdir.mkdir(parents=True)
    done = factory(
        "run",
        matrix,
        "--out",
        out,
        "--cache",
        CACHE,
        *args,
        timeout=3600,
        env={"TMPDIR": str(tmpdir)},
    )
    report_file = out / "report.json"
    report: dict[str, Any] = json.loads(report_file.read_text()) if report_file.exists() else {}
    failed = [j for j in report.get("jobs", []) if j["status"] not in ("done", "unchanged")]
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{json.dumps(failed, indent=1)}"
    return report


def published(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    """What must be bit-identical: every artifact by format, the SBOM and the manifest."""
    files = {a["format"]: out / a["path"] for a in report["artifacts"]}
    files["sbom"] = out / CELL / f"{CELL}.spdx.json"
    files["manifest"] = out / CELL / f"{CELL}.manifest.json"
    return files


def test_two_builds_apart_are_bit_identical(tmp_path: Path) -> None:
    matrix = tmp_path / "repro.toml"
    matrix.write_text(MATRIX)
    out1, out2 = tmp_path / "out-one", tmp_path / "elsewhere" / "out-two"

    first = build(matrix, out1, tmp_path / "tmp-a")
    second = build(matrix, out2, tmp_path / "tmp-b" / "deeper", "--refresh")

    one, two = published(out1, first), published(out2, second)
    assert sorted(a["format"] for a in first["artifacts"]) == sorted(FORMATS)
    assert one.keys() == two.keys()
    missing = sorted(name for name in one if not one[name].is_file() or not two[name].is_file())
    reported = {a["format"]: a["sha256"] for a in first["artifacts"]}
    reported_again = {a["format"]: a["sha256"] for a in second["artifacts"]}
    differ = sorted(
        name
        for name in one
        if name not in missing
        and (
            sha256(one[name]) != sha256(two[name]) or reported.get(name) != reported_again.get(name)
        )
    )
    example = f" (compare with: diffoscope {one[differ[0]]} {two[differ[0]]})" if differ else ""
    assert (missing, differ) == ([], []), (
        f"not published by both builds: {missing}; "
        f"these differ between the two builds: {differ}{example}"
    )
