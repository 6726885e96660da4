"""The `factory run` and `factory boot` options, each through the real CLI, on the shared
amd64 tree from the warm cache (cli.toml: raw, qcow2 and tar; fail-fast.toml: the cached
amd64 and ppc64el trees of layouts.toml)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import factory
from tests.integration.conftest import CACHE, DATA, Build, run_matrix

CLI = DATA / "cli.toml"
CELL = "debian-bookworm-amd64"
PPC = "debian-bookworm-ppc64el"
PLAIN = re.compile(r"^\d\d:\d\d:\d\d (?P<text>.*)$")

pytestmark = pytest.mark.slow


def cli_run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`factory run cli.toml` with the options given, as a user types it."""
    return factory("run", CLI, "--out", out, "--cache", CACHE, *args)


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    return data


def most_at_once(spans: list[tuple[str, str]]) -> int:
    """The most jobs running at once, from (kind, job) in the order they were said."""
    running: set[str] = set()
    most = 0
    for kind, job in spans:
        if kind == "start":
            running.add(job)
            most = max(most, len(running))
        elif kind in ("done", "failed", "skipped", "cancelled"):
            running.discard(job)
    return most


def plain_events(stderr: str) -> list[tuple[str, str]]:
    """(kind, job) of each job line of `--events plain` output."""
    found = []
    for line in stderr.splitlines():
        text = PLAIN.fullmatch(line)
        assert text, f"not a plain event line: {line!r}"
        kind, _, rest = text["text"].partition(" ")
        job = rest.strip().split(": ")[0].split(" on ")[0]
        if kind in ("start", "progress", "done", "failed", "skipped", "cancelled"):
            found.append((kind, job))
    return found


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """cli.toml run with --jobs 1 (its raw disk also serves the boot test below)."""
    return run_matrix(CLI, tmp_path_factory.mktemp("jobs-1"), "--jobs", "1")


def test_jobs_1_runs_one_job_at_a_time(sequential: Build) -> None:
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    assert {j["status"] for j in sequential.report["jobs"]} == {"done"}
    spans = [(e["kind"], e["job"]) for e in sequential.events if e.get("job")]
    started = [job for kind, job in spans if kind == "start"]
    assert sorted(started) == sorted(j["id"] for j in sequential.report["jobs"])
    assert most_at_once(spans) == 1


