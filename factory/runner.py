"""One run of a plan, with everything around the scheduler: the cache, the progress
display, signals, the out folder's lock, the state file, the report, the clean-up."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from factory import ci, nightly, outstate, report, report_html, sign, state
from factory.cache import Cache, remove_tree
from factory.events import Bus, Event, JsonSink, PlainSink
from factory.executors.local import LocalExecutor
from factory.plan import Plan
from factory.proc import CommandError
from factory.results import StageError
from factory.routing import router
from factory.scheduler import JobRun, Scheduler
from factory.spec import Matrix, MatrixError, check_credentials
from factory.stages import Workspace, registry

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunRefused(Exception):
    """The run cannot start; the message says why and what to do (exit code 2)."""


@dataclass(frozen=True)
class Options:
    out: Path
    cache: Path
    jobs: int
    fail_fast: bool = False
    refresh: bool = False
    loop: bool = False
    events: str = "plain"  # rich | plain | json
    matrix_sha256: str = ""  # of the bytes the run read; "" = hash matrix.path at the end


def lock_dir() -> Path:
    """Where runs lock their out folders: not in OUT, which holds only what is published
    (a nightly that syncs OUT to a download server must not ship a lock)."""
    for base in (os.environ.get("FACTORY_LOCK_DIR"), "/run/lock/factory"):
        if base:
            try:
                Path(base).mkdir(parents=True, exist_ok=True)
                return Path(base)
            except OSError:
                continue
    folder = Path(tempfile.gettempdir()) / "factory-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def out_lock_path(out: Path) -> Path:
    return lock_dir() / f"out-{outstate.out_id(out)}.lock"


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """One run at a time writes an out folder; a second one stops at once and says so."""
    try:
        fd = os.open(out_lock_path(out), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunRefused(f"{out}: --out: cannot lock it ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunRefused(
                f"{out}: --out: another factory run (pid {holder}) is writing this folder "
                "(wait for it to finish, or give another --out)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def status_of(runs: Iterable[JobRun], interrupted: bool) -> str:
    if interrupted:
        return "interrupted"
    return "built" if {r.status for r in runs} <= {"done"} else "failed"


def _sink(mode: str) -> tuple[Bus, contextlib.AbstractContextManager[object]]:
    if mode == "rich":
        from factory.progress import RichSink

        rich = RichSink()
        return Bus(rich), rich
    return Bus(JsonSink() if mode == "json" else PlainSink()), contextlib.nullcontext()


@dataclass
class _Stop:
    """Ctrl-C and SIGTERM: the first cancels the run, later ones are ignored so that the
    clean-up they interrupt still finishes."""

    scope: anyio.CancelScope
    interrupted: bool = False
    code: int = EXIT_INTERRUPTED


async def _watch_signals(stop: _Stop, *, task_status: TaskStatus[None]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            if not stop.interrupted:
                stop.interrupted = True
                stop.scope.cancel()


async def run_plan(matrix: Matrix, plan: Plan, opts: Options) -> int:
    """Run the plan into opts.out; returns the exit code. Raises RunRefused before any
    work when the run cannot start. Signals are caught from the first moment to the last."""
    stop = _Stop(anyio.CancelScope())
    refused: RunRefused | None = None
    async with anyio.create_task_group() as watcher:
        await watcher.start(_watch_signals, stop)
        try:
            with stop.scope:
                stop.code = await _prepare_and_run(matrix, plan, opts, stop)
        except RunRefused as exc:  # raised outside the task group, not in an ExceptionGroup
            refused = exc
        finally:
            watcher.cancel_scope.cancel()
    if refused is not None:
        raise refused
    return stop.code


async def _prepare_and_run(matrix: Matrix, plan: Plan, opts: Options, stop: _Stop) -> int:
    try:  # the publish targets' credentials, before any work
        check_credentials(matrix, {j.params["target"] for j in plan.jobs if j.kind == "upload"})
    except MatrixError as exc:
        raise RunRefused(str(exc)) from None
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunRefused(f"{opts.out}: --out: cannot create ({exc.strerror})") from None
    with out_lock(opts.out), state.recording(out=str(opts.out), cache=str(opts.cache)):
        for line in state.clean_leftovers():
            print(f"factory: cleaned up after a killed run: {line}", file=sys.stderr)
        try:
            cache = await Cache(opts.cache).open()
        except (OSError, CommandError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise RunRefused(f"{opts.cache}: --cache: cannot use ({why})") from None
        try:
            if matrix.sign is not None:
                await _check_sign_key(matrix.sign.gpg_key, matrix)
            previous = outstate.load_report(opts.out)
            verified = outstate.Verified(cache.root, opts.out)
            carried = (
                outstate.Carried()
                if opts.refresh
                else await outstate.carried_over(plan, previous, opts.out, verified)
            )
            todo = outstate.still_needed(plan, carried)
            bus, display = _sink(opts.events)
            if todo is None:
                verified.save()
                return _unchanged(matrix, opts, previous or {}, carried, bus)
            _check_privileges(matrix, todo)
            (opts.out / ".lock").unlink(missing_ok=True)  # where factory 0.1 locked OUT
            await remove_tree(opts.out / ".work")  # a killed run's intermediates
            with display:
                return await _schedule(
                    matrix, plan, todo, opts, cache, bus, stop, previous, carried, verified
                )
        finally:
            cache.release()  # the trees this run read may be replaced now


# What a tree needs here: mounts of /proc, /sys and /dev in it, and its device nodes.
TREE_CAPS = {21: "CAP_SYS_ADMIN", 27: "CAP_MKNOD"}


def missing_caps(status: str) -> list[str]:
    """The capabilities of TREE_CAPS that /proc/self/status's CapEff line lacks."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return [name for bit, name in TREE_CAPS.items() if not effective >> bit & 1]
    return []


