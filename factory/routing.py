"""Which executor runs which job: this machine, or a remote build host of the job's arch.

Opening executors may open connections, so routing is an async context manager that
owns them for the length of a run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from factory.executors.local import LocalExecutor
from factory.plan import Plan
from factory.scheduler import Router
from factory.spec import Matrix


@contextlib.asynccontextmanager
async def router(matrix: Matrix, local: LocalExecutor, plan: Plan) -> AsyncIterator[Router]:
    """Jobs of cells whose arch has `[[hosts]]` go to those hosts (one cell, one host at a
    time; see executors/placement.py), reached over SSH (executors/ssh.py); every other job
    runs here. Connections are opened only when some cell of the plan needs a host."""
    hosts = matrix.hosts
    needed = {job.arch for job in plan.jobs}
    if not any(set(h.arches) & needed for h in hosts):
        yield lambda job: local
        return
    # asyncssh only when there is a host to talk to
    from factory.executors import placement, ssh

    async with placement.farm(hosts, matrix.fallback, plan, local, ssh.SshLink) as farm:
        yield farm.route
