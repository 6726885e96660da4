"""Runs the cells of an arch on build hosts, and brings their artifacts back.

A cell's jobs share one tree, so a cell runs on one host at a time: its first job starts
one `factory worker` session there with the cell's sub-plan (publish jobs left out) as a
`protocol.Request`. The controller's scheduler still decides when each job starts (it
sends "go" while holding a slot of the host's limiter), and each job's `run()` here waits
for that job's done/failed event from the worker's stream, so one scheduler, one progress
display and one report serve local and remote jobs alike. Publish jobs fetch the file
(exact size, holes kept), check it against the worker's sha256, and hand it to the publish
stage as if it had been made here.

A session that ends before its jobs do (connection lost, worker killed, a malformed event)
is a lost host for that cell: its unfinished jobs, and what they need, run again on another
host of the arch, then locally under emulation if the matrix allows it ("fallback"), else
fail. Each move is a progress event and a `retries` list in the info of the jobs that ran
after it.

How bytes reach a host is a `Transport` (a `Link` per host, a `Channel` per session): SSH
today (executors/ssh.py); nothing here knows which.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from factory import proc
from factory.events import Bus, Event
from factory.executors.local import LocalExecutor
from factory.executors.protocol import Go, Malformed, Request, parse_event, remote_file
from factory.fsutil import aside, sha256_file, write_if_changed_async
from factory.plan import Job, Plan
from factory.results import Output, StageError
from factory.scheduler import Executor, Scheduler, log_name
from factory.spec import Host
from factory.stages import Context, publish


class HostLost(Exception):
    """The session's host (connection or worker) went away; its unfinished jobs move."""


def where(host: Host) -> str:
    return f"host {host.name} ({host.user}@{host.address}:{host.port})"


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    reason = getattr(exc, "reason", None)  # asyncssh errors keep their text there
    if isinstance(reason, str) and reason:
        text = reason
    return " ".join(text.split())


# --- the transport ---------------------------------------------------------------------------


class Channel(ABC):
    """One worker session on a host: a folder there of its own (the request's `dir`), the
    worker started in it, and its files. A lost connection is HostLost; a file that
    cannot be read is StageError."""

    folder: str

    @abstractmethod
    async def put(self, local: Path, there: str) -> None:
        """Copy a local folder (a hook) to `there`, inside the session folder."""

    @abstractmethod
    def worker(self, request: Request) -> AbstractAsyncContextManager[None]:
        """`COMMAND worker` started and sent the request; on exit it is stopped (its stdin
        closed, then a signal, then the channel) and waited for."""

    @abstractmethod
    async def watch(self) -> None:
        """Runs while the worker does: keeps what it says besides events (its last lines
        of stderr) for `ended`."""

    @abstractmethod
    def lines(self) -> AsyncIterator[str]:
        """The worker's event lines, until it stops."""

    @abstractmethod
    def send(self, go: Go) -> None:
        """A go line to the worker; a worker that is gone is the session's end, not an error."""

    @abstractmethod
    def stop(self) -> None:
        """End the worker's input: it stops its jobs and removes its folder."""

    @abstractmethod
    def ended(self) -> str:
        """How the worker ended ("exited 1", "killed by signal 9"), with its last words."""

    @abstractmethod
    async def read_text(self, path: str) -> str:
        """A small file from the session's folder."""

    @abstractmethod
    async def fetch(
        self, path: str, dest: Path, size: int, extents: Sequence[tuple[int, int]]
    ) -> None:
        """Copy a file to `dest` exactly, reading only its data `extents`, holes kept."""


class Link(ABC):
    """One build host's connection, opened once for a run; `down` says why it is unusable
    (None while it is up)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.down: str | None = "not connected yet"

    @abstractmethod
    async def open(self) -> None:
        """Connect; a host that cannot be reached sets `down`, it does not raise."""

    @abstractmethod
    async def aclose(self) -> None:
        """Disconnect (shielded, bounded in time: it runs while a run is cancelled)."""

    @abstractmethod
    def session(self) -> AbstractAsyncContextManager[Channel]:
        """A new session folder on the host; removed at the end."""

    def lost(self, reason: str) -> None:
        if self.down is None:
            self.down = reason


Transport = Callable[[Host], Link]


class Unreachable(Link):
    """A host without a transport: down from the start."""

    async def open(self) -> None:
        self.down = "no transport to reach it"

    async def aclose(self) -> None:
        pass

    def session(self) -> AbstractAsyncContextManager[Channel]:
        raise HostLost(f"{self.host.name}: {self.down}")


class Remote:
    """One build host as placement sees it: its link, its slots, its cells."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.host = link.host
        self.name = link.host.name
        self.slots = anyio.CapacityLimiter(link.host.jobs)
        self.cells = 0  # cells placed here, to spread cells over the hosts of an arch

    @property
    def down(self) -> str | None:
        return self.link.down


