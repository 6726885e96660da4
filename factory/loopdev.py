"""Loop devices, their partitions and mounts, for the `--loop` way of filling a disk.

The default path needs none of these. Where it is used, each is owned by an async context
manager that undoes it on success, failure and cancellation (shielded), and each is in the
run's state file before it exists, so that `factory clean` can undo it after a SIGKILL.
Partitions come from `partx -a`: container kernels often do not scan partition tables
(`losetup -P` finds nothing), and entries partx added outlive `losetup -d` unless removed
with `partx -d` first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from factory import proc, state
from factory.mounts import unmount
from factory.results import StageError


async def _devices_on(backing: dict[str, int]) -> list[str]:
    listing = await proc.run(state.LOSETUP_LIST, capture=True, check=False)
    return state.loops_backed_by(listing.text, backing["dev"], backing["ino"])


@contextlib.asynccontextmanager
async def attached(image: Path) -> AsyncIterator[str]:
    """A loop device on `image`, detached at the end (its partitions removed first)."""
    st = os.stat(image)
    backing = {"dev": st.st_dev, "ino": st.st_ino}
    run = state.current()
    if run is not None:  # by inode: the device is only known once losetup answers
        run.add_loop(backing)
    try:
        result = await proc.run(["losetup", "--find", "--show", image], capture=True)
        device = result.text.strip()
        if not device.startswith("/dev/"):
            raise StageError(f"losetup gave no device for {image}: {device!r}")
        yield device
    finally:
        with anyio.CancelScope(shield=True):
            # Every device on this very file, not only the one losetup named: a cancel
            # may land after losetup attached and before it answered.
            for ours in await _devices_on(backing):
                await proc.run(["partx", "-d", ours], check=False)
                await proc.run(["losetup", "-d", ours], check=False)
            if run is not None and not await _devices_on(backing):
                run.drop_loop(backing)


@contextlib.asynccontextmanager
async def partitions(device: str, count: int) -> AsyncIterator[list[str]]:
    """The device's partitions 1..count as block devices, from its partition table."""
    try:
        # A device freed by `losetup -d` alone keeps its partition entries, and partx -a
        # then fails with "busy": clear whatever an earlier user left first.
        await proc.run(["partx", "-d", device], check=False)
        await proc.run(["partx", "-a", device])
        parts = [f"{device}p{n}" for n in range(1, count + 1)]
        missing = [p for p in parts if not os.path.exists(p)]
        if missing:
            raise StageError(f"partx -a {device} made no {', '.join(missing)}")
        yield parts
    finally:
        with anyio.CancelScope(shield=True):
            await proc.run(["partx", "-d", device], check=False)


@contextlib.asynccontextmanager
async def mount(device: str, point: Path) -> AsyncIterator[Path]:
    """`device` mounted at `point`, unmounted at the end (lazily if it is busy)."""
    point.mkdir(parents=True, exist_ok=True)
    run = state.current()
    if run is not None:
        run.add_mount(point)
    try:
        await proc.run(["mount", device, point])
        yield point
    finally:
        with anyio.CancelScope(shield=True):
            if await unmount(point) and run is not None:
                run.drop_mount(point)


__all__ = ["attached", "mount", "partitions"]
