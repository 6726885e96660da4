"""The SSH farm simulation (tests/farm.py), small: 5 in-process asyncssh hosts on 127.0.0.1,
30 cells, one host dropped while it has a cell in progress, factory's real controller in a
process of its own. Only correctness here: every cell built exactly once in the end, none
lost, none twice in OUT, and report.json naming the lost host in each retry. The figures
(CPU per job, memory, 50 hosts) are scripts/bench --farm-only's.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import anyio
import pytest

from tests import farm


@pytest.mark.parametrize("mode", ["closed", "hung"])
def test_a_lost_hosts_cells_are_built_once_elsewhere(mode: str, tmp_path: Path) -> None:
    """closed: its connection is cut. hung: it answers nothing, connection open; the
    controller's keepalive (1 s here) finds it lost."""
    result = anyio.run(lambda: farm.simulate(5, 30, 1, modes=(mode,), base=tmp_path))
    assert result.problems == [], result.stderr[-3000:]
    assert list(result.dropped.values()) == [mode]
    (lost,) = result.dropped
    assert len(result.expected) == 30 and result.artifacts == result.expected
    assert set(result.published.values()) == {1} and len(result.published) == 30
    assert result.strays == [] and result.sums_ok
    # Every job that ran after a retry names the lost host and the one that took over.
    assert result.retries
    assert {x["host"] for rec in result.retries for x in rec["retries"]} == {lost}
    for rec in result.retries:
        assert rec["retries"][-1]["then"] == rec["host"] != lost
    assert not list(tmp_path.iterdir())  # the simulation removed its folder


def fake_out(out: Path, cells: list[str]) -> tuple[Counter[str], dict[str, str]]:
    """An OUT as a good farm run leaves it, with its publish events and no dropped host."""
    jobs, sums = [], []
    for cell in cells:
        (out / cell).mkdir(parents=True)
        data = f"{cell} built on h00\n".encode()
        (out / cell / f"{cell}.tar").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (out / cell / f"{cell}.tar.sha256").write_text(f"{digest}  {cell}.tar\n")
        sums.append(f"{digest}  {cell}/{cell}.tar\n")
        for kind in ("rootfs", "finalise", "pack", "publish"):
            jobs.append(
                {"id": f"{kind}:{cell}", "cell": cell, "status": "done", "host": "h00", "info": {}}
            )
    (out / "report.json").write_text(json.dumps({"status": "built", "jobs": jobs}))
    (out / "SHA256SUMS").write_text("".join(sums))
    return Counter(f"publish:{c}" for c in cells), {}


def check(out: Path, published: Counter[str], dropped: dict[str, str]) -> list[str]:
    return farm._check(out, {"exit": 0}, 2, 2, dropped, 0.0, published, "", 1).problems


def test_the_check_fails_on_a_lost_a_doubled_or_an_unnamed_cell(tmp_path: Path) -> None:
    """The simulation's verdict can fail: each way a farm can get a cell wrong."""
    cells = ["debian-r000-amd64", "debian-r000-arm64"]
    out = tmp_path / "out"
    published, dropped = fake_out(out, cells)
    assert check(out, published, dropped) == []
    # Published twice (a retry that ran publish again).
    assert check(out, published + Counter({f"publish:{cells[0]}": 1}), dropped)
    # A host lost, and report.json does not say so.
    assert check(out, published, {"h01": "closed"})
    # A copy left beside the artifact.
    stray = out / cells[0] / f".{cells[0]}.tar.fetched"
    stray.write_text("x")
    assert check(out, published, dropped)
    stray.unlink()
    # Another cell's bytes under a cell's name.
    mine = out / cells[0] / f"{cells[0]}.tar"
    mine.write_bytes((out / cells[1] / f"{cells[1]}.tar").read_bytes())
    assert check(out, published, dropped)
    # A cell lost.
    mine.unlink()
    assert check(out, published, dropped)
