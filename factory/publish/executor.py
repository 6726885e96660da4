"""Where upload jobs run: here, beside OUT, in slots of their own."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio

from factory.executors.local import LocalExecutor
from factory.plan import Job
from factory.results import Output

UPLOADS_AT_ONCE = 4  # network-bound: they do not take the run's CPU slots


class Uploads:
    """The executor of upload jobs: here (OUT is here), in slots of their own, so that
    waiting on a slow server never holds a CPU slot a build could use."""

    host: str | None = None

    def __init__(self, local: LocalExecutor, slots: int = UPLOADS_AT_ONCE) -> None:
        self.local = local
        self.slots = anyio.CapacityLimiter(slots)

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self.slots

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        return await self.local.run(job, inputs, emit)
