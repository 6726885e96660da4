"""The one way factory runs external commands.

Every command goes through `run()`: it is written to the current job's log with its
output, a failure raises `CommandError` carrying the exit code and the last lines of
stderr, and cancellation (Ctrl-C, a failed sibling, a timeout) kills the command's whole
process group before `run()` returns, so no child outlives the job that started it.

A command that reports how far it is (qemu-img -p, mksquashfs's bar, mmdebstrap's phases,
tar's checkpoints) is given a parser (`progress=`): each line or carriage-return chunk of
its output goes through it, and the fractions it finds go to the job's `Meter`, which
passes at most a few a second on as events. The redraws a parser reads are not logged:
a progress bar would fill the log with hundreds of them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from io import FileIO
from pathlib import Path

import aiofiles
import aiofiles.threadpool
import anyio
from aiofiles.threadpool.binary import AsyncFileIO
from anyio.abc import ByteReceiveStream, Process

from factory import state

TAIL_LINES = 20
KILL_GRACE = 5.0

Arg = str | os.PathLike[str]


class CommandError(Exception):
    """A command exited non-zero; carries what a user needs to see why."""

    def __init__(self, argv: Sequence[str], returncode: int, tail: Sequence[str]) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = list(tail)
        last = self.tail[-1] if self.tail else "no output"
        super().__init__(f"{Path(self.argv[0]).name} exited {returncode}: {last}")

    def details(self) -> str:
        return "\n".join([f"$ {shlex.join(self.argv)}", *self.tail])


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr_tail: list[str]
    matched: bool = False

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class JobLog:
    """A job's log file; `run()` writes commands and output into the one set for the task.

    A command's output, the bulk of a log, goes through aiofiles (`put`): one write per
    chunk its pipes give, in a worker thread, so a slow disk does not stall the event loop.
    Notes and the `$ command` lines are single short writes made at once (`write`), which
    sync callers can make too. The file is unbuffered and opened for appending: every
    write is one append, whole, whichever thread makes it.

    Writing it never raises: a log on a full disk must not turn a job's clear failure
    (or a whole run) into an OSError. The first error is kept in `error`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: FileIO | None = None
        self._async: AsyncFileIO | None = None
        self.error: OSError | None = None

    def open(self) -> None:
        try:
            try:
                self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
            except FileNotFoundError:  # the folder first (not on every job: a farm has 1000s)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115
        except OSError as exc:
            self.error = exc
            return
        self._async = aiofiles.threadpool.wrap(self._fh)

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        self._fh = self._async = None

    def _failed(self, exc: OSError) -> None:
        """No more writes; the file is closed by close() alone, when no put() is running
        (closing it under a put in a worker thread could let that write reach another file
        that took the same descriptor)."""
        self.error = self.error or exc
        self._async = None

    def write(self, text: str) -> None:
        if self._fh is not None and self._async is not None:
            try:
                self._fh.write(_encode([text]))
            except OSError as exc:
                self._failed(exc)

    async def put(self, lines: Sequence[str]) -> None:
        """Lines in one write through aiofiles. Shielded: a cancel waits for the write to
        land, so no worker thread writes into the file after it is closed."""
        if self._async is None or not lines:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._async.write(_encode(lines))
            except OSError as exc:
                self._failed(exc)

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                return [line.rstrip("\n") for line in deque(fh, maxlen=lines)]
        except OSError:
            return []

    async def tail_async(self, lines: int = TAIL_LINES, window: int = 64 * 1024) -> list[str]:
        """tail() from the event loop, through aiofiles: only the log's last `window` bytes
        are read (a tree's build log runs to megabytes)."""
        try:
            async with aiofiles.open(self.path, "rb") as fh:
                end = await fh.seek(0, os.SEEK_END)
                await fh.seek(max(0, end - window))
                data = await fh.read()
        except OSError:
            return []
        text = data.decode(errors="replace").splitlines()
        if end > window:
            text = text[1:]  # the first line read may be the end of a longer one
        return text[-lines:]


def _encode(lines: Iterable[str]) -> bytes:
    return "".join(t if t.endswith("\n") else t + "\n" for t in lines).encode(errors="replace")