# --- sessions --------------------------------------------------------------------------------


@dataclass
class Record:
    """How a job ended in a session."""

    ok: bool
    info: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    tail: list[str] = field(default_factory=list)
    output: Output | None = None  # local sessions: the real output
    log: str | None = None  # the job's log, when the worker sent it with the event
    manifest_text: str | None = None  # a finalise's manifest, likewise


def _listener(emit: Callable[[str], None], meter: proc.Meter | None) -> Callable[[Event], None]:
    """What a worker's progress event of a job becomes here: its message, or its fraction
    for this job's meter (the worker's data, so only numbers are taken)."""

    def listen(event: Event) -> None:
        done, total = event.data.get("done"), event.data.get("total")
        if isinstance(done, int | float) and isinstance(total, int | float):
            if meter is not None:
                meter(float(done), float(total))
        elif event.message:
            emit(event.message)

    return listen


class Session:
    """One attempt at (part of) a cell, on a host or here; jobs wait on it for their end."""

    host: str | None = None
    local = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ids = {j.id for j in plan.jobs}
        self.results: dict[str, Record] = {}
        self.ended = {jid: anyio.Event() for jid in self.ids}
        self.listeners: dict[str, Callable[[Event], None]] = {}
        self.reason: str | None = None  # set when the session is over
        self.closing = anyio.Event()

    @property
    def alive(self) -> bool:
        return self.reason is None

    def serves(self, jid: str) -> bool:
        return jid in self.ids and (self.alive or jid in self.results)

    def record(self, event: Event, output: Output | None = None) -> None:
        jid = event.job
        if jid is None or jid not in self.ids:
            return
        if event.kind == "progress":
            listen = self.listeners.get(jid)
            if listen is not None:
                listen(event)
        elif event.kind in ("done", "failed") and jid not in self.results:
            # Not "skipped"/"cancelled": the controller skips dependents itself, and a worker
            # that stops before its jobs end is a lost host (the session's end), not a failure.
            info = event.data.get("info", {}) if event.kind == "done" else {}
            tail = event.data.get("tail", [])
            log, manifest = event.data.get("log"), event.data.get("manifest_text")
            self.results[jid] = Record(
                event.kind == "done",
                dict(info) if isinstance(info, dict) else {},
                event.message or event.kind,
                [str(t) for t in tail] if isinstance(tail, list) else [],
                output,
                log if isinstance(log, str) else None,
                manifest if isinstance(manifest, str) else None,
            )
            self.ended[jid].set()

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        for ended in self.ended.values():
            ended.set()

    async def result(self, jid: str) -> Record:
        await self.ended[jid].wait()
        found = self.results.get(jid)
        if found is None:
            raise HostLost(self.reason or "the session ended")
        return found

    def go(self, jid: str) -> None:
        """Let the job start (remote sessions wait for the controller's word)."""

    def close(self) -> None:
        self.closing.set()

    async def serve(self) -> None:
        raise NotImplementedError


class LocalSession(Session):
    """The fallback: the sub-plan run here by a nested Scheduler on the run's own local
    executor (its CPU slots are shared with every other local job)."""

    local = True

    def __init__(self, plan: Plan, local: LocalExecutor, logs: Path) -> None:
        super().__init__(plan)
        self.executor = local
        self.logs = logs

    async def serve(self) -> None:
        sched: Scheduler | None = None

        def on_event(event: Event) -> None:
            run = sched.runs.get(event.job or "") if sched else None
            self.record(event, run.output if run else None)

        sched = Scheduler(self.plan, lambda job: self.executor, Bus(on_event), self.logs)
        try:
            async with anyio.create_task_group() as tg:

                async def stop() -> None:
                    await self.closing.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop)
                await sched.run()
                tg.cancel_scope.cancel()
        finally:
            self.end("stopped")


