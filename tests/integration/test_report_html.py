"""report.html of a real run, read by a real browser: the shared amd64 tree (warm cache)
as raw, qcow2, tar and squashfs, with the squashfs pack failing for real (a mksquashfs
first on PATH that exits 1). Headless Chromium's DOM must show every artifact with its
size and sha256, the failure with its error, and a timeline bar per job that ran; its
screenshot at a laptop's width must be written. Then `factory report OUT` writes the page
again from report.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from factory.report_html import human_size, ran
from tests.conftest import factory
from tests.integration.conftest import CACHE, DATA

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CELL = "debian-bookworm-amd64"
FAILING_MKSQUASHFS = """#!/bin/sh
echo "mksquashfs: refusing on purpose (test_report_html)" >&2
exit 1
"""


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on `page`, with a fresh profile and nothing fetched. (JavaScript
    stays on: headless --dump-dom and --screenshot need it to read the page; the page
    itself holds no script, which test_report_html's unit tests check.)"""
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed (scripts/setup installs it: apt-get install chromium)"
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_report_html_of_a_run_with_a_failure(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mksquashfs").write_text(FAILING_MKSQUASHFS)
    (bin_dir / "mksquashfs").chmod(0o755)
    out = tmp_path / "out"
    proc = factory(
        "run", DATA / "report.toml", "--out", out, "--cache", CACHE, "--events", "json",
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    jobs = {j["id"]: j for j in report["jobs"]}
    failed = jobs[f"pack:{CELL}:squashfs"]
    assert failed["status"] == "failed", failed
    assert "mksquashfs exited 1" in failed["error"], failed["error"]
    assert jobs[f"publish:{CELL}:squashfs"]["status"] == "skipped"
    assert sorted(a["format"] for a in report["artifacts"]) == ["qcow2", "raw", "tar"]
    assert all(isinstance(j.get("deps"), list) for j in report["jobs"])
    page = out / "report.html"
    text = page.read_text()
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text

    dom = chromium(page, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f"<title>{report['matrix']}: failed</title>" in html, html[:2000]
    for art in report["artifacts"]:
        cell = re.search(
            rf'<td class="ok" data-artifact="{re.escape(art["path"])}">(.*?)</td>', html
        )
        assert cell, (art["path"], html[:3000])
        assert f'<a href="{art["path"]}">{human_size(art["size"])}</a>' in cell.group(1)
        assert f">{art['sha256'][:12]}</code>" in cell.group(1)
    bad = re.search(r'<td class="bad">(.*?)</td>', html, re.S)
    assert bad and "mksquashfs exited 1" in bad.group(1), html
    assert "refusing on purpose" in html  # its log's tail, in the failures
    drawn = re.findall(r'<g class="[^"]*" data-job="([^"]*)">', html)
    assert sorted(drawn) == sorted(j["id"] for j in report["jobs"] if ran(j)), drawn
    assert len(drawn) == len(set(drawn)) >= 6  # rootfs, finalise, assemble, 2 packs, ...
    assert re.search(r'<g class="[^"]*\bcrit\b[^"]*" data-job=', html), "no critical path"

    shot = tmp_path / "report.png"
    taken = chromium(
        page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1366,900"
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # `factory report OUT`: the same page again from report.json.
    page.unlink()
    again = factory("report", out)
    assert again.returncode == 0, again.stderr
    assert page.read_text() == text
