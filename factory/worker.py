"""`factory worker`: runs one cell's sub-plan on a build host for a controller over SSH.

The command line is fixed (`factory worker`); everything else arrives as JSON on stdin, so
no value from a matrix ever meets a shell. One JSON object per line, each a model of
executors/protocol.py, checked on arrival:

  stdin   a `Request` (the sub-plan, the session folder `dir`, the host's `cache`, and
          which jobs run at once and whose file the controller fetches), then `Go` lines:
          the controller's scheduler starts JOB (it owns the host's slots); EOF: the
          controller is done with us (or gone): stop, clean up.
  stdout  Event JSON lines, as `factory run --events json` (a fetched job's `done` info
          has a `RemoteFile`), then `run-end` when every job has finished; status
          "refused" and a one-line message when a request or a go line is not accepted.

The same Scheduler and LocalExecutor as `factory run` do the work, into `dir/out`, with the
host's own tree cache; `dir` (made by the controller) is removed when the worker ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TextIO

import aiofiles
import anyio

from factory import __version__, proc, state
from factory.cache import opened, remove_tree
from factory.events import Bus, Event
from factory.executors.local import LocalExecutor
from factory.executors.protocol import (
    FOLDER_PREFIX,
    INLINE_TEXT,
    Go,
    Malformed,
    RemoteFile,
    Request,
)
from factory.fsutil import data_extents, sha256_file
from factory.plan import Job, Plan, hook_digest, job_key
from factory.results import Output
from factory.scheduler import Scheduler, log_name
from factory.stages import Workspace, registry

PIDFILE = "worker.pid"


class Refused(Exception):
    """The request cannot be run as sent; the message says why (one line)."""


def read_request(line: str) -> Request:
    """The controller's request, checked: its shape (protocol.Request), then its plan."""
    try:
        req = Request.parse(line)
    except Malformed as exc:
        raise Refused(str(exc)) from None
    validate_params(req.plan)
    return req


def validate_params(plan: Plan) -> None:
    """The one place a received plan's jobs are checked beyond their shape: each job's
    params against its stage's Params (the registry), then every key against its params
    (check_keys). Refused says what is wrong, in one line."""
    for job in plan.jobs:
        try:
            registry.validate(job.kind, job.params, job.id)
        except registry.ParamsError as exc:
            raise Refused(str(exc)) from None
    try:
        check_keys(plan)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        what = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        raise Refused(f"the plan's params cannot be checked ({' '.join(what.split())})") from None


def check_keys(plan: Plan) -> None:
    """Every job's key again from its params and its deps' keys, and every hook folder's
    digest: a plan that arrived changed in any value is refused, not built."""
    jobs = plan.by_id()
    for job in plan.jobs:
        missing = [d for d in job.deps if d not in jobs]
        if missing:
            raise Refused(f"{job.id}: depends on {missing[0]}, which is not in the plan")
        if job_key(job.kind, job.params, (jobs[d].key for d in job.deps)) != job.key:
            raise Refused(
                f"{job.id}: its key does not match its parameters and this host's code "
                f"(factory {__version__} here: install the controller's version, or the plan "
                "changed in transit)"
            )
        for hook in job.params.get("hooks", []):
            if hook_digest(Path(hook["path"])) != hook["digest"]:
                raise Refused(f"{job.id}: hook {hook['name']} arrived different from the plan's")


class Gated:
    """LocalExecutor, but a job starts only when the controller says go (its scheduler holds
    the host's slots), and a fetched job's file is checksummed here, where it is."""

    host: str | None = None

    def __init__(self, local: LocalExecutor, gates: Mapping[str, anyio.Event], fetch: set[str]):
        self.local = local
        self.gates = gates
        self.fetch = fetch
        # Slots are the controller's: waiting for go must not hold one here.
        self.free = anyio.CapacityLimiter(math.inf)

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self.free

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        await self.gates[job.id].wait()
        out = await self.local.run(job, inputs, emit)
        if job.id in self.fetch and out.path is not None and out.path.is_file():
            emit("checksumming")
            size = out.path.stat().st_size
            digest = await sha256_file(out.path, proc.current_meter.get())
            extents = data_extents(out.path)  # the controller reads these, not the holes
            remote = RemoteFile(path=str(out.path), size=size, sha256=digest, extents=extents)
            out = Output(out.path, {**out.info, "remote": remote.model_dump(mode="json")})
        return out


