"""Runs jobs on this machine by calling the stages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import anyio

from factory.plan import Job
from factory.results import Output, StageError
from factory.stages import Context, Workspace

Stage = Callable[[Context], Awaitable[Output]]


def _stages() -> dict[str, Stage]:
    from factory.stages import assemble, boot, convert, finalise, pack, publish, rootfs

    return {
        "rootfs": rootfs.run,
        "finalise": finalise.run,
        "assemble": assemble.run,
        "convert": convert.run,
        "pack": pack.run,
        "publish": publish.run,
        "boot": boot.run,
    }


class LocalExecutor:
    host: str | None = None

    def __init__(self, ws: Workspace, jobs: int) -> None:
        self.ws = ws
        self.cpu = anyio.CapacityLimiter(jobs)
        self.stages = _stages()

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self.cpu

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        stage = self.stages.get(job.kind)
        if stage is None:
            raise StageError(f"no stage for job kind {job.kind!r}")
        return await stage(Context(job, inputs, self.ws, emit))