class RemoteSession(Session):
    """One `factory worker` on a host, in a folder of its own under the host's workdir."""

    def __init__(
        self,
        plan: Plan,
        remote: Remote,
        *,
        auto: Sequence[str],
        fetch: Sequence[str],
        refresh: bool,
        loop: bool = False,
    ) -> None:
        super().__init__(plan)
        self.remote = remote
        self.host = remote.name
        self.auto = list(auto)
        self.fetch = list(fetch)
        self.refresh = refresh
        self.loop = loop
        self.channel: Channel | None = None
        self.sent: set[str] = set()  # jobs the controller has let start
        self.requested = False

    def go(self, jid: str) -> None:
        """Queued until the worker has its request; then sent at once."""
        if jid in self.auto or jid in self.sent:
            return
        self.sent.add(jid)
        if self.requested:
            self._send(jid)

    def _send(self, jid: str) -> None:
        if self.channel is not None and self.alive:
            self.channel.send(Go(go=jid))

    @property
    def folder(self) -> str | None:
        return self.channel.folder if self.channel is not None else None

    def _open(self) -> Channel:
        if self.channel is None or self.remote.down is not None:
            raise HostLost(f"{self.remote.name}: {self.remote.down or 'not connected'}")
        return self.channel

    async def read_text(self, path: str) -> str:
        return await self._open().read_text(path)

    async def fetch_file(
        self, path: str, dest: Path, size: int, extents: Sequence[tuple[int, int]]
    ) -> None:
        await self._open().fetch(path, dest, size, extents)

    async def _ship_hooks(self, channel: Channel) -> Plan:
        """Hook folders go into the session folder; the plan then names them there (a path
        is a location, not part of any key)."""
        jobs = []
        for job in self.plan.jobs:
            hooks = job.params.get("hooks")
            if hooks:
                moved = []
                for i, hook in enumerate(hooks):
                    there = f"{channel.folder}/hooks/{i}-{hook['name']}"
                    await channel.put(Path(hook["path"]), there)
                    moved.append({**hook, "path": there})
                job = job.model_copy(update={"params": {**job.params, "hooks": moved}})
            jobs.append(job)
        return Plan(matrix=self.plan.matrix, jobs=tuple(jobs))

    async def serve(self) -> None:
        reason = f"the worker on {self.host} stopped"
        try:
            async with self.remote.link.session() as channel:
                self.channel = channel
                request = Request(
                    plan=await self._ship_hooks(channel),
                    dir=channel.folder,
                    cache=self.remote.host.cache,
                    refresh=self.refresh,
                    loop=self.loop,
                    auto=tuple(self.auto),
                    fetch=tuple(self.fetch),
                )
                said: str | None = None
                async with channel.worker(request):
                    self.requested = True
                    for jid in sorted(self.sent):
                        self._send(jid)
                    watched = anyio.Event()
                    async with anyio.create_task_group() as tg:

                        async def watch() -> None:
                            await channel.watch()
                            watched.set()

                        async def stop() -> None:
                            await self.closing.wait()
                            channel.stop()

                        tg.start_soon(watch)
                        tg.start_soon(stop)
                        said = await self._events(channel)
                        if said is None:  # it stopped: its last words say why
                            with anyio.move_on_after(5):
                                await watched.wait()
                        tg.cancel_scope.cancel()
                if said is not None:
                    reason = said
                elif self.reason is None and not self.closing.is_set():
                    reason = f"the worker on {self.host} {channel.ended()} before its jobs finished"
        except HostLost as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"{self.host}: {one_line(exc)}"
        finally:
            if self.remote.down is not None and not self.closing.is_set():
                reason = f"{self.host}: {self.remote.down}"
            self.end(reason)

    async def _events(self, channel: Channel) -> str | None:
        """Read the worker's events until it stops; a refusal, a malformed event or a lost
        connection ends the session at once (its reason is returned)."""
        try:
            async for line in channel.lines():
                if not line.strip():
                    continue  # asyncssh gives an empty line when the command exits non-zero
                try:
                    event = parse_event(line, self.remote.name)
                except Malformed as exc:
                    return str(exc)
                if event.kind == "run-end" and event.data.get("status") == "refused":
                    return f"the worker on {self.host} refused the plan: {event.message}"
                self.record(event)
        except HostLost as exc:
            return str(exc)
        return None


# --- cells -----------------------------------------------------------------------------------


