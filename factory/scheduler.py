"""Runs a Plan: every job starts as soon as its dependencies are done, within its
executor's capacity; a failure fails only the jobs that depend on it.

The scheduler knows executors only by the `Executor` protocol, so the same code runs
jobs here, under emulation, or on a remote worker, and the worker reuses it unchanged.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import TaskGroup

from factory.events import Bus, Event, EventKind
from factory.plan import Job, Plan
from factory.proc import CommandError, Meter, logging_to, metering
from factory.results import Output, StageError
from factory.stages import registry

Status = Literal["done", "failed", "skipped", "cancelled"]


@dataclass
class JobRun:
    """The scheduler's record of one job, for the report."""

    job: Job
    status: Status | None = None
    started: float | None = None
    finished: float | None = None
    host: str | None = None
    error: str | None = None
    tail: list[str] = field(default_factory=list)
    output: Output | None = None


class Executor(Protocol):
    """Where jobs run. `host` is None for this machine. An executor may also have
    `cell_started(job) -> bool`: a job whose answer is True goes before every job of its limiter
    whose answer is False (the critical-path rank orders each group); see `Placed`."""

    host: str | None

    def limiter(self, job: Job) -> anyio.CapacityLimiter: ...

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output: ...


Router = Callable[[Job], Executor]

STARTED_FIRST = 1e12  # above any rank: costs are seconds


class PriorityGate:
    """Hands a limiter's slots to the waiting job of highest rank, not the first come:
    anyio's CapacityLimiter is FIFO, and the order jobs become ready (plan order) would
    start quick packs before a long conversion that then ends the run alone."""

    def __init__(self, slots: float) -> None:
        self._free = slots
        self._waiting: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()

    async def acquire(self, rank: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        entry = (-rank, next(self._order), anyio.Event())
        heapq.heappush(self._waiting, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            else:  # the slot was handed over as we were cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        if self._waiting:
            heapq.heappop(self._waiting)[2].set()
        else:
            self._free += 1


def ranks(plan: Plan) -> dict[str, float]:
    """Each job's estimated cost plus the longest chain of estimated costs after it: run
    highest first, the classic critical-path list schedule (pure)."""
    children: dict[str, list[str]] = {job.id: [] for job in plan.jobs}
    for job in plan.jobs:
        for dep in job.deps:
            children.setdefault(dep, []).append(job.id)
    jobs = plan.by_id()
    rank: dict[str, float] = {}

    def of(jid: str) -> float:
        if jid not in rank:
            after = max((of(c) for c in children[jid]), default=0.0)
            rank[jid] = registry.cost(jobs[jid].kind, jobs[jid].params) + after
        return rank[jid]

    for job in plan.jobs:
        of(job.id)
    return rank


def log_name(job_id: str) -> str:
    """A job's log file in OUT/logs (a job id has colons; some filesystems and URLs do not)."""
    return f"{job_id.replace(':', '_')}.log"


class Scheduler:
    def __init__(
        self, plan: Plan, route: Router, bus: Bus, logs: Path, *, fail_fast: bool = False
    ) -> None:
        self.plan = plan
        self.route = route
        self.bus = bus
        self.logs = logs
        self.fail_fast = fail_fast
        self.runs: dict[str, JobRun] = {job.id: JobRun(job) for job in plan.jobs}
        self._finished = {job.id: anyio.Event() for job in plan.jobs}
        self._group: TaskGroup | None = None
        self._rank = ranks(plan)
        self._gates: dict[int, PriorityGate] = {}

    def log_path(self, job: Job) -> Path:
        return self.logs / log_name(job.id)

    def _emit(self, kind: EventKind, run: JobRun, message: str = "", **data: Any) -> None:
        self.bus.emit(
            Event(
                kind,
                job=run.job.id,
                job_kind=run.job.kind,
                cell=run.job.cell,
                host=run.host,
                message=message,
                data=data,
            )
        )

    async def run(self) -> dict[str, JobRun]:
        """Run every job; returns when all are done, failed, skipped or cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._group = tg
                for job in self.plan.jobs:
                    tg.start_soon(self._job, self.runs[job.id], name=job.id)
        finally:
            now = time.time()
            for run in self.runs.values():
                if run.status is None:
                    run.status = "skipped"
                    run.error = "run stopped before it started"
                    run.finished = now
                    self._emit("skipped", run, run.error)
        return self.runs

    async def _job(self, run: JobRun) -> None:
        job = run.job
        try:
            # A dependency outside the plan is done (OUT holds it: Plan.select's `given`).
            deps = [d for d in job.deps if d in self.runs]
            for dep in deps:
                await self._finished[dep].wait()
            failed = [self.runs[d] for d in deps if self.runs[d].status != "done"]
            if failed:
                # Name the job that really failed, not a skipped one between it and us.
                cause = failed[0].error if failed[0].status == "skipped" else None
                run.status, run.finished = "skipped", time.time()
                run.error = cause or f"{failed[0].job.id} failed"
                self._emit("skipped", run, run.error)
                return
            executor = self.route(job)
            inputs = {d: self.runs[d].output or Output() for d in deps}
            limiter = executor.limiter(job)
            gate = self._gates.setdefault(id(limiter), PriorityGate(limiter.total_tokens))
            cell_started = getattr(executor, "cell_started", None)
            first = STARTED_FIRST if cell_started is not None and cell_started(job) else 0.0
            await gate.acquire(self._rank[job.id] + first)
            try:
                async with limiter:
                    await self._execute(run, executor, inputs)
            finally:
                gate.release()
        finally:
            self._finished[job.id].set()

    async def _execute(self, run: JobRun, executor: Executor, inputs: Mapping[str, Output]) -> None:
        job = run.job
        run.host, run.started = executor.host, time.time()
        self._emit("start", run)
        # A job's fractions (a command's progress parser, a checksum's bytes) as progress events
        # without a message: data done and total, a few a second at most.
        meter = Meter(lambda done, total: self._emit("progress", run, "", done=done, total=total))
        with logging_to(self.log_path(job)) as log, metering(meter):
            try:
                run.output = await executor.run(
                    job, inputs, lambda msg: self._emit("progress", run, msg)
                )
            except anyio.get_cancelled_exc_class():
                run.status, run.error, run.finished = "cancelled", "interrupted", time.time()
                self._emit("cancelled", run, run.error)
                raise
            except Exception as exc:  # a job's failure is data; only cancellation propagates
                run.status, run.finished = "failed", time.time()
                run.host = executor.host  # a remote job may have moved to another host
                if isinstance(exc, CommandError):
                    await log.put([f"# {exc}"])
                    run.error, run.tail = str(exc), exc.tail
                elif isinstance(exc, StageError):
                    await log.put([f"# {exc}"])
                    run.error, run.tail = str(exc), await log.tail_async()
                else:
                    await log.put([traceback.format_exc()])
                    run.error = f"{type(exc).__name__}: {exc}"
                    run.tail = await log.tail_async()
                self._emit("failed", run, run.error, tail=run.tail)
                if self.fail_fast and self._group is not None:
                    self._group.cancel_scope.cancel()
                return
        run.status, run.finished, run.host = "done", time.time(), executor.host
        info = dict(run.output.info) if run.output else {}
        self._emit("done", run, "", seconds=round(run.finished - run.started, 3), info=info)
        if "artifact" in info:
            self._emit("artifact", run, "", **info["artifact"])


def default_jobs() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0))
