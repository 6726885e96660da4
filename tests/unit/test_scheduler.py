"""The scheduler, run with small real jobs (sleep, true, false through proc.run)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from factory import proc
from factory.events import Bus, Event
from factory.plan import Job, Plan
from factory.results import Output, StageError
from factory.scheduler import JobRun, Scheduler, default_jobs

from .test_proc import alive, kill_quietly, read_pids, wait_dead


def job(
    jid: str, argv: Sequence[str], deps: Sequence[str] = (), cell: str = "c", **params: Any
) -> Job:
    return Job(
        id=jid,
        kind="rootfs",
        cell=cell,
        arch="amd64",
        deps=tuple(deps),
        key=f"key-{jid}",
        params={"argv": list(argv), **params},
    )


def plan(*jobs: Job) -> Plan:
    return Plan(matrix="test", jobs=tuple(jobs))


class CommandExecutor:
    """Runs job.params["argv"] through proc.run; records what it saw."""

    host: str | None = None

    def __init__(self, slots: int = 4) -> None:
        self._limiter = anyio.CapacityLimiter(slots)
        self.active = 0
        self.max_active = 0
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.inputs: dict[str, dict[str, Output]] = {}
        self.cleaned: list[str] = []

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self._limiter

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started[job.id] = time.monotonic()
        self.inputs[job.id] = dict(inputs)
        try:
            emit(f"running {job.params['argv'][0]}")
            if job.params.get("stage_error"):
                raise StageError(job.params["stage_error"])
            done = await proc.run(job.params["argv"], capture=True, input=job.params.get("input"))
            return Output(info={"job": job.id, "stdout": done.text.strip()})
        finally:
            self.active -= 1
            self.finished[job.id] = time.monotonic()
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)  # cleanup that awaits, as real stages' cleanup does
                self.cleaned.append(job.id)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, job_id: str) -> list[str]:
        return [e.kind for e in self.events if e.job == job_id]

    def index(self, kind: str, job_id: str) -> int:
        return next(i for i, e in enumerate(self.events) if e.kind == kind and e.job == job_id)


async def run_plan(
    p: Plan, executor: CommandExecutor, tmp_path: Path, *, fail_fast: bool = False
) -> tuple[dict[str, JobRun], Recorder, float]:
    rec = Recorder()
    sched = Scheduler(p, lambda j: executor, Bus(rec), tmp_path / "logs", fail_fast=fail_fast)
    started = time.monotonic()
    with anyio.fail_after(30):
        runs = await sched.run()
    return runs, rec, time.monotonic() - started


def statuses(runs: Mapping[str, JobRun]) -> dict[str, str | None]:
    return {jid: r.status for jid, r in runs.items()}


# --- concurrency ------------------------------------------------------------------------------


async def test_independent_jobs_overlap(tmp_path: Path) -> None:
    ex = CommandExecutor(slots=2)
    runs, _, elapsed = await run_plan(
        plan(job("a", ["sleep", "1"]), job("b", ["sleep", "1"])), ex, tmp_path
    )
    assert statuses(runs) == {"a": "done", "b": "done"}
    assert elapsed < 1.8
    assert ex.max_active == 2


async def test_limiter_bounds_concurrency(tmp_path: Path) -> None:
    ex = CommandExecutor(slots=1)
    runs, _, elapsed = await run_plan(
        plan(job("a", ["sleep", "1"]), job("b", ["sleep", "1"])), ex, tmp_path
    )
    assert statuses(runs) == {"a": "done", "b": "done"}
    assert elapsed >= 2.0
    assert ex.max_active == 1


async def test_job_starts_only_after_its_deps(tmp_path: Path) -> None:
    ex = CommandExecutor(slots=4)
    p = plan(
        # listed before its deps on purpose: plan order is not run order
        job("join", ["true"], deps=("slow", "fast")),
        job("slow", ["sleep", "0.4"]),
        job("fast", ["true"]),
        job("after-fast", ["true"], deps=("fast",)),
    )
    runs, rec, _ = await run_plan(p, ex, tmp_path)
    assert set(statuses(runs).values()) == {"done"}
    assert ex.started["join"] >= ex.finished["slow"]
    assert ex.started["join"] >= ex.finished["fast"]
    # a job waits for its own deps only, not for unrelated slow ones
    assert ex.started["after-fast"] < ex.finished["slow"]
    assert rec.index("done", "slow") < rec.index("start", "join")
    assert rec.index("done", "fast") < rec.index("start", "join")


async def test_output_info_reaches_dependents(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(
        job("a", ["echo", "from-a"]),
        job("b", ["echo", "from-b"]),
        job("c", ["true"], deps=("a", "b")),
    )
    runs, rec, _ = await run_plan(p, ex, tmp_path)
    assert ex.inputs["a"] == {}
    assert set(ex.inputs["c"]) == {"a", "b"}
    assert ex.inputs["c"]["a"].info == {"job": "a", "stdout": "from-a"}
    assert ex.inputs["c"]["b"].info["stdout"] == "from-b"
    assert runs["a"].output is not None and runs["a"].output.info["stdout"] == "from-a"
    done_a = rec.events[rec.index("done", "a")]
    assert done_a.data["info"] == {"job": "a", "stdout": "from-a"}


# --- failures ---------------------------------------------------------------------------------


async def test_failure_fails_only_dependents(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(
        job("bad", ["sh", "-c", "echo why-it-broke >&2; exit 1"]),
        job("child", ["true"], deps=("bad",)),
        job("grandchild", ["true"], deps=("child",)),
        job("other", ["sleep", "0.3"]),
        job("other-child", ["true"], deps=("other",)),
    )
    runs, rec, _ = await run_plan(p, ex, tmp_path)
    assert statuses(runs) == {
        "bad": "failed",
        "child": "skipped",
        "grandchild": "skipped",
        "other": "done",
        "other-child": "done",
    }
    assert runs["bad"].error == "sh exited 1: why-it-broke"
    assert runs["bad"].tail == ["why-it-broke"]
    assert runs["child"].error is not None and "bad" in runs["child"].error
    assert runs["grandchild"].error is not None
    # skipped jobs never reached the executor
    assert "child" not in ex.started and "grandchild" not in ex.started
    assert rec.of("child") == ["skipped"]
    assert rec.index("failed", "bad") < rec.index("skipped", "child")
    failed = rec.events[rec.index("failed", "bad")]
    assert failed.message == "sh exited 1: why-it-broke"
    assert failed.data["tail"] == ["why-it-broke"]


async def test_transitive_skip_names_the_job_that_failed(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(
        job("bad", ["false"]),
        job("child", ["true"], deps=("bad",)),
        job("grandchild", ["true"], deps=("child",)),
    )
    runs, _, _ = await run_plan(p, ex, tmp_path)
    assert runs["grandchild"].status == "skipped"
    error = runs["grandchild"].error or ""
    assert "bad" in error and "child failed" not in error


async def test_stage_error_and_crash_are_failures(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(
        job("stage", ["true"], stage_error="no kernel in the tree"),
        job("crash", ["/nonexistent/no-such-program"]),
        job("fine", ["true"]),
    )
    runs, _, _ = await run_plan(p, ex, tmp_path)
    assert statuses(runs) == {"stage": "failed", "crash": "failed", "fine": "done"}
    assert runs["stage"].error == "no kernel in the tree"
    assert runs["crash"].error is not None and runs["crash"].error.startswith("FileNotFoundError")
    # the traceback of an unexpected error is kept in the job's log
    assert "Traceback" in (tmp_path / "logs" / "crash.log").read_text()


async def test_fail_fast_cancels_the_rest(tmp_path: Path) -> None:
    ex = CommandExecutor()
    pidfile = tmp_path / "pids"
    # "bad" fails once "long" is surely running (past open_process, both pids recorded)
    wait_for_long = f'until [ "$(cat {pidfile} 2>/dev/null | wc -l)" -ge 2 ]; do sleep 0.05; done'
    p = plan(
        job("bad", ["sh", "-c", f"{wait_for_long}; exit 1"]),
        job(
            "long",
            ["sh", "-c", f"read go; echo $$ >> {pidfile}; sleep 600 & echo $! >> {pidfile}; wait"],
            input=b"go\n",
        ),
        job("after-long", ["true"], deps=("long",)),
        job("after-bad", ["true"], deps=("bad",)),
    )
    pids: list[int] = []
    try:
        runs, rec, elapsed = await run_plan(p, ex, tmp_path, fail_fast=True)
        pids = [int(x) for x in pidfile.read_text().split()]
        assert elapsed < 5
        assert statuses(runs) == {
            "bad": "failed",
            "long": "cancelled",
            "after-long": "skipped",
            "after-bad": "skipped",
        }
        assert "long" in ex.cleaned
        assert rec.of("long") == ["start", "progress", "cancelled"]
        assert rec.of("after-long") == ["skipped"]
        assert len(pids) == 2
        assert wait_dead(pids) == []
    finally:
        kill_quietly([p for p in pids if alive(p)])


async def test_keep_going_is_the_default(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(job("bad", ["false"]), job("slow", ["sleep", "0.5"]))
    runs, _, _ = await run_plan(p, ex, tmp_path)
    assert statuses(runs) == {"bad": "failed", "slow": "done"}


# --- cancellation of the whole run ------------------------------------------------------------


async def test_cancelling_the_run_cancels_jobs_runs_cleanup_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    ex = CommandExecutor(slots=2)
    pidfile = tmp_path / "pids"
    # `read go`: the shell starts only after run() has sent it its input, i.e. once run() is
    # past open_process (see test_proc.test_cancel_while_the_process_starts)
    forever = ["sh", "-c", f"read go; echo $$ >> {pidfile}; sleep 600 & echo $! >> {pidfile}; wait"]
    p = plan(
        job("one", forever, input=b"go\n"),
        job("two", forever, input=b"go\n"),
        job("waiting-for-slot", ["true"]),  # limiter 2: this one never gets a slot
        job("after-one", ["true"], deps=("one",)),
    )
    rec = Recorder()
    sched = Scheduler(p, lambda j: ex, Bus(rec), tmp_path / "logs")
    pids: list[int] = []
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sched.run)
                pids = await read_pids(pidfile, 4)
                assert all(alive(pid) for pid in pids)
                tg.cancel_scope.cancel()
        runs = sched.runs
        assert runs["one"].status == "cancelled"
        assert runs["two"].status == "cancelled"
        assert runs["one"].error == "interrupted"
        assert runs["waiting-for-slot"].status == "skipped"
        assert runs["after-one"].status == "skipped"
        assert all(r.finished is not None for r in runs.values())
        assert sorted(ex.cleaned) == ["one", "two"]
        assert rec.of("one")[-1] == "cancelled"
        assert rec.of("after-one") == ["skipped"]
        assert wait_dead(pids) == []
    finally:
        kill_quietly([pid for pid in pids if alive(pid)])


# --- logs and events --------------------------------------------------------------------------


async def test_job_logs_are_written_per_job(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(
        job("rootfs:debian-bookworm-amd64", ["sh", "-c", "echo hello-from-rootfs >&2"]),
        job(
            "publish:debian-bookworm-amd64:raw",
            ["sh", "-c", "echo oops >&2; exit 2"],
            deps=("rootfs:debian-bookworm-amd64",),
        ),
    )
    runs, _, _ = await run_plan(p, ex, tmp_path)
    logs = tmp_path / "logs"
    assert sorted(f.name for f in logs.iterdir()) == [
        "publish_debian-bookworm-amd64_raw.log",
        "rootfs_debian-bookworm-amd64.log",
    ]
    rootfs = (logs / "rootfs_debian-bookworm-amd64.log").read_text().splitlines()
    assert rootfs[0] == "$ sh -c 'echo hello-from-rootfs >&2'"
    assert "hello-from-rootfs" in rootfs
    publish = (logs / "publish_debian-bookworm-amd64_raw.log").read_text()
    assert "oops" in publish
    assert "# sh exited 2: oops" in publish  # the error is in the log too
    assert runs["publish:debian-bookworm-amd64:raw"].status == "failed"


async def test_events_come_in_a_sensible_order(tmp_path: Path) -> None:
    ex = CommandExecutor()
    p = plan(
        job("a", ["true"]),
        job("b", ["true"], deps=("a",)),
        job("x", ["false"], cell="other"),
        job("y", ["true"], deps=("x",), cell="other"),
    )
    _, rec, _ = await run_plan(p, ex, tmp_path)
    assert rec.of("a") == ["start", "progress", "done"]
    assert rec.of("b") == ["start", "progress", "done"]
    assert rec.of("x") == ["start", "progress", "failed"]
    assert rec.of("y") == ["skipped"]
    assert rec.index("done", "a") < rec.index("start", "b")
    assert rec.index("failed", "x") < rec.index("skipped", "y")
    start = rec.events[rec.index("start", "x")]
    assert (start.job_kind, start.cell, start.host) == ("rootfs", "other", None)
    progress = rec.events[rec.index("progress", "a")]
    assert progress.message == "running true"
    done = rec.events[rec.index("done", "a")]
    assert done.data["seconds"] >= 0
    times = [e.time for e in rec.events]
    assert times == sorted(times)


async def test_report_fields_are_filled(tmp_path: Path) -> None:
    ex = CommandExecutor()
    before = time.time()
    runs, _, _ = await run_plan(plan(job("a", ["true"]), job("b", ["false"])), ex, tmp_path)
    after = time.time()
    for r in runs.values():
        assert r.started is not None and r.finished is not None
        assert before <= r.started <= r.finished <= after
        assert r.host is None


async def test_router_picks_the_executor_per_job(tmp_path: Path) -> None:
    here, there = CommandExecutor(), CommandExecutor()
    there.host = "power9-a"
    p = plan(job("local", ["true"]), job("remote", ["true"]))
    rec = Recorder()
    sched = Scheduler(p, lambda j: there if j.id == "remote" else here, Bus(rec), tmp_path / "logs")
    runs = await sched.run()
    assert list(here.started) == ["local"] and list(there.started) == ["remote"]
    assert runs["remote"].host == "power9-a" and runs["local"].host is None
    assert rec.events[rec.index("done", "remote")].host == "power9-a"


def test_default_jobs_is_positive() -> None:
    assert default_jobs() >= 1


@pytest.mark.parametrize("slots", [1, 3])
async def test_many_small_jobs_finish(tmp_path: Path, slots: int) -> None:
    ex = CommandExecutor(slots=slots)
    jobs = [job(f"j{i}", ["true"], deps=(f"j{i - 1}",) if i % 3 else ()) for i in range(9)]
    runs, _, _ = await run_plan(plan(*jobs), ex, tmp_path)
    assert set(statuses(runs).values()) == {"done"}
    assert ex.max_active <= slots


def test_long_chains_rank_first() -> None:
    from factory.plan import make_plan
    from factory.scheduler import ranks
    from factory.spec import load_matrix

    rank = ranks(make_plan(load_matrix("matrix/bench.toml")))
    cell = "debian-bookworm-amd64"
    assert rank[f"convert:{cell}:vmdk"] > rank[f"pack:{cell}:tgz"] > rank[f"pack:{cell}:tar"]
    assert rank[f"assemble:{cell}"] > rank[f"convert:{cell}:vmdk"]


def test_gate_hands_slots_to_the_highest_rank() -> None:
    from factory.scheduler import PriorityGate

    order: list[float] = []

    async def main() -> None:
        gate = PriorityGate(1)
        await gate.acquire(0)

        async def job(rank: float) -> None:
            await gate.acquire(rank)
            order.append(rank)
            gate.release()

        async with anyio.create_task_group() as tg:
            for rank in (1.0, 5.0, 3.0):
                tg.start_soon(job, rank)
            await anyio.wait_all_tasks_blocked()
            gate.release()

    anyio.run(main)
    assert order == [5.0, 3.0, 1.0]


def test_cancelled_waiter_gives_its_place_up() -> None:
    from factory.scheduler import PriorityGate

    async def main() -> None:
        gate = PriorityGate(1)
        await gate.acquire(0)
        with anyio.move_on_after(0.01):
            await gate.acquire(9)
        gate.release()
        with anyio.fail_after(1):
            await gate.acquire(1)

    anyio.run(main)