class Farm:
    """The hosts of a matrix, the cells placed on them, and the sessions they run."""

    def __init__(
        self,
        hosts: Sequence[Host],
        fallback: str,
        plan: Plan,
        local: LocalExecutor,
        transport: Transport = Unreachable,
    ) -> None:
        self.remotes = [Remote(transport(h)) for h in hosts]
        self.fallback = fallback
        self.plan = plan
        self.local = local
        self.cells: dict[str, CellRun] = {}
        self.sessions: list[Session] = []
        self.tg: TaskGroup | None = None
        self._arches = {a for r in self.remotes for a in r.host.arches}
        # Each cell's jobs, found once: a farm has hundreds of cells, a cell a few jobs.
        self.jobs_of: dict[str, list[Job]] = {}
        for job in plan.jobs:
            self.jobs_of.setdefault(job.cell, []).append(job)

    def arches(self) -> set[str]:
        return self._arches

    def remotes_for(self, arch: str) -> list[Remote]:
        return [r for r in self.remotes if arch in r.host.arches]

    def spawn(self, session: Session) -> None:
        assert self.tg is not None
        self.sessions.append(session)
        self.tg.start_soon(self._serve, session, name=f"session on {session.host or 'local'}")

    @staticmethod
    async def _serve(session: Session) -> None:
        """A session's own failure is its cell's business, never the whole run's."""
        try:
            await session.serve()
        except Exception as exc:  # a bug here must not cancel the run's other cells
            session.end(f"internal error: {type(exc).__name__}: {exc}")
            import traceback

            traceback.print_exc(file=sys.stderr)

    def route(self, job: Job) -> Executor:
        """The executor of a job: here, unless hosts take its arch."""
        if job.arch not in self._arches:
            return self.local
        cell = self.cells.get(job.cell)
        if cell is None:
            cell = self.cells[job.cell] = CellRun(self, job.cell, job.arch)
        return Placed(cell)


@contextlib.asynccontextmanager
async def farm(
    hosts: Sequence[Host], fallback: str, plan: Plan, local: LocalExecutor, transport: Transport
) -> AsyncIterator[Farm]:
    """Owns a run's remote side: one link per host, opened at the start (a host that
    cannot be reached is down from the start, said on stderr); at the end every session is
    stopped, its remote folder removed, and the links closed, whether the run succeeded,
    failed or was cancelled."""
    f = Farm(hosts, fallback, plan, local, transport)
    try:
        async with anyio.create_task_group() as tg:
            for remote in f.remotes:
                tg.start_soon(remote.link.open)
        for remote in f.remotes:
            if remote.down is not None:
                print(f"factory: {where(remote.host)} is down: {remote.down}", file=sys.stderr)
        async with anyio.create_task_group() as tg:
            f.tg = tg
            try:
                yield f
            finally:
                for session in f.sessions:
                    session.close()
    finally:
        for remote in f.remotes:
            await remote.link.aclose()


class Placed:
    """The executor of one job of a cell that hosts take; `host` says where it ran."""

    def __init__(self, cell: CellRun) -> None:
        self.cell = cell
        self.host: str | None = cell.place()
        self.held: anyio.CapacityLimiter | None = None  # the slot the scheduler took

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        self.held = self.cell.limiter()
        return self.held

    def cell_started(self, job: Job) -> bool:
        """A host's slots go to the cells it has started before new ones: by rank alone
        every cell's rootfs would run before any finalise, and a host with 2 slots and 10
        cells kept 10 workers and their session folders alive at once, its first artifact
        coming only at the end (tests/farm.py)."""
        return self.cell.session is not None and self.cell.session.alive

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        return await self.cell.run(self, job, emit)


UNBOUNDED = anyio.CapacityLimiter(math.inf)


