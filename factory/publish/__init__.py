"""Publish targets: after a cell's artifacts are published in OUT, `upload` jobs send
them where they are served or run (`[[publish]]` in the matrix).

- `stage.py`: the `upload` stage (one job per (cell, SFTP target) and per (distro, OCI
  target)), its retries with backoff, the credentials read from the environment or a
  file, and `Uploads`, the executor that bounds how many uploads run at once.
- `sftp.py`: a download server over SFTP (asyncssh).
- `oci.py`: an OCI registry (images and KubeVirt containerDisks).

A target's failure is its job's alone: the scheduler goes on with every other job.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from factory.results import StageError

T = TypeVar("T")

BACKOFF = 2.0  # seconds before the first retry; doubled each time, with jitter
MAX_BACKOFF = 60.0


class Refused(StageError):
    """A failure another attempt cannot mend (a host key or a password refused, a missing
    credential): reported at once, not retried."""


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    retries: int,
    emit: Callable[[str], None],
    *,
    backoff: float = BACKOFF,
) -> T:
    """`attempt()` once, then up to `retries` times more after StageErrors, waiting
    backoff, 2 × backoff, … (capped, ±25 % jitter so that the targets of a run do not
    knock again all at once). The last error is raised with the number of attempts."""
    for n in range(retries + 1):
        try:
            return await attempt()
        except Refused:
            raise
        except StageError as exc:
            if n == retries:
                if retries:
                    raise StageError(f"{exc} (after {retries + 1} attempts)") from exc
                raise
            delay = min(backoff * 2**n, MAX_BACKOFF) * random.uniform(0.75, 1.25)
            emit(f"attempt {n + 1} failed: {exc}; again in {delay:.0f} s")
            await anyio.sleep(delay)
    raise AssertionError("unreachable")