current_log: ContextVar[JobLog | None] = ContextVar("current_log", default=None)

# A parser reads one line or \r-chunk of a command's output: (done, total) or None.
Parser = Callable[[str], "tuple[float, float] | None"]
PROGRESS_EVERY = 0.5  # seconds between two fractions a job passes on: plain logs stay short


class Meter:
    """How far the current job is, passed on to `emit(done, total)` at most every
    PROGRESS_EVERY seconds (the last of a burst is dropped: the next one or the job's end
    says more). Callable from the event loop only; a worker thread reports through
    anyio.from_thread."""

    def __init__(self, emit: Callable[[float, float], None], every: float = PROGRESS_EVERY):
        self.emit = emit
        self.every = every
        self._last = -math.inf
        self._seen: tuple[float, float] | None = None

    def __call__(self, done: float, total: float) -> None:
        if total <= 0 or not math.isfinite(done) or not math.isfinite(total):
            return
        now = time.monotonic()
        seen = (float(done), float(total))
        if now - self._last < self.every or seen == self._seen:
            return
        self._last, self._seen = now, seen
        self.emit(*seen)


current_meter: ContextVar[Meter | None] = ContextVar("current_meter", default=None)


@contextlib.contextmanager
def metering(meter: Meter | None) -> Iterator[Meter | None]:
    """Send the fractions of every `run()` in this task to `meter` (a stage's own work,
    such as hashing, takes it from `current_meter`)."""
    token = current_meter.set(meter)
    try:
        yield meter
    finally:
        current_meter.reset(token)


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[JobLog]:
    """Send the log of every `run()` in this task (and its children) to `path`."""
    log = JobLog(path)
    log.open()
    token = current_log.set(log)
    try:
        yield log
    finally:
        current_log.reset(token)
        log.close()


def note(text: str) -> None:
    """A line in the current job's log that did not come from a command."""
    log = current_log.get()
    if log is not None:
        log.write(f"# {text}")


_PIECE = re.compile(rb"([\r\n])")


def _measured(pending: bytes, progress: Parser, meter: Meter | None) -> tuple[list[str], bytes]:
    """The lines to log from `pending` and what is left of it (no end yet). Each piece
    ended by \r or \n goes through the progress parser and its fraction to the meter. A
    piece ended by \r is a redraw: logged only if the parser did not read it; one ended
    by \n is logged (a tool's last word, mmdebstrap's phases stay in the log)."""
    *parts, rest = _PIECE.split(pending)
    kept = []
    for raw, end in zip(parts[::2], parts[1::2], strict=True):
        piece = raw.decode(errors="replace")
        found = progress(piece)
        if found is not None and meter is not None:
            meter(*found)
        if piece.strip() and (end == b"\n" or found is None):
            kept.append(piece)
    return kept, rest


async def _drain(
    stream: ByteReceiveStream | None,
    log: JobLog | None,
    tail: deque[str] | None,
    keep: bytearray | None,
    until: list[re.Pattern[str]] | None = None,
    found: Callable[[], None] | None = None,
    progress: Parser | None = None,
    meter: Meter | None = None,
) -> None:
    """Read a pipe to its end: kept bytes (`keep`), or lines to the log and the tail;
    calls `found` and stops once every pattern of `until` has matched a line (in any
    order: a guest's login prompt and a service's message race each other). With
    `progress`, the parser reads each \r-chunk (see `_measured`)."""
    if stream is None:
        return
    pending = b""
    async for chunk in stream:
        if keep is not None:
            keep.extend(chunk)
        pending += chunk
        if progress is not None:
            texts, pending = _measured(pending, progress, meter)
        else:
            *lines, pending = pending.split(b"\n")
            texts = [raw.decode(errors="replace").rstrip("\r") for raw in lines]
        if keep is None:
            await _record(texts, log, tail)
        if until is not None and found is not None:
            partial = pending.decode(errors="replace")
            until[:] = [u for u in until if not any(u.search(t) for t in (*texts, partial))]
            if not until:
                if partial and keep is None:  # a prompt ends without a newline: keep it
                    await _record([partial], log, tail)
                found()
                return
    if pending and keep is None:
        texts = [pending.decode(errors="replace")]
        if progress is not None:
            texts, _ = _measured(pending + b"\n", progress, meter)
        await _record(texts, log, tail)


