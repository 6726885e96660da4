"""proc.run: the one way factory runs commands (real processes, no root needed)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from factory import proc
from factory.proc import CommandError, logging_to


def alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_dead(pids: list[int], within: float = 3.0) -> list[int]:
    """The pids still alive after up to `within` seconds (signals are delivered async)."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def spawned(script: str) -> bool:
    """A child of this process runs `sh -c script`."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == me and script.encode() in argv:
            return True
    return False


async def read_pids(pidfile: Path, count: int, within: float = 5.0) -> list[int]:
    with anyio.fail_after(within):
        while True:
            if pidfile.exists():
                lines = pidfile.read_text().split()
                if len(lines) >= count:
                    return [int(x) for x in lines[:count]]
            await anyio.sleep(0.02)


# --- output and errors -----------------------------------------------------------------------


async def test_capture_returns_stdout() -> None:
    done = await proc.run(["sh", "-c", "printf 'one\\ntwo\\n'"], capture=True)
    assert done.returncode == 0
    assert done.stdout == b"one\ntwo\n"
    assert done.text.splitlines() == ["one", "two"]
    assert done.argv == ["sh", "-c", "printf 'one\\ntwo\\n'"]
    assert done.matched is False


async def test_input_env_and_cwd(tmp_path: Path) -> None:
    done = await proc.run(["cat"], input=b"fed on stdin", capture=True)
    assert done.stdout == b"fed on stdin"
    done = await proc.run(
        ["sh", "-c", 'echo "$FACTORY_TEST_VAR"; pwd'],
        capture=True,
        env={"FACTORY_TEST_VAR": "set-by-test"},
        cwd=tmp_path,
    )
    assert done.text.splitlines() == ["set-by-test", str(tmp_path)]
    # env entries are added to the inherited environment, not a replacement for it
    done = await proc.run(["sh", "-c", 'echo "$PATH"'], capture=True, env={"X": "1"})
    assert done.text.strip() == os.environ["PATH"]


async def test_pathlike_arguments(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("content")
    done = await proc.run(["cat", tmp_path / "f"], capture=True)
    assert done.text == "content"
    assert done.argv == ["cat", str(tmp_path / "f")]


async def test_failure_raises_with_returncode_and_stderr_tail() -> None:
    script = "echo to-stdout; for i in $(seq 1 30); do echo err$i >&2; done; exit 3"
    with pytest.raises(CommandError) as info:
        await proc.run(["sh", "-c", script], capture=True)
    err = info.value
    assert err.returncode == 3
    assert err.argv == ["sh", "-c", script]
    # the last TAIL_LINES lines of stderr, in order; captured stdout is not in the tail
    assert err.tail == [f"err{i}" for i in range(31 - proc.TAIL_LINES, 31)]
    assert "to-stdout" not in err.tail
    assert str(err) == "sh exited 3: err30"
    details = err.details().splitlines()
    assert details[0] == f"$ sh -c '{script}'"
    assert details[-1] == "err30"


async def test_failure_without_output() -> None:
    with pytest.raises(CommandError) as info:
        await proc.run(["false"])
    assert info.value.returncode == 1
    assert info.value.tail == []
    assert str(info.value) == "false exited 1: no output"


async def test_check_false_returns_the_code() -> None:
    done = await proc.run(["sh", "-c", "echo bad >&2; exit 7"], check=False)
    assert done.returncode == 7
    assert done.stderr_tail == ["bad"]


async def test_missing_program_is_an_error() -> None:
    with pytest.raises(OSError):
        await proc.run(["/nonexistent/factory-no-such-program"])


# --- the job log ------------------------------------------------------------------------------


async def test_log_gets_command_stderr_and_exit(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "job.log"
    with logging_to(log_path) as log:
        await proc.run(["sh", "-c", "echo out-line; echo err-line >&2"])
        await proc.run(["sh", "-c", "echo captured-line; echo err2 >&2"], capture=True)
        proc.note("a note")
        with pytest.raises(CommandError):
            await proc.run(["sh", "-c", "echo failing >&2; exit 4"])
        assert log.path == log_path
    lines = log_path.read_text().splitlines()
    assert lines[0] == "$ sh -c 'echo out-line; echo err-line >&2'"
    assert "out-line" in lines  # stdout goes to the log when not captured
    assert "err-line" in lines
    assert "err2" in lines
    assert "captured-line" not in lines  # captured stdout is returned, not logged
    assert "# a note" in lines
    assert "failing" in lines
    exits = [line for line in lines if line.startswith("# exit ")]
    assert [e.split()[2] for e in exits] == ["0", "0", "4"]
    # the log is closed and no longer current after the block
    assert proc.current_log.get() is None


async def test_log_is_per_task(tmp_path: Path) -> None:
    async def job(name: str) -> None:
        with logging_to(tmp_path / f"{name}.log"):
            await anyio.sleep(0.05)  # interleave with the other task
            await proc.run(["sh", "-c", f"echo from-{name} >&2"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(job, "a")
        tg.start_soon(job, "b")
    a = (tmp_path / "a.log").read_text()
    b = (tmp_path / "b.log").read_text()
    assert "from-a" in a and "from-b" not in a
    assert "from-b" in b and "from-a" not in b


async def test_no_log_set_is_fine() -> None:
    assert proc.current_log.get() is None
    await proc.run(["sh", "-c", "echo x >&2"])
    proc.note("nowhere to go")


# --- until ------------------------------------------------------------------------------------


async def test_until_stops_a_never_ending_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = f'echo $$ > {pidfile}; echo booting; echo "login: "; sleep 600'
    with anyio.fail_after(10):
        done = await proc.run(["sh", "-c", script], until=r"login:\s*$")
    assert done.matched is True
    [pid] = [int(x) for x in pidfile.read_text().split()]
    assert wait_dead([pid]) == []


async def test_until_matches_a_prompt_without_newline(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        done = await proc.run(["sh", "-c", "printf 'debian login: '; sleep 600"], until="login: ")
    assert done.matched


async def test_until_logs_the_output_it_read(tmp_path: Path) -> None:
    with logging_to(tmp_path / "boot.log"), anyio.fail_after(10):
        await proc.run(["sh", "-c", "echo booting; echo 'login: '; sleep 600"], until="login:")
    text = (tmp_path / "boot.log").read_text()
    assert "booting" in text
    assert "login:" in text


async def test_until_without_match_is_an_error() -> None:
    with pytest.raises(CommandError) as info:
        await proc.run(["sh", "-c", "echo booting; echo kernel panic >&2; exit 0"], until="login:")
    assert info.value.returncode == 0
    assert any("login:" in line for line in info.value.tail)
    assert "kernel panic" in info.value.tail


async def test_until_with_capture_still_matches() -> None:
    done = await proc.run(
        ["sh", "-c", "echo 'login: '; sleep 600"], capture=True, until="login:", timeout=1.0
    )
    assert done.matched
    assert b"login:" in done.stdout


# --- timeouts and cancellation ----------------------------------------------------------------


async def test_timeout_raises_and_leaves_no_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await proc.run(["sh", "-c", f"echo $$ > {pidfile}; sleep 600"], timeout=0.5)
    assert time.monotonic() - started < proc.KILL_GRACE  # TERM was enough; no 600 s wait
    [pid] = [int(x) for x in pidfile.read_text().split()]
    assert wait_dead([pid]) == []


async def test_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    # the shell records itself and both of its children; it starts only once run() has sent
    # its input, so the cancellation below surely finds run() past open_process (see
    # test_cancel_while_the_process_starts for the window before that)
    script = (
        f"read go; echo $$ > {pidfile}; sleep 600 & echo $! >> {pidfile}; "
        f"sleep 600 & echo $! >> {pidfile}; wait"
    )
    errors: list[BaseException] = []

    async def job() -> None:
        try:
            await proc.run(["sh", "-c", script], input=b"go\n")
        except BaseException as e:
            errors.append(e)
            raise

    pids: list[int] = []
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(job)
                pids = await read_pids(pidfile, 3)
                assert all(alive(p) for p in pids)
                tg.cancel_scope.cancel()
        # run() returned (by cancellation) only after the group was gone
        assert len(errors) == 1 and isinstance(errors[0], anyio.get_cancelled_exc_class())
        assert wait_dead(pids) == []
    finally:
        kill_quietly([p for p in pids if alive(p)])


async def test_cancel_while_the_process_starts(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = f"sleep 600 & echo $! > {pidfile}; sleep 600 & echo $! >> {pidfile}; wait"
    pids: list[int] = []
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(proc.run, ["sh", "-c", script])
                # step the loop until run() has spawned the shell: open_process is then still
                # waiting for its pipes to connect, which takes more loop iterations
                while not spawned(script):
                    await anyio.lowlevel.checkpoint()
                # block the event loop (so open_process cannot finish) until the shell has
                # started its children, then cancel: what a Ctrl-C or a failing sibling
                # does to a job that has just started
                deadline = time.monotonic() + 5
                while len(pidfile.read_text().split() if pidfile.exists() else []) < 2:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)  # noqa: ASYNC251 - blocking on purpose
                pids = [int(x) for x in pidfile.read_text().split()]
                tg.cancel_scope.cancel()
        assert wait_dead(pids, within=1) == []
    finally:
        kill_quietly([p for p in pids if alive(p)])


async def test_what_a_finished_command_left_running_ends_with_it(tmp_path: Path) -> None:
    """A background child holding our pipes would hang the job forever; it is killed."""
    pidfile = tmp_path / "pids"
    with anyio.fail_after(10):
        await proc.run(["sh", "-c", f"sleep 600 & echo $! > {pidfile}; exit 0"])
    [pid] = [int(x) for x in pidfile.read_text().split()]
    assert wait_dead([pid]) == []


def test_a_log_on_a_full_disk_never_raises() -> None:
    log = proc.JobLog(Path("/dev/full"))
    log.open()
    for _ in range(3):
        log.write("x" * 10000)
    log.close()
    assert log.error is not None and log.error.errno == errno.ENOSPC
