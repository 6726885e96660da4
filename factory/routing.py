"""Which executor runs which job: this machine, or a remote build host of the job's arch.

Opening executors may open connections, so routing is an async context manager that
owns them for the length of a run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from factory.executors.local import LocalExecutor
from factory.plan import Job, Plan
from factory.publish.executor import Uploads
from factory.scheduler import Executor, Router
from factory.spec import Matrix


@contextlib.asynccontextmanager
async def router(matrix: Matrix, local: LocalExecutor, plan: Plan) -> AsyncIterator[Router]:
    """Jobs of cells whose arch has `[[hosts]]` go to those hosts (one cell, one host at a
    time; see executors/placement.py), reached over SSH (executors/ssh.py); every other job
    runs here. Connections are opened only when some cell of the plan needs a host.
    Upload jobs (publish targets) run here, where OUT is, in slots of their own."""
    hosts = matrix.hosts
    needed = {job.arch for job in plan.jobs}
    uploads = Uploads(local)
    if not any(set(h.arches) & needed for h in hosts):
        yield lambda job: uploads if job.kind == "upload" else local
        return
    # asyncssh only when there is a host to talk to
    from factory.executors import placement, ssh

    built = Plan(matrix=plan.matrix, jobs=tuple(j for j in plan.jobs if j.kind != "upload"))
    async with placement.farm(hosts, matrix.fallback, built, local, ssh.SshLink) as farm:

        def route(job: Job) -> Executor:
            return uploads if job.kind == "upload" else farm.route(job)

        yield route
