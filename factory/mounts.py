"""Whether a path is mounted, and one way to unmount it: every owner of a mount (the
chroot binds, the --loop mount, the cache's check for leftovers) undoes it alike."""

from __future__ import annotations

import os
from pathlib import Path

from factory import proc


def mounted(path: Path | str) -> bool:
    """By /proc/self/mountinfo, which also sees bind mounts of the same filesystem."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split()[4] == target for line in fh)


async def unmount(point: Path | str) -> bool:
    """umount, or lazily if it is busy (it goes when its last user does); True when
    nothing is mounted there any more."""
    if mounted(point):
        result = await proc.run(["umount", point], check=False)
        if result.returncode != 0 and mounted(point):
            await proc.run(["umount", "--lazy", point], check=False)
    return not mounted(point)


__all__ = ["mounted", "unmount"]
