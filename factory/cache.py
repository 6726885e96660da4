"""Content-addressed store of trees, keyed by the job key that built them.

An entry is committed by one rename of a finished folder, so a key either names a whole
tree or nothing; a per-key lock keeps two runs from building or pruning the same entry
at once; a run holds every entry it uses shared until it ends, so that another run's
--refresh or prune never deletes a tree under it; leftovers of killed runs are removed
when the store is opened.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from factory import proc, state

DEFAULT_CACHE = Path("/var/cache/factory")
LOCK_POLL = 0.5


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path  # the folder holding root/ and meta.json

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def log(self) -> Path:
        """The log of the job that built it: how this tree came to be."""
        return self.path / "build.log"

    def meta(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
            return data
        except (OSError, ValueError):
            return {}


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.trees = root / "trees"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        self._using: dict[str, int] = {}  # key -> fd holding its use lock shared

    async def open(self) -> Cache:
        """Create the folders and remove what killed runs left half-built."""
        for folder in (self.trees, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():
            pid = stale.name.rsplit(".", 1)[-1]
            if not pid.isdigit() or not state.pid_alive(int(pid)):
                await remove_tree(stale)
        return self

    def get(self, key: str) -> Entry | None:
        entry = Entry(key, self.trees / key)
        return entry if (entry.path / "meta.json").is_file() else None

    def entries(self) -> list[Entry]:
        return sorted(
            (Entry(p.name, p) for p in self.trees.iterdir() if p.is_dir()),
            key=lambda e: e.path.stat().st_mtime,
        )

    async def _flock(
        self, name: str, mode: int, message: str | None, waiting: Callable[[str], None] | None
    ) -> int | None:
        """An fd holding `mode` on locks/NAME; waits (cancellably) while another run holds
        a conflicting lock, saying so once, or returns None at once if `message` is None."""
        fd = os.open(self.locks / name, os.O_RDWR | os.O_CREAT, 0o644)
        said = False
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    return fd
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if message is None:
                    os.close(fd)
                    return None
                if not said:
                    said = True
                    proc.note(message)
                    if waiting is not None:
                        waiting(message)
                await anyio.sleep(LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise

    @contextlib.asynccontextmanager
    async def lock(
        self, key: str, waiting: Callable[[str], None] | None = None
    ) -> AsyncIterator[None]:
        """Hold the key's build lock: one run at a time looks up, builds or removes it."""
        message = f"waiting: another run is building tree {key[:12]}"
        fd = await self._flock(f"{key}.lock", fcntl.LOCK_EX, message, waiting)
        assert fd is not None
        try:
            yield
        finally:
            os.close(fd)

    async def use(self, key: str) -> None:
        """Hold the entry shared until release(), so that another run's --refresh or
        prune waits for (or skips) a tree this run still reads. Call with the build lock
        held: a remover holds it too, so this never waits."""
        if key not in self._using:
            message = f"waiting: another run is replacing tree {key[:12]}"
            fd = await self._flock(f"{key}.use", fcntl.LOCK_SH, message, None)
            assert fd is not None
            self._using[key] = fd

    def in_use(self, key: str) -> bool:
        """Whether a run (this one or another) holds the entry now."""
        if key in self._using:
            return True
        try:
            fd = os.open(self.locks / f"{key}.use", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let go of every entry this run used."""
        while self._using:
            os.close(self._using.popitem()[1])

    @contextlib.asynccontextmanager
    async def building(
        self, key: str, meta: dict[str, Any], waiting: Callable[[str], None] | None = None
    ) -> AsyncIterator[Path]:
        """A folder to build the entry's root in; committed by rename when the block ends
        without error, removed otherwise. Call with the key's lock held."""
        tmp = self.tmp / f"{key}.{os.getpid()}"
        if tmp.exists():
            await remove_tree(tmp)
        (tmp / "root").mkdir(parents=True)
        run = state.current()
        if run is not None:  # mmdebstrap mounts inside it; a killed run leaves them
            run.add_mount(tmp)
        try:
            yield tmp / "root"
            log = proc.current_log.get()
            if log is not None and log.path.is_file():
                shutil.copyfile(log.path, tmp / "build.log")
            (tmp / "meta.json").write_text(
                json.dumps({**meta, "created": time.time()}, sort_keys=True)
            )
            final = self.trees / key
            if final.exists():
                await self.remove(key, waiting)
            await proc.run(["sync", "-f", tmp])  # the data is on disk before its key is
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                with anyio.CancelScope(shield=True):
                    try:
                        await remove_tree(tmp)
                    except proc.CommandError as exc:  # left to the next run's open()
                        proc.note(f"could not remove {tmp} yet: {exc}")
            if run is not None and not tmp.exists():
                run.drop_mount(tmp)

    def touch(self, entry: Entry) -> None:
        """Mark an entry used now: prune removes the least recently used first."""
        os.utime(entry.path)

    async def remove(
        self, key: str, waiting: Callable[[str], None] | None = None, *, wait: bool = True
    ) -> bool:
        """Take the entry out of the key space at once (rename), then delete it; first
        wait until no other run uses it (or, with wait=False, keep it and return False).
        Call with the key's build lock held."""
        if key in self._using:  # this run's own use ends here
            os.close(self._using.pop(key))
        message = (
            f"waiting: another run is using tree {key[:12]}; it is replaced when that run ends"
            if wait
            else None
        )
        fd = await self._flock(f"{key}.use", fcntl.LOCK_EX, message, waiting)
        if fd is None:
            return False
        try:
            doomed = self.tmp / f"{key}.removing.{os.getpid()}"
            os.rename(self.trees / key, doomed)
            await remove_tree(doomed)
        finally:
            os.close(fd)
        return True


@contextlib.asynccontextmanager
async def opened(root: Path) -> AsyncIterator[Cache]:
    """The cache for one run: entries it used stay protected until the run ends."""
    cache = await Cache(root).open()
    try:
        yield cache
    finally:
        cache.release()


async def remove_tree(path: Path) -> None:
    """rm -rf of a tree, after unmounting what a killed tool left mounted in it; rm stays
    on one filesystem, so a mount that would not go is never followed into."""
    if path.is_dir() and not path.is_symlink():
        for point in state.mounts_under(str(path)):
            await proc.run(["umount", "--lazy", point], check=False)
        await proc.run(["rm", "-rf", "--one-file-system", "--", path])
    elif path.exists() or path.is_symlink():
        path.unlink()


__all__ = ["DEFAULT_CACHE", "Cache", "Entry", "opened", "remove_tree"]
