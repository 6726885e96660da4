"""A tree with /proc, /sys and /dev bound, for commands that must run inside it.

The mounts are owned by an async context manager: they are undone in reverse order on
success, failure and cancellation alike (cleanup shielded), so no mount outlives the job.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import anyio

from factory import proc, state
from factory.mounts import unmount

BINDS: tuple[tuple[str, Sequence[str]], ...] = (
    ("proc", ("-t", "proc", "proc")),
    ("sys", ("--bind", "/sys")),
    ("dev", ("--bind", "/dev")),
)

# A clean environment for commands in the tree: nothing of the build host's leaks in.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}


@contextlib.asynccontextmanager
async def bound(tree: Path) -> AsyncIterator[Path]:
    done: list[Path] = []
    try:
        for name, how in BINDS:
            target = tree / name
            target.mkdir(exist_ok=True)
            if (run := state.current()) is not None:
                run.add_mount(target)
            done.append(target)  # before: a cancel may land after mount(8) did its work
            await proc.run(["mount", *how, target])
        yield tree
    finally:
        with anyio.CancelScope(shield=True):
            for target in reversed(done):
                if await unmount(target) and (run := state.current()) is not None:
                    run.drop_mount(target)


async def run_in(
    tree: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
) -> proc.Completed:
    """Run a command inside the tree (call within `bound`)."""
    return await proc.run(
        [
            "env",
            "-i",
            *(f"{k}={v}" for k, v in {**CHROOT_ENV, **(env or {})}.items()),
            "chroot",
            tree,
            *argv,
        ],
        input=input,
    )
