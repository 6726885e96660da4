"""report.html from synthetic reports: lanes, the critical path, escaping, failures in red,
nothing fetched; `factory report OUT` and its one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from factory import cli, report, report_html
from factory.report_html import critical_path, lanes, render
from factory.scheduler import JobRun
from tests.unit.test_nightly_record import setup

CELL = "debian-bookworm-amd64"
SHA = "0123456789abcdef" * 4


def job(
    jid: str, start: float | None, end: float | None, deps: tuple[str, ...] = (), **kw: Any
) -> dict[str, Any]:
    kind, cell = jid.split(":")[:2]
    return {
        "id": jid,
        "kind": kind,
        "cell": cell,
        "deps": list(deps),
        "status": "done",
        "started": start,
        "finished": end,
        "host": None,
        "error": None,
        "tail": [],
        "info": {},
        "log": f"logs/{jid.replace(':', '_')}.log",
        **kw,
    }


def small_report() -> dict[str, Any]:
    """One cell: a tree (10 s), finalise (5 s), then a raw disk and a tar side by side; the
    tar's pack is long, so the path through it ends last."""
    c = CELL
    jobs = [
        job(f"rootfs:{c}", 0, 10),
        job(f"finalise:{c}", 10, 15, (f"rootfs:{c}",)),
        job(f"assemble:{c}", 15, 20, (f"finalise:{c}",)),
        job(f"publish:{c}:raw", 20, 22, (f"assemble:{c}",)),
        job(f"convert:{c}:qcow2", 20, 30, (f"assemble:{c}",)),
        job(f"publish:{c}:qcow2", 30, 31, (f"convert:{c}:qcow2",)),
        job(f"pack:{c}:tar", 15, 40, (f"finalise:{c}",)),
        job(f"publish:{c}:tar", 40, 42, (f"pack:{c}:tar",)),
        job(f"boot:{c}", 20, 60, (f"assemble:{c}",), info={"login_after": 38.5}),
    ]
    jobs[-1]["info"]["firmware"] = "seabios"
    # boot ends last, but publish:tar is what the critical path must not take: it ends at 42
    arts = [
        {"cell": c, "format": f, "path": f"{c}/{c}.{f}", "size": n, "sha256": SHA}
        for f, n in (("raw", 2 * 1024**3), ("qcow2", 700 * 1024**2), ("tar", 123456))
    ]
    for j in jobs:
        if j["kind"] == "publish":
            fmt = j["id"].rsplit(":", 1)[1]
            j["info"] = {"artifact": next(a for a in arts if a["format"] == fmt)}
    return {
        "matrix": "small",
        "status": "built",
        "started": 0.0,
        "finished": 61.0,
        "cells": {
            c: {
                "epoch": 1700000000,
                "archive": [
                    {
                        "suite": "bookworm",
                        "uri": "http://mirror.invalid/debian",
                        "date": "D1",
                        "sha256": "ab" * 32,
                    },
                ],
                "changes": {
                    "added": [{"package": "newpkg", "version": "1.0"}],
                    "removed": [],
                    "changed": [{"package": "libc6", "old": "2.36-9", "new": "2.36-10"}],
                },
            }
        },
        "jobs": jobs,
        "artifacts": arts,
    }


def bars(page: str) -> dict[str, str]:
    """data-job → the bar's class attribute."""
    return dict(
        (jid, cls) for cls, jid in re.findall(r'<g class="([^"]*)" data-job="([^"]*)">', page)
    )