class CellRun:
    """One cell whose arch has hosts: where it runs now, what it has finished, its retries."""

    def __init__(self, farm: Farm, cell: str, arch: str) -> None:
        self.farm = farm
        self.id = cell
        self.arch = arch
        self.jobs = farm.jobs_of.get(cell, [])
        self.plan = Plan(matrix=farm.plan.matrix, jobs=tuple(self.jobs))  # sub-plans come from it
        self.publish_deps = {j.deps[0] for j in self.jobs if j.kind == "publish"}
        self.finished: dict[str, bool] = {}  # job id -> done (True) or failed (False)
        self.remote: Remote | None = None
        self.local = False
        self.tried: set[str] = set()
        self.session: Session | None = None
        self.attempt = 0
        self.retries: list[dict[str, Any]] = []
        self.lock = anyio.Lock()
        self.why_down: list[str] = []

    def place(self) -> str | None:
        """Choose the cell's host if it has none yet: the up host of its arch with the
        fewest cells; none up: here (if the matrix allows it)."""
        if self.remote is None and not self.local:
            up = [
                r
                for r in self.farm.remotes_for(self.arch)
                if r.down is None and r.name not in self.tried
            ]
            if up:
                self.remote = min(up, key=lambda r: r.cells)
                self.remote.cells += 1
            elif self.farm.fallback == "local":
                self.local = True
        return self.remote.name if self.remote else None

    def limiter(self) -> anyio.CapacityLimiter:
        self.place()
        # Local fallback jobs take CPU slots inside their nested run; holding one here too
        # could deadlock, so the proxy itself is unbounded.
        return self.remote.slots if self.remote else UNBOUNDED

    def _down_reasons(self) -> str:
        reasons = [
            f"{r.name}: {r.down}" for r in self.farm.remotes_for(self.arch) if r.down is not None
        ]
        reasons += [f"{e['host']}: {e['error']}" for e in self.retries]
        return "; ".join(dict.fromkeys(reasons)) or "no host"

    def _subplan(self, local: bool) -> tuple[Plan, list[str]]:
        """What the next session must do: every job not finished here (publish jobs only
        when local), and what they need, including finished jobs whose outputs were on a
        lost host (those run at once: "auto")."""
        open_ = [j for j in self.jobs if j.id not in self.finished and not self._dead(j)]
        if local:
            ids = [j.id for j in open_]
        else:
            ids = [j.id for j in open_ if j.kind != "publish"]
            ids += [j.deps[0] for j in open_ if j.kind == "publish"]
        plan = self.plan.select(ids)
        auto = [j.id for j in plan.jobs if self.finished.get(j.id)]
        return plan, auto

    def _dead(self, job: Job) -> bool:
        """Failed, or waits for something that failed (the scheduler skips it)."""
        bad = {jid for jid, ok in self.finished.items() if not ok}
        by_id = {j.id: j for j in self.jobs}

        def blocked(jid: str) -> bool:
            if jid in bad:
                return True
            j = by_id.get(jid)
            return j is not None and any(blocked(d) for d in j.deps)

        return blocked(job.id)

    @staticmethod
    def _needs(job: Job, session: Session) -> str:
        """The job a session must have done for `job`: publish on a host waits for the file."""
        return job.deps[0] if job.kind == "publish" and not session.local else job.id

    async def session_for(self, job: Job) -> Session:
        async with self.lock:
            current = self.session
            if current is not None and current.serves(self._needs(job, current)):
                return current
            if current is not None:
                self._lost(current, current.reason or "the session ended")
            self.place()
            if self.remote is None and not self.local:
                raise StageError(
                    f"no build host for {self.arch} is up ({self._down_reasons()}); "
                    'set fallback = "local" to build here under emulation'
                )
            plan, auto = self._subplan(self.local)
            session: Session
            if self.remote is not None:
                fetch = [j.id for j in plan.jobs if j.id in self.publish_deps]
                ws = self.farm.local.ws
                session = RemoteSession(
                    plan, self.remote, auto=auto, fetch=fetch, refresh=ws.refresh, loop=ws.loop
                )
            else:
                session = LocalSession(plan, self.farm.local, self.farm.local.ws.out / "logs")
            if self.retries:
                self.retries[-1]["then"] = session.host or "local"
            self.attempt += 1
            self.session = session
            self.farm.spawn(session)
            return session

    def _lost(self, session: Session, reason: str) -> None:
        """The session is over for good: the next one goes elsewhere."""
        if session is not self.session:
            return
        self.retries.append(
            {"host": session.host or "local", "error": reason, "time": round(time.time(), 3)}
        )
        if session.host is not None:
            self.tried.add(session.host)
        if self.remote is not None:
            self.remote.cells -= 1
        self.remote, self.local, self.session = None, False, None
        session.close()

    async def run(self, placed: Placed, job: Job, emit: Callable[[str], None]) -> Output:
        try:
            while True:
                session = await self.session_for(job)
                placed.host = session.host
                # After a retry the job runs on another host than the one whose slot the
                # scheduler gave it: it takes one of that host's slots too.
                slots = session.remote.slots if isinstance(session, RemoteSession) else None
                slot = slots if slots is not None and slots is not placed.held else None
                try:
                    async with slot if slot is not None else contextlib.nullcontext():
                        out = await self._run_in(session, job, emit)
                except HostLost as lost:
                    async with self.lock:
                        self._lost(session, str(lost))
                    emit(f"retry: {lost}")
                    continue
                break
        except Exception:
            self.finished[job.id] = False
            self._maybe_close()
            raise
        self.finished[job.id] = True
        self._maybe_close()
        if self.retries:
            out = Output(out.path, {**out.info, "retries": [dict(r) for r in self.retries]})
        return out

    async def _run_in(self, session: Session, job: Job, emit: Callable[[str], None]) -> Output:
        if isinstance(session, RemoteSession) and job.kind == "publish":
            (dep,) = job.deps
            return await self._fetch(session, job, await session.result(dep), emit)
        session.listeners[job.id] = _listener(emit, proc.current_meter.get())
        try:
            session.go(job.id)
            record = await session.result(job.id)
        finally:
            session.listeners.pop(job.id, None)
        if isinstance(session, RemoteSession):
            await self._copy_log(session, job, record)
            record.log = None  # written here: a night's logs are not kept in memory
        if not record.ok:
            raise StageError(record.message)  # its log (here, or copied) holds the tail
        if not isinstance(session, RemoteSession):
            return record.output or Output()
        info = {k: v for k, v in record.info.items() if k != "remote"}
        manifest = info.get("manifest")
        if job.kind == "finalise" and isinstance(manifest, str) and session.folder:
            text, record.manifest_text = record.manifest_text, None
            if text is None:
                text = await session.read_text(f"{session.folder}/out/{manifest}")
            await write_if_changed_async(self.farm.local.ws.out / manifest, text)
        return Output(None, info)

    async def _copy_log(self, session: RemoteSession, job: Job, record: Record) -> None:
        """The job's log from the host (sent with its event, else read from the session's
        folder), into the job's log here (the report's tail)."""
        log = proc.current_log.get()
        if log is None or session.folder is None:
            return
        with contextlib.suppress(OSError, HostLost, StageError):
            text = record.log
            if text is None:
                text = await session.read_text(f"{session.folder}/out/logs/{log_name(job.id)}")
            log.write(f"# log of {job.id} on {session.host}:")
            if text:
                log.write(text)

    async def _fetch(
        self, session: RemoteSession, job: Job, source: Record, emit: Callable[[str], None]
    ) -> Output:
        """publish, for a file on a host: fetch it aside and check it against the worker's
        size and sha256; then the publish stage checks and places it as if it had been
        made here (qemu-img's reading for disks, its `.sha256`, the rename into OUT)."""
        remote = remote_file(source.info) if source.ok else None
        if remote is None:
            raise StageError(f"{job.id}: {job.deps[0]} on {session.host} left no file to fetch")
        ws = self.farm.local.ws
        dest = ws.out / Context(job, {}, ws, emit).params(publish.Params).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = aside(dest.with_name(f"{dest.name}.fetched"))
        try:
            emit(f"fetching from {session.host}")
            proc.note(
                f"fetch {session.host}:{remote.path} -> {tmp} ({remote.size} bytes, "
                f"{sum(n for _, n in remote.extents)} in {len(remote.extents)} data extents)"
            )
            await session.fetch_file(remote.path, tmp, remote.size, remote.extents)
            emit("checksumming")
            digest = await sha256_file(tmp)
            if digest != remote.sha256:
                raise StageError(
                    f"{dest.name}: sha256 {digest} of the copy from {session.host} is not "
                    f"the worker's {remote.sha256} (corrupted in transit; not published)"
                )
            fetched = Output(
                tmp, {"virtual_size": source.info.get("virtual_size"), "sha256": digest}
            )
            return await publish.run(Context(job, {job.deps[0]: fetched}, ws, emit))
        finally:
            tmp.unlink(missing_ok=True)

    def _maybe_close(self) -> None:
        """Free the host as soon as nothing of the cell still needs the session."""
        if self.session is None:
            return
        if all(j.id in self.finished or self._dead(j) for j in self.jobs):
            self.session.close()


__all__ = [
    "Channel",
    "Farm",
    "HostLost",
    "Link",
    "Transport",
    "farm",
    "one_line",
    "where",
]