def test_events_plain_is_one_timestamped_line_per_event(tmp_path: Path) -> None:
    """--events plain: every line on stderr is `HH:MM:SS what`, nothing on stdout; with
    --jobs 2 the jobs that can overlap do (so --jobs 1 above is what kept them apart)."""
    done = cli_run(tmp_path / "out", "--events", "plain", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    spans = plain_events(done.stderr)  # every line has the shape
    jobs = [j["id"] for j in report(tmp_path / "out")["jobs"]]
    assert PLAIN.fullmatch(lines[0])["text"] == f"run itest-cli: {len(jobs)} jobs"  # type: ignore[index]
    last = PLAIN.fullmatch(lines[-1])["text"]  # type: ignore[index]
    assert last.startswith(f"run built: 3 artifacts in {tmp_path / 'out'} ("), last
    assert sorted(job for kind, job in spans if kind == "start") == sorted(jobs)
    assert sorted(job for kind, job in spans if kind == "done") == sorted(jobs)
    assert most_at_once(spans) == 2


def test_events_rich_prints_results_not_event_lines(tmp_path: Path) -> None:
    """--events rich (what a terminal gets): finished jobs, artifacts and the summary as
    text on stderr, no timestamped event lines, no JSON, nothing on stdout."""
    wide = {"COLUMNS": "200"}  # a terminal's width: no line of the test is wrapped
    done = factory(
        "run", CLI, "--out", tmp_path / "out", "--cache", CACHE, "--events", "rich",
        "--only", "*:tar", env=wide,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    lines = [line.rstrip() for line in done.stderr.splitlines()]
    assert not [line for line in lines if PLAIN.fullmatch(line) or line.startswith("{")]
    for job in (f"rootfs:{CELL}", f"publish:{CELL}:tar"):
        assert [x for x in lines if x == f"done {job}" or x.startswith(f"done {job}: ")], lines
    assert f"  → {CELL}/{CELL}.tar" in lines, lines
    jobs = len(report(tmp_path / "out")["jobs"])
    bar = re.compile(rf"\s*itest-cli\s.*\s{jobs}/{jobs}\s.*")  # the run's bar, full
    assert [line for line in lines if bar.fullmatch(line)], lines
    (summary,) = [line for line in lines if line.startswith("run built: ")]
    assert summary.startswith(f"run built: 1 artifacts in {tmp_path / 'out'} ("), summary


@pytest.mark.timeout(1500)
def test_refresh_rebuilds_the_cached_tree(tmp_path: Path) -> None:
    """Without --refresh the tree comes from the cache; with it, mmdebstrap builds it again
    (under the same key: the inputs did not change)."""
    cached = run_matrix(CLI, tmp_path / "cached", "--only", "*:tar")
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert cached.job(f"rootfs:{CELL}")["info"]["cached"] is True
    fresh = run_matrix(CLI, tmp_path / "fresh", "--only", "*:tar", "--refresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    rootfs = fresh.job(f"rootfs:{CELL}")
    assert rootfs["status"] == "done" and rootfs["info"]["cached"] is False
    assert fresh.job(f"finalise:{CELL}")["info"]["cached"] is False
    assert rootfs["key"] == cached.job(f"rootfs:{CELL}")["key"]
    said = [e["message"] for e in fresh.events if e.get("job") == f"rootfs:{CELL}"]
    assert "mmdebstrap" in said, said
    # The command ran, to its end: the cached run's log has no mmdebstrap in it.
    mmdebstrap = re.compile(r"(?m)^\$ mmdebstrap ")
    assert not mmdebstrap.search((cached.out / cached.job(f"rootfs:{CELL}")["log"]).read_text())
    log = (fresh.out / rootfs["log"]).read_text()
    ran = mmdebstrap.search(log)
    assert ran, log[-2000:]
    assert re.search(r"(?m)^# exit 0 after ", log[ran.end() :]), log[-2000:]


@pytest.mark.timeout(1200)
def test_fail_fast_stops_the_other_cell(tmp_path: Path) -> None:
    """The amd64 cell's hook fails; the ppc64el cell's hook would hold it for ten minutes.
    --fail-fast cancels it at the first failure and the run ends with exit 1. On a cold
    cache the ppc64el tree (emulated, slower) may still be building then: whichever of its
    jobs runs is cancelled, and none after it starts."""
    stopped = run_matrix(DATA / "fail-fast.toml", tmp_path / "out", "--fail-fast")
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    failed = stopped.job(f"finalise:{CELL}")
    assert failed["status"] == "failed" and "50-split exited 3" in failed["error"], failed
    ppc = {j["id"]: j["status"] for j in stopped.report["jobs"] if j["cell"] == PPC}
    cancelled = [jid for jid, status in ppc.items() if status == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0] in (f"rootfs:{PPC}", f"finalise:{PPC}"), ppc
    assert ppc[f"finalise:{PPC}"] in ("cancelled", "skipped"), ppc
    for cell in (CELL, PPC):
        after = [stopped.job(f"{kind}:{cell}:tar")["status"] for kind in ("pack", "publish")]
        assert set(after) <= {"skipped", "cancelled"}, (cell, after)
    assert stopped.report["artifacts"] == []
    order = [(e["kind"], e["job"]) for e in stopped.events if e.get("job")]
    assert order.index(("failed", f"finalise:{CELL}")) < order.index(("cancelled", cancelled[0]))


def test_boot_that_never_reaches_login_exits_1_with_the_console_tail(
    sequential: Build, tmp_path: Path
) -> None:
    """A disk whose kernel is told to run /bin/false as init: it panics, and `factory
    boot` says so and exits 1 with the console's last lines, without waiting out its
    timeout for a login prompt that cannot come."""
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    disk = tmp_path / "panics.raw"
    subprocess.run(["cp", "--sparse=always", sequential.artifact("raw"), disk], check=True)
    offset = sequential.job(f"assemble:{CELL}")["info"]["root_offset"]
    fs = f"{disk}?offset={offset}"
    cfg = subprocess.run(
        ["debugfs", "-R", "cat /boot/grub/grub.cfg", fs], capture_output=True, text=True, check=True
    ).stdout
    assert cfg.count("console=ttyS0,115200") >= 1
    (tmp_path / "grub.cfg").write_text(
        cfg.replace("console=ttyS0,115200", "console=ttyS0,115200 init=/bin/false")
    )
    commands = f"rm /boot/grub/grub.cfg\nwrite {tmp_path / 'grub.cfg'} /boot/grub/grub.cfg\n"
    subprocess.run(["debugfs", "-w", "-f", "-", fs], input=commands, text=True, check=True)
    console = tmp_path / "console.log"
    result = factory(
        "boot", disk, "--timeout", "150", "--log", console, "--cache", CACHE, timeout=300
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "login prompt after" not in result.stdout
    assert f"boot: {disk.name}: the kernel panicked after " in result.stderr
    assert "no login prompt within" not in result.stderr
    shown = [line[4:] for line in result.stderr.split("\n") if line.startswith("  | ")]
    logged = console.read_text(errors="replace").removesuffix("\n").split("\n")
    assert shown and shown == logged[-len(shown) :]
    assert any("Kernel panic - not syncing: Attempted to kill init!" in x for x in shown), shown


QEMU_IMG_CORRUPTING = """#!{python}
# qemu-img as it is, except that before the second `check` of a qcow2 (publish's, after
# convert's own) it zeroes the refcount of the cluster holding the L1 table, as a bad
# disk or a stray write would between the two stages.
import os, struct, sys

args = sys.argv[1:]
if args[:1] == ["check"] and args[-1].endswith(".qcow2"):
    with open({seen!r}, "a+") as seen:
        seen.write(args[-1] + "\\n")
        seen.seek(0)
        checks = len(seen.read().splitlines())
    if checks == 2:
        with open(args[-1], "r+b") as disk:
            header = disk.read(104)
            (bits,) = struct.unpack_from(">I", header, 20)
            (l1_offset, reftable) = struct.unpack_from(">QQ", header, 40)
            (order,) = struct.unpack_from(">I", header, 96)
            width = (1 << order) // 8
            per_block = (1 << bits) // width
            cluster = l1_offset >> bits
            disk.seek(reftable + 8 * (cluster // per_block))
            (block,) = struct.unpack(">Q", disk.read(8))
            disk.seek(block + cluster % per_block * width)
            disk.write(bytes(width))
os.execv({real!r}, [{real!r}, *args])
"""


def test_a_disk_that_fails_its_publish_check_is_not_published(tmp_path: Path) -> None:
    """publish checks each disk with `qemu-img check` before it gets a final name: a qcow2
    broken after its conversion is rejected there, and OUT never holds it."""
    real = shutil.which("qemu-img")
    assert real is not None
    bin_dir, seen = tmp_path / "bin", tmp_path / "checks"
    bin_dir.mkdir()
    wrapper = bin_dir / "qemu-img"
    wrapper.write_text(QEMU_IMG_CORRUPTING.format(python=sys.executable, seen=str(seen), real=real))
    wrapper.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    proc = factory(
        "run", CLI, "--out", out, "--cache", CACHE, "--events", "json", "--only", "*:qcow2",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    checked = seen.read_text().splitlines()
    assert len(checked) == 2, checked  # convert's check passed, publish's saw the damage
    jobs = {j["id"]: j for j in report(out)["jobs"]}
    assert jobs[f"convert:{CELL}:qcow2"]["status"] == "done"
    publish = jobs[f"publish:{CELL}:qcow2"]
    assert publish["status"] == "failed", publish
    assert "qemu-img exited 2" in publish["error"], publish["error"]
    log = (out / publish["log"]).read_text()
    assert "$ qemu-img check -q -f qcow2 " in log and checked[1] in log, log[-2000:]
    assert re.search(r"ERROR cluster \d+ refcount=0 reference=1", log), log[-2000:]
    assert report(out)["artifacts"] == []
    assert not list(out.glob(f"{CELL}/{CELL}.qcow2*"))
    assert [p for p in out.rglob("*") if p.name.startswith(".tmp-")] == []
