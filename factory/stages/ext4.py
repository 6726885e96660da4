"""ext4 made straight into a byte range of a disk image file: mkfs.ext4 -d, then the
inode times the tree cannot give the same on every build set by debugfs. assemble uses it
for the layouts' root, partitions.py for each ext4 of a user's partitions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import anyio

from factory import layouts, proc, repro, sizing


def partition(disk: Path, offset: int) -> str:
    """e2fsprogs open a filesystem inside an image file with this name."""
    return f"{disk}?offset={offset}"


def mkfs_args(
    tree: Path | None,
    disk: Path | str,
    uuid: str,
    offset: int | None,
    size: int,
    hash_seed: str | None = None,
    label: str = "root",
    journal: int = sizing.JOURNAL,
) -> list[str]:
    """mkfs.ext4 into a byte range of `disk` (offset None: a device of its own), filled
    from `tree` (None: left empty). mke2fs keeps only its last -E, so every extended
    option goes into one."""
    # The journal is written out as zeros (mkfs's default, not lazy_journal_init): a
    # flashing tool that skips holes must not leave old data where a journal replay
    # would read it.
    extended = [f"offset={offset}"] if offset is not None else []
    if hash_seed is not None:
        extended.append(f"hash_seed={hash_seed}")
    fill = ["-d", str(tree)] if tree is not None else []
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-U",
        uuid,
        "-L",
        label,
        "-i",
        str(sizing.BYTES_PER_INODE),
        "-J",
        f"size={journal // layouts.MiB}",
        *(["-E", ",".join(extended)] if extended else []),
        *fill,
        str(disk),
        f"{size // 1024}k",
    ]


def _debugfs_quote(path: str) -> str:
    """A path as one debugfs argument: in double quotes, a quote doubled."""
    return '"' + path.replace('"', '""') + '"'


def _tree_paths(tree: Path) -> Iterator[str]:
    """Every path under `tree` as the filesystem names it ("/usr/bin"), sorted."""
    for top, dirs, files in os.walk(tree):
        dirs.sort()
        rel = "/" + os.path.relpath(top, tree) if top != str(tree) else ""
        for name in sorted([*dirs, *files]):
            yield f"{rel}/{name}"


def clamp_script(paths: Iterable[str], epoch: int) -> tuple[str, list[str]]:
    """A debugfs script that sets atime and ctime of each path to `epoch`, and the paths
    it cannot name (a newline in them): `mkfs.ext4 -d` copies both from the source tree,
    where the ctime is when the tree was made and the atime when it was last read."""
    lines, skipped = [], []
    for path in paths:
        if "\n" in path:
            skipped.append(path)
            continue
        quoted = _debugfs_quote(path)
        lines.append(f"sif {quoted} atime {epoch}\nsif {quoted} ctime {epoch}\n")
    return "".join(lines), skipped


async def clamp_times(fs: str, tree: Path, epoch: int, work: Path) -> None:
    """The inode times the tree cannot give the same on every build, set to the epoch.
    mtimes are the tree's own, and mkfs's own inodes (/, lost+found) already carry the
    epoch from E2FSPROGS_FAKE_TIME."""
    # A walk of the whole tree: in a worker thread, off the event loop.
    script, skipped = await anyio.to_thread.run_sync(lambda: clamp_script(_tree_paths(tree), epoch))
    for path in skipped:
        proc.note(f"times of {path!r} not clamped: debugfs cannot name it")
    cmds = work / "clamp-times.debugfs"
    cmds.write_bytes(script.encode(errors="surrogateescape"))  # names need not be UTF-8
    try:
        # stdout echoes every command: kept out of the log.
        await proc.run(
            ["debugfs", "-w", "-f", cmds, fs], capture=True, env=repro.source_date_env(epoch)
        )
    finally:
        cmds.unlink(missing_ok=True)


def hash_seed(key: str) -> str:
    """ext4's directory hash seed, random unless given."""
    return str(repro.seeded_uuid(key, "ext4-hash-seed"))