async def _record(lines: list[str], log: JobLog | None, tail: deque[str] | None) -> None:
    if tail is not None:
        tail.extend(lines)
    if log is not None:
        await log.put(lines)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _terminate(process: Process) -> None:
    """Stop the whole process group: TERM, then KILL after a grace period. The group is
    signalled even when its leader has exited: a child may still hold our pipes.
    Shielded by the caller."""
    _kill_group(process.pid, signal.SIGTERM)
    if process.returncode is None:
        with anyio.move_on_after(KILL_GRACE):
            await process.wait()
    _kill_group(process.pid, signal.SIGKILL)
    await process.wait()


async def run(
    argv: Sequence[Arg],
    *,
    input: bytes | None = None,
    capture: bool = False,
    check: bool = True,
    cwd: Arg | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    until: str | Sequence[str] | None = None,
    progress: Parser | None = None,
) -> Completed:
    """Run a command to completion.

    stdout is kept (and returned) when `capture` is set, else it goes to the log; stderr
    always goes to the log and its last lines to the error. The command runs in its own
    session so that killing its process group also stops what it started (mmdebstrap's
    apt, qemu, ...). `env` entries are added to the inherited environment.

    With `until`, the command runs until a line of its stdout matches that regex (or, for
    several, each of them has matched a line); then it is stopped and `matched` is set
    (for programs that never exit, such as a booting VM).
    A command that exits before a match is an error however it exits.

    With `progress`, every line and \r-chunk of stdout and stderr goes through that parser;
    the fractions it finds go to the current job's meter (see `metering`).
    """
    args = [os.fspath(a) for a in argv]
    log = current_log.get()
    started = time.monotonic()
    if log is not None:
        log.write(f"$ {shlex.join(args)}")
    full_env = None if env is None else {**os.environ, **env}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    out = bytearray() if capture else None
    wanted = [until] if isinstance(until, str) else list(until or ())
    pattern = [re.compile(u) for u in wanted] if until is not None else None
    matched = False
    meter = current_meter.get() if progress is not None else None
    # Shielded: a cancel arriving while the pipes connect would otherwise kill only the
    # leader and leave its children running; it is taken at the first await below.
    with anyio.CancelScope(shield=True):
        process = await anyio.open_process(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
        )
    run_state = state.current()
    if run_state is not None:
        run_state.add_group(process.pid)
    try:
        with anyio.fail_after(timeout):
            async with anyio.create_task_group() as tg:

                def found() -> None:
                    nonlocal matched
                    matched = True
                    tg.cancel_scope.cancel()

                tg.start_soon(
                    _drain,
                    process.stdout,
                    log,
                    None if capture else tail,
                    out,
                    pattern,
                    found,
                    progress,
                    meter,
                )
                tg.start_soon(_drain, process.stderr, log, tail, None, None, None, progress, meter)
                if input is not None and process.stdin is not None:
                    await process.stdin.send(input)
                    await process.stdin.aclose()
                await process.wait()
                # What the command left running in its group (a daemon a postinst
                # started, a background child holding our pipes) ends with it.
                _kill_group(process.pid, signal.SIGKILL)
        if matched:
            with anyio.CancelScope(shield=True):
                await _terminate(process)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _terminate(process)
            await process.aclose()
        raise
    finally:
        if run_state is not None:
            run_state.drop_group(process.pid)
    await process.aclose()
    code = process.returncode
    assert code is not None
    if log is not None:
        log.write(f"# exit {code} after {time.monotonic() - started:.1f}s")
    if until is not None and not matched:
        what = " and one that matches ".join(map(repr, wanted))
        tail.append(f"exited before printing a line that matches {what}")
        raise CommandError(args, code, list(tail))
    if check and code != 0 and not matched:
        raise CommandError(args, code, list(tail))
    return Completed(args, code, bytes(out or b""), list(tail), matched)
