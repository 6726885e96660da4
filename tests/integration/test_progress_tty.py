"""On a real terminal, a running conversion shows how far it is: `factory run` inside a
tmux pane, the pane read a few times a second, the vmdk conversion's percentage seen
rising before the job ends (qemu-img convert -p read by its progress parser)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.conftest import ROOT
from tests.integration.conftest import CACHE, DATA

pytestmark = pytest.mark.slow

DONE = "FACTORY-EXIT="
# The convert job's row: `⠦   convert:…:vmdk: qemu-img convert to vmdk ━━━╺━━  57% 0:00:12`
CONVERT_ROW = re.compile(r"^\S?\s+convert\S*vmdk.*?\s(\d{1,3})%", re.MULTILINE)


@dataclass
class Tmux:
    """A tmux server of its own (its socket name) with one detached session."""

    socket: str
    session: str = "factory"

    async def tmux(self, *args: str, check: bool = True) -> str:
        done = await anyio.run_process(["tmux", "-L", self.socket, *args], check=check)
        return done.stdout.decode(errors="replace")

    async def screen(self) -> str:
        return await self.tmux("capture-pane", "-p", "-t", self.session)


@contextlib.asynccontextmanager
async def tmux_running(command: str, width: int = 160, height: int = 50) -> AsyncIterator[Tmux]:
    """`command` in a new detached tmux session of `width` x `height`. On the way out the
    command is interrupted (Ctrl-C: a factory run cleans up) and the server killed, on
    success, failure and cancel alike."""
    term = Tmux(f"factory-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    await term.tmux(
        "new-session", "-d", "-s", term.session, "-x", str(width), "-y", str(height), command
    )
    try:
        yield term
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                if DONE not in await term.screen():
                    await term.tmux("send-keys", "-t", term.session, "C-c", check=False)
                    for _ in range(120):  # a minute to clean up
                        if DONE in await term.screen():
                            break
                        await anyio.sleep(0.5)
            await term.tmux("kill-server", check=False)
            # tmux leaves its socket behind
            tmpdir = Path(os.environ.get("TMUX_TMPDIR", "/tmp"))
            (tmpdir / f"tmux-{os.getuid()}" / term.socket).unlink(missing_ok=True)


def matrix(tmp_path: Path) -> Path:
    """raw-qcow2.toml (its tree and finalised tree are the other modules') as a vmdk
    only: streamOptimized deflates in one thread, long enough to watch."""
    text = (DATA / "raw-qcow2.toml").read_text()
    text, n = re.subn(r"(?m)^formats = .*$", 'formats = ["vmdk"]', text)
    assert n == 1
    path = tmp_path / "progress.toml"
    path.write_text(text.replace('name = "itest-disk"', 'name = "itest-progress"'))
    return path


@pytest.mark.timeout(1500)  # a cold cache builds the tree first
async def test_a_conversion_shows_its_percentage_rising(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "factory", "run", str(matrix(tmp_path))]
    argv += ["--out", str(tmp_path / "out"), "--cache", str(CACHE), "--events", "rich"]
    # The pane's size, not the COLUMNS and LINES this session may have inherited.
    run = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", *argv])
    command = f"cd {shlex.quote(str(ROOT))} && {run}; echo {DONE}$?; sleep 600"
    seen: list[int] = []
    started = time.monotonic()
    async with tmux_running(command) as term:
        screen = ""
        while DONE not in screen and time.monotonic() - started < 1400:
            screen = await term.screen()
            for value in map(int, CONVERT_ROW.findall(screen)):
                if not seen or seen[-1] != value:
                    seen.append(value)
            await anyio.sleep(0.3)
        code = re.search(rf"{DONE}(\d+)", screen)
        assert code is not None, f"the run did not end:\n{screen}"
        assert code[1] == "0", screen
    rising = [v for v in seen if v < 100]
    assert len(set(rising)) >= 2, f"the conversion's percentages seen: {seen}\n{screen}"
    assert rising == sorted(rising), seen
    assert (tmp_path / "out").is_dir()
