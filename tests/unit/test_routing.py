"""Routing: which jobs go to hosts, how host keys are judged, and what a cell does when its
hosts are down or lost. No SSH server here (tests/integration/test_remote.py has real ones):
hosts point at a closed port, and the local executor is a fake that records its jobs."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from factory.events import Bus, Event
from factory.executors.placement import CellRun, Farm, HostLost, Session
from factory.executors.ssh import known_hosts_for
from factory.plan import Job, Plan, make_plan
from factory.results import Output, StageError
from factory.routing import router
from factory.scheduler import Scheduler
from factory.spec import Host, Matrix


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket is


def matrix(arches: list[str], hosts: list[dict[str, Any]], fallback: str = "none") -> Matrix:
    return Matrix.model_validate(
        {
            "name": "t",
            "arches": arches,
            "distros": ["debian/bookworm"],
            "formats": ["tar"],
            "hosts": hosts,
            "fallback": fallback,
        }
    )


def host(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "h",
        "address": "127.0.0.1",
        "port": closed_port(),
        "arches": ["ppc64el"],
        "known_hosts": str(tmp_path / "known_hosts"),
        "trust_unknown_hosts": True,
        **extra,
    }


class FakeWorkspace:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.refresh = False


class FakeLocal:
    """Stands in for LocalExecutor: records the jobs it ran."""

    host: str | None = None

    def __init__(self, out: Path) -> None:
        self.ws = FakeWorkspace(out)
        self.cpu = anyio.CapacityLimiter(2)
        self.ran: list[str] = []

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self.cpu

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        self.ran.append(job.id)
        return Output(None, {"ran": job.id})


async def run_plan(m: Matrix, local: FakeLocal, logs: Path) -> dict[str, Any]:
    plan = make_plan(m)
    events: list[Event] = []
    async with router(m, local, plan) as route:  # type: ignore[arg-type]
        runs = await Scheduler(plan, route, Bus(events.append), logs).run()
    return {"runs": runs, "events": events}


async def test_no_hosts_every_job_here(tmp_path: Path) -> None:
    m = matrix(["amd64"], [])
    local = FakeLocal(tmp_path)
    async with router(m, local, make_plan(m)) as route:  # type: ignore[arg-type]
        assert all(route(j) is local for j in make_plan(m).jobs)


async def test_hosts_of_other_arches_are_not_even_contacted(tmp_path: Path) -> None:
    m = matrix(["amd64"], [host(tmp_path)])
    local = FakeLocal(tmp_path)
    with anyio.fail_after(2):  # no connection attempt to the closed port
        async with router(m, local, make_plan(m)) as route:  # type: ignore[arg-type]
            assert all(route(j) is local for j in make_plan(m).jobs)


async def test_host_down_without_fallback_fails_its_cells_only(tmp_path: Path) -> None:
    m = matrix(["amd64", "ppc64el"], [host(tmp_path)])
    local = FakeLocal(tmp_path)
    result = await run_plan(m, local, tmp_path / "logs")
    runs = result["runs"]
    amd64 = [r for r in runs.values() if r.job.arch == "amd64"]
    ppc = [r for r in runs.values() if r.job.arch == "ppc64el"]
    assert {r.status for r in amd64} == {"done"}
    assert runs["rootfs:debian-bookworm-ppc64el"].status == "failed"
    error = runs["rootfs:debian-bookworm-ppc64el"].error
    assert "no build host for ppc64el is up" in error and 'fallback = "local"' in error
    assert {r.status for r in ppc} == {"failed", "skipped"}
    assert not [j for j in local.ran if "ppc64el" in j]


async def test_host_down_with_fallback_builds_here(tmp_path: Path) -> None:
    m = matrix(["amd64", "ppc64el"], [host(tmp_path)], fallback="local")
    local = FakeLocal(tmp_path)
    result = await run_plan(m, local, tmp_path / "logs")
    runs = result["runs"]
    assert {r.status for r in runs.values()} == {"done"}
    assert {r.host for r in runs.values()} == {None}
    # Every ppc64el job ran once, here, in its nested run.
    ppc = [j for j in local.ran if "ppc64el" in j]
    assert sorted(ppc) == sorted(r.job.id for r in runs.values() if r.job.arch == "ppc64el")


def test_known_hosts(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    h = Host.model_validate(host(tmp_path, trust_unknown_hosts=False, port=2222))
    with pytest.raises(StageError, match=r"host key refused: .* does not exist .*ssh-keyscan"):
        known_hosts_for(h)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    known.write_text(f"[127.0.0.1]:2223 {key}\n")
    with pytest.raises(StageError, match="has no key for this host"):
        known_hosts_for(h)
    assert known_hosts_for(h.model_copy(update={"trust_unknown_hosts": True})) is None
    known.write_text(f"[127.0.0.1]:2222 {key}\n")
    assert known_hosts_for(h) == str(known)
    # A host it names is checked against it even when unknown hosts are trusted.
    assert known_hosts_for(h.model_copy(update={"trust_unknown_hosts": True})) == str(known)


def test_after_a_loss_the_next_session_redoes_what_unfinished_jobs_need(tmp_path: Path) -> None:
    m = matrix(["ppc64el"], [host(tmp_path)], fallback="local")
    plan = make_plan(m)
    farm = Farm(m.hosts, m.fallback, plan, FakeLocal(tmp_path))  # type: ignore[arg-type]
    cell = CellRun(farm, "debian-bookworm-ppc64el", "ppc64el")
    cell.finished = {
        "rootfs:debian-bookworm-ppc64el": True,
        "finalise:debian-bookworm-ppc64el": True,
    }
    sub, auto = cell._subplan(local=False)
    assert [j.kind for j in sub.jobs] == ["rootfs", "finalise", "pack"]  # no publish there
    assert auto == ["rootfs:debian-bookworm-ppc64el", "finalise:debian-bookworm-ppc64el"]
    sub, _ = cell._subplan(local=True)
    assert [j.kind for j in sub.jobs] == ["rootfs", "finalise", "pack", "publish"]
    # A failed job and what waits for it are not redone.
    cell.finished = {
        "rootfs:debian-bookworm-ppc64el": True,
        "finalise:debian-bookworm-ppc64el": False,
    }
    assert cell._subplan(local=True)[0].jobs == ()


async def test_a_worker_that_stops_early_is_a_lost_host_not_a_failed_job() -> None:
    job = make_plan(matrix(["amd64"], [])).jobs[0]
    session = Session(Plan(matrix="t", jobs=(job,)))
    session.record(Event("cancelled", job=job.id, message="interrupted"))
    session.record(Event("skipped", job=job.id, message="run stopped before it started"))
    assert session.results == {}
    session.end("the worker on h exited 1")
    assert not session.serves(job.id)
    with pytest.raises(HostLost, match="exited 1"):
        await session.result(job.id)