def read_small(path: Path, limit: int = INLINE_TEXT) -> str | None:
    """A text file as the controller's SFTP read gives it (UTF-8, errors replaced), if
    it is small: at most `limit` bytes, and at most `limit` characters once escaped in a
    JSON line (an escape sequence such as \\u001b takes six). None if it is bigger or
    cannot be read: the controller reads it by SFTP then. Bounding the escaped size keeps
    an event line (a log and a manifest) well under the SSH channel's window, which
    asyncssh's readline cuts a longer line at."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    text = data.decode(errors="replace")
    return text if len(json.dumps(text)) - 2 <= limit else None


class WithTexts:
    """A job's done or failed event carries its log, and a finalise's done its manifest,
    when they are small (read_small): the controller needs both, and an SFTP read of
    each costs it 4 round trips. Both are complete when the event comes: a done job's log
    is closed, a failed one's written through (unbuffered, every write awaited)."""

    def __init__(self, sink: Callable[[Event], None], out: Path) -> None:
        self.sink = sink
        self.out = out

    def __call__(self, event: Event) -> None:
        if event.kind in ("done", "failed") and event.job is not None:
            extra: dict[str, str] = {}
            log = read_small(self.out / "logs" / log_name(event.job))
            if log is not None:
                extra["log"] = log
            info = event.data.get("info")
            manifest = info.get("manifest") if isinstance(info, dict) else None
            if event.kind == "done" and isinstance(manifest, str):
                text = read_small(self.out / manifest)
                if text is not None:
                    extra["manifest_text"] = text
            if extra:
                event = dataclasses.replace(event, data={**event.data, **extra})
        self.sink(event)


class EventWriter:
    """Events as JSON lines on the stream the controller reads; a controller that is gone
    (broken pipe) stops the worker instead of failing a job."""

    def __init__(self, stream: TextIO, gone: Callable[[], None]) -> None:
        self.stream = stream
        self.gone = gone
        self.broken = False

    def __call__(self, event: Event) -> None:
        if self.broken:
            return
        try:
            self.stream.write(event.to_json() + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.broken = True
            self.gone()


async def _lines(fd: int) -> AsyncIterator[str]:
    """Lines from a pipe, without a thread: stdin must stay readable while jobs run."""
    os.set_blocking(fd, False)
    buf = b""
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")


async def clean_stale(workdir: Path) -> None:
    """Folders of workers that were killed (their pid is gone): nobody else removes them."""
    for folder in workdir.glob(f"{FOLDER_PREFIX}*"):
        try:
            async with aiofiles.open(folder / PIDFILE) as fh:
                pid = int(await fh.read())
        except (OSError, ValueError):
            continue  # not started yet, or not ours
        if not state.pid_alive(pid):
            await remove_tree(folder)


async def serve(stdin: int, stdout: TextIO) -> int:
    """Read the request, run it, stream its events; returns the exit code."""
    lines = _lines(stdin)
    stop = anyio.Event()
    writer = EventWriter(stdout, stop.set)
    bus = Bus(writer)
    first = await anext(lines, None)
    if first is None:
        return 0
    try:
        req = read_request(first)
    except Refused as exc:
        bus.emit(Event("run-end", message=str(exc), data={"status": "refused"}))
        return 2
    folder = Path(req.dir)
    out = folder / "out"
    refused: list[str] = []  # a malformed go line: the controller is not one we understand
    try:
        folder.mkdir(parents=True, exist_ok=True)
        async with aiofiles.open(folder / PIDFILE, "w") as fh:
            await fh.write(f"{os.getpid()}\n")
        with state.recording(out=str(out), cache=req.cache, worker=True):
            state.clean_leftovers()  # a killed worker's mounts and processes first
            await clean_stale(folder.parent)
            async with opened(Path(req.cache)) as cache:
                jobs = len(req.plan.jobs)
                local = LocalExecutor(
                    Workspace(out, cache, req.refresh, loop=req.loop), max(jobs, 1)
                )
                gates = {job.id: anyio.Event() for job in req.plan.jobs}
                for jid in req.auto:
                    gates[jid].set()
                gated = Gated(local, gates, set(req.fetch))
                sched = Scheduler(
                    req.plan, lambda job: gated, Bus(WithTexts(writer, out)), out / "logs"
                )
                bus.emit(Event("run-start", data={"matrix": req.plan.matrix, "jobs": jobs}))
                async with anyio.create_task_group() as tg:

                    async def controller() -> None:
                        async for line in lines:
                            if not line.strip():
                                continue
                            try:
                                gates[Go.parse(line, gates).go].set()
                            except Malformed as exc:
                                refused.append(str(exc))
                                break
                        stop.set()  # EOF: the controller is done with us, or gone

                    async def signals() -> None:
                        with anyio.open_signal_receiver(
                            signal.SIGTERM, signal.SIGHUP, signal.SIGINT
                        ) as received:
                            async for _ in received:
                                stop.set()
                                return

                    async def work() -> None:
                        runs = await sched.run()
                        ok = all(r.status == "done" for r in runs.values())
                        bus.emit(Event("run-end", data={"status": "built" if ok else "failed"}))

                    tg.start_soon(controller)
                    tg.start_soon(signals)
                    tg.start_soon(work)
                    await stop.wait()
                    tg.cancel_scope.cancel()
    except OSError as exc:
        bus.emit(Event("run-end", message=f"{folder}: {exc}", data={"status": "refused"}))
        return 1
    finally:
        with anyio.CancelScope(shield=True):
            await remove_tree(folder)
    if refused:
        bus.emit(Event("run-end", message=refused[0], data={"status": "refused"}))
        return 2
    return 0


def main() -> int:
    """Events go to the real stdout; fd 1 becomes stderr, so nothing a stage or a tool
    prints can corrupt the stream."""
    events = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        return anyio.run(serve, 0, events)
    finally:
        with contextlib.suppress(OSError):
            events.close()


__all__ = ["Refused", "main", "read_request", "serve", "validate_params"]