def _check_privileges(matrix: Matrix, todo: Plan) -> None:
    """Refuse before any work when a tree is to be made here without the capabilities it
    needs: in a container without them mmdebstrap "succeeds", leaving a /dev of regular
    files, and that tree would be cached under its normal key."""
    remote = {a for h in matrix.hosts for a in h.arches}
    here = [j for j in todo.jobs if j.kind in ("rootfs", "finalise") and j.arch not in remote]
    if not here:
        return
    try:
        missing = missing_caps(Path("/proc/self/status").read_text(encoding="utf-8"))
    except OSError:
        return
    if missing:
        raise RunRefused(
            f"factory: {here[0].id} needs {' and '.join(missing)}, which this process lacks "
            "(for the tree's mounts and device nodes; in a container: --cap-add SYS_ADMIN "
            "--cap-add MKNOD, or --privileged)"
        )


async def _check_sign_key(key: str, matrix: Matrix) -> None:
    try:
        await sign.check_key(key)
    except StageError as exc:
        raise RunRefused(f"{matrix.path}: sign.gpg_key: {exc}") from None


def _unchanged(
    matrix: Matrix, opts: Options, previous: dict[str, object], carried: outstate.Carried, bus: Bus
) -> int:
    """A night with nothing new: every artifact and boot test in OUT has this plan's key
    and its sha256. Nothing in OUT is written."""
    since = previous.get("finished")
    when = outstate.utc(since) if isinstance(since, int | float) else "the last run"
    message = (
        f"unchanged since {when}: {len(carried.artifacts)} "
        f"artifacts in {opts.out} have this plan's keys and their sha256; nothing to do"
    )
    bus.emit(Event("run-start", data={"matrix": matrix.name, "jobs": 0, "out": str(opts.out)}))
    print(f"factory: {matrix.name}: {message}", file=sys.stderr)
    bus.emit(
        Event(
            "run-end",
            message=message,
            data={
                "status": "unchanged",
                "out": str(opts.out),
                "seconds": 0.0,
                "artifacts": len(carried.artifacts),
                "failed": [],
            },
        )
    )
    return EXIT_OK


async def _schedule(
    matrix: Matrix,
    whole: Plan,
    plan: Plan,
    opts: Options,
    cache: Cache,
    bus: Bus,
    stop: _Stop,
    previous: dict[str, object] | None,
    carried: outstate.Carried,
    verified: outstate.Verified,
) -> int:
    """Run `plan` (what OUT lacks of `whole`), then write the night's record."""
    before = nightly.manifests_before(plan, opts.out)
    local = LocalExecutor(
        Workspace(opts.out, cache, opts.refresh, cpus=opts.jobs, loop=opts.loop), opts.jobs
    )
    started = time.time()
    sched: Scheduler | None = None
    try:
        bus.emit(
            Event(
                "run-start",
                data={
                    "matrix": matrix.name,
                    "jobs": len(plan.jobs),
                    "out": str(opts.out),
                    # What each job is expected to take (the scheduler's ranks add these):
                    # the progress display weighs what is left by them.
                    "costs": {j.id: registry.cost(j.kind, j.params) for j in plan.jobs},
                },
            )
        )
        async with router(matrix, local, plan) as route:
            sched = Scheduler(plan, route, bus, opts.out / "logs", fail_fast=opts.fail_fast)
            await sched.run()
    finally:
        runs = list(sched.runs.values()) if sched else []
        status = status_of(runs, stop.interrupted)
        with anyio.CancelScope(shield=True):
            await remove_tree(opts.out / ".work")  # first: it frees space on a full disk
            try:
                await _record(matrix, whole, opts, started, status, runs, before, previous, carried)
                for art in report.artifacts(runs):
                    verified.remember(opts.out / art["path"], art["sha256"])
                verified.save()
            except (OSError, StageError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                print(f"factory: {opts.out}: could not write the report ({why})", file=sys.stderr)
                status = "failed" if status == "built" else status
        stop.code = {"built": EXIT_OK, "failed": EXIT_FAILED}.get(status, EXIT_INTERRUPTED)
        bus.emit(
            Event(
                "run-end",
                data={
                    "status": status,
                    "out": str(opts.out),
                    "seconds": round(time.time() - started, 1),
                    "artifacts": len(report.artifacts(runs)),
                    "failed": [r.job.id for r in runs if r.status == "failed"],
                },
            )
        )
    return stop.code


async def _record(
    matrix: Matrix,
    whole: Plan,
    opts: Options,
    started: float,
    status: str,
    runs: list[JobRun],
    before: dict[str, list[dict[str, str]] | None],
    previous: dict[str, object] | None,
    carried: outstate.Carried,
) -> None:
    """report.json, SHA256SUMS, report.html, the SBOMs, CHANGES.md and the signature, in
    that order (the signature last: it covers the SHA256SUMS just written)."""
    by_id = {r.job.id: r for r in runs}
    cells, per_cell = await nightly.record(whole, by_id, before, previous, opts.out)
    doc = await report.write(
        opts.out,
        matrix.name,
        started,
        time.time(),
        status,
        runs,
        carried_jobs=carried.jobs.values(),
        carried_artifacts=carried.artifacts,
        cells=cells,
        about=ci.about(matrix, opts.matrix_sha256),
    )
    await report_html.write(opts.out, doc)
    since = (previous or {}).get("finished")
    await nightly.write_changes(
        opts.out, matrix.name, per_cell, since if isinstance(since, int | float) else None
    )
    if matrix.sign is not None:
        await sign.sign_sums(opts.out / "SHA256SUMS", matrix.sign.gpg_key)
