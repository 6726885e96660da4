"""Runs jobs on this machine by calling the stages."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

from factory.plan import Job
from factory.proc import CommandError
from factory.results import Output, StageError
from factory.stages import Context, Workspace, registry

# What tools say when their output's filesystem is full ("Wrote only": tar's short write).
_FULL = ("No space left on device", "Disk quota exceeded", "Wrote only")


def disk_full(exc: BaseException) -> bool:
    """Did this failure come from a full filesystem (ours, or a tool's)?"""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, CommandError):
        return any(marker in line for line in exc.tail for marker in _FULL)
    return False


def fullest(folders: list[Path]) -> tuple[Path, int]:
    """The folder with the least free space, and that space in bytes."""
    free = []
    for folder in folders:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        st = os.statvfs(probe)
        free.append((st.f_bavail * st.f_frsize, folder))
    space, folder = min(free)
    return folder, space


class LocalExecutor:
    host: str | None = None

    def __init__(self, ws: Workspace, jobs: int) -> None:
        self.ws = ws
        self.cpu = anyio.CapacityLimiter(jobs)

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self.cpu

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        try:
            stage = registry.get(job.kind)
        except registry.ParamsError as exc:
            raise StageError(str(exc)) from None
        try:
            return await stage.run(Context(job, inputs, self.ws, emit))
        except (OSError, CommandError) as exc:
            if not disk_full(exc):
                raise
            folder, _space = fullest([self.ws.work, self.ws.out, self.ws.cache.root])
            raise StageError(
                f"no space left on device in {folder} (free some space or point --out or "
                f"--cache elsewhere): {exc}"
            ) from exc
