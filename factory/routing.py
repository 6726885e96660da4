"""Which executor runs which job: this machine, or a remote build host of the job's arch.

Opening executors may open connections, so routing is an async context manager that
owns them for the length of a run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from factory.executors.local import LocalExecutor
from factory.scheduler import Router
from factory.spec import Matrix


@contextlib.asynccontextmanager
async def router(matrix: Matrix, local: LocalExecutor) -> AsyncIterator[Router]:
    """Every job runs here until remote hosts are wired in."""
    del matrix
    yield lambda job: local