intervals = st.lists(
    st.tuples(
        st.floats(0, 100, allow_nan=False),
        st.floats(0.1, 50, allow_nan=False),
        st.sampled_from([None, "a", "b"]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(intervals)
def test_lanes_never_overlap_and_are_as_few_as_the_overlap_needs(spans: list[Any]) -> None:
    jobs = [
        job(f"pack:c:{i}", start, start + length, host=host)
        for i, (start, length, host) in enumerate(spans)
    ]
    placed = lanes(jobs)
    assert len(placed) == len(jobs)
    for a in placed:
        for b in placed:
            if a is b or (a.host, a.lane) != (b.host, b.lane):
                continue
            assert a.job["finished"] <= b.job["started"] or b.job["finished"] <= a.job["started"]
    for host in {b.host for b in placed}:
        mine = [b for b in placed if b.host == host]
        points = sorted({b.job["started"] for b in mine})
        most = max(
            sum(1 for b in mine if b.job["started"] <= t < b.job["finished"]) for t in points
        )
        assert 1 + max(b.lane for b in mine) == max(most, 1)


def test_jobs_that_did_not_run_get_no_bar() -> None:
    rep = small_report()
    rep["jobs"] += [
        job(f"publish:{CELL}:vhd", None, None, status="skipped"),
        job(f"publish:{CELL}:vdi", 1, 2, status="unchanged"),
    ]
    page = render(rep)
    drawn = bars(page)
    assert set(drawn) == {j["id"] for j in rep["jobs"][:-2]}
    assert page.count("<rect ") == len(drawn)


def test_critical_path_is_the_longest_chain_to_the_last_job() -> None:
    rep = small_report()
    c = CELL
    want = [f"rootfs:{c}", f"finalise:{c}", f"assemble:{c}", f"boot:{c}"]
    assert critical_path(rep["jobs"]) == want
    drawn = bars(render(rep))
    assert {j for j, cls in drawn.items() if "crit" in cls.split()} == set(want)
    # Without the boot test the tar's pack (25 s) outweighs assemble + convert (15 s).
    rep["jobs"] = [j for j in rep["jobs"] if j["kind"] != "boot"]
    assert critical_path(rep["jobs"]) == [
        f"rootfs:{c}", f"finalise:{c}", f"pack:{c}:tar", f"publish:{c}:tar"
    ]  # fmt: skip
    # By durations, not by which input ended last: a long dep that ended early wins.
    jobs = [job("rootfs:x", 0, 30), job("pack:x:a", 0, 31), job("publish:x:a", 31, 32,
            ("rootfs:x", "pack:x:a"))]  # fmt: skip
    jobs[0]["started"], jobs[1]["started"] = 0, 30
    assert critical_path(jobs) == ["rootfs:x", "publish:x:a"]


def test_matrix_shows_each_artifact_and_the_boot() -> None:
    page = render(small_report())
    for fmt, size in (("raw", "2.0 GiB"), ("qcow2", "700.0 MiB"), ("tar", "120.6 KiB")):
        assert f'<a href="{CELL}/{CELL}.{fmt}">{size}</a>' in page
    assert page.count(f">{SHA[:12]}</code>") == 3 + 0  # the archive's digest is another
    assert "login after 38.5 s" in page and "seabios" in page
    assert "libc6 2.36-9 → 2.36-10" in page and "added newpkg 1.0" in page
    assert "1 upgraded, 1 added, 0 removed" in page


def test_changes_say_first_build_and_no_change() -> None:
    rep = small_report()
    rep["cells"]["other"] = {"epoch": 1, "changes": None}
    rep["cells"]["same"] = {"epoch": 1, "changes": {"added": [], "removed": [], "changed": []}}
    page = render(rep)
    assert "first build" in page and "no change" in page


def test_a_failed_job_is_red_with_its_error_and_tail() -> None:
    rep = small_report()
    pack = next(j for j in rep["jobs"] if j["id"] == f"pack:{CELL}:tar")
    pack.update(status="failed", error="tar exited 2", tail=[f"line {i}" for i in range(30)])
    rep["jobs"] = [j for j in rep["jobs"] if j["id"] != f"publish:{CELL}:tar"]
    rep["artifacts"] = [a for a in rep["artifacts"] if a["format"] != "tar"]
    page = render(rep)
    cell = re.search(r'<td class="bad">(.*?)</td>', page)
    assert cell and "tar exited 2" in cell.group(1) and f"pack:{CELL}:tar" in cell.group(1)
    box = re.search(r'<div class=failure id="job-pack_[^"]*">(.*?)</div>', page, re.S)
    assert box, page
    assert "tar exited 2" in box.group(1) and "line 29" in box.group(1)
    assert "line 9\n" not in box.group(1)  # the last 20 lines only
    assert 'fill="#d62728"' in page  # its bar too


def test_every_string_is_escaped() -> None:
    rep = small_report()
    evil = '<script>alert("x")</script>&'
    rep["matrix"] = evil
    rep["jobs"][0].update(status="failed", error=evil, tail=[evil], host=evil)
    rep["cells"][CELL]["archive"][0]["suite"] = evil
    rep["artifacts"][0]["sha256"] = evil
    page = render(rep)
    assert "<script" not in page and "alert(&quot;x&quot;)" in page
    assert "&lt;script&gt;" in page


def test_nothing_is_fetched() -> None:
    page = render(small_report())
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page  # the archive's uri is not shown
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert "url(" not in page and "@import" not in page
    # A path in the report that is no file of OUT is shown, never linked.
    rep = small_report()
    rep["artifacts"][0]["path"] = "https://elsewhere.invalid/x.raw"
    rep["jobs"][0].update(status="failed", log="/etc/passwd")
    rep["cells"][CELL]["sbom"] = "."
    page = render(rep)
    links = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert links and not [h for h in links if "://" in h or h.startswith("/") or h == "."]
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page)
    assert "url(" not in page and "@import" not in page


def test_factory_report_rebuilds_the_page(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps(small_report()))
    result = CliRunner().invoke(cli.app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").read_text() == render(small_report())


def test_factory_report_refuses_in_one_line(tmp_path: Path) -> None:
    cases = {
        "missing": None,
        "garbage": "{not json",
        "list": "[1, 2]",
        "odd": json.dumps({"jobs": [{"id": "x", "started": "soon", "finished": []}],
                           "artifacts": "none", "cells": {"c": {"archive": 3}}}),
    }  # fmt: skip
    for name, text in cases.items():
        out = tmp_path / name
        out.mkdir()
        if text is not None:
            (out / "report.json").write_text(text)
        result = CliRunner().invoke(cli.app, ["report", str(out)])
        if name == "odd":  # odd records are shown as they are, not a crash
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code == 2, (name, result.output)
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit
        ), result.exception
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{out}/report.json"), (name, lines)
        assert not (out / "report.html").exists()


async def test_report_json_records_each_jobs_deps(tmp_path: Path) -> None:
    plan, out, _ = setup(tmp_path)
    runs = [JobRun(j, status="done", started=1.0, finished=2.0) for j in plan.jobs]
    doc = await report.write(out, "t", 1.0, 3.0, "built", runs)
    assert {j["id"]: j["deps"] for j in doc["jobs"]} == {j.id: list(j.deps) for j in plan.jobs}
    await report_html.write(out, doc)
    assert "critical path" in (out / "report.html").read_text()
