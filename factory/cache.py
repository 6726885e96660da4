"""Content-addressed store of trees, keyed by the job key that built them.

    trees/KEY -> ../gens/KEY.GEN   what KEY names now: a symlink to one generation
    gens/KEY.GEN/                  one build of KEY: root/, meta.json, build.log
    locks/KEY.lock                 build lock: one run at a time looks KEY up, builds it
                                   or removes it
    locks/KEY.GEN.use              held shared by each run using that generation, until
                                   the run ends
    tmp/                           builds in progress and trees being deleted

A build is committed by renaming its folder into gens/ and swapping the symlink, so a key
names a whole tree or nothing. `--refresh` commits a new generation beside the one other
runs may still be reading; a generation no key names is deleted as soon as no run holds
it (then, or at a later open or prune). So no run waits for another to end and no run
sees its tree change. Leftovers of killed runs are removed when the store is opened.
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
from factory.mounts import unmount

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
        self.gens = root / "gens"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        self._using: dict[str, int] = {}  # key -> fd holding its generation's use lock

    async def open(self) -> Cache:
        """Create the folders, remove what killed runs left half-built, and delete the
        generations that no key names and no run uses."""
        for folder in (self.trees, self.gens, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():
            pid = stale.name.rsplit(".", 1)[-1]
            if not pid.isdigit() or not state.pid_alive(int(pid)):
                await remove_tree(stale)
        await self.collect()
        return self

    def _current(self, key: str) -> Path | None:
        """The generation KEY names, if whole. A plain folder at trees/KEY (a store
        written by hand or by an older factory) is its own generation."""
        link = self.trees / key
        try:  # another run may swap or remove the link meanwhile
            target = self.trees / os.readlink(link) if link.is_symlink() else link
        except OSError:
            return None
        return target if (target / "meta.json").is_file() else None

    def get(self, key: str) -> Entry | None:
        found = self._current(key)
        return Entry(key, found.resolve()) if found is not None else None

    def entries(self) -> list[Entry]:
        """Every entry, least recently used first (one that goes meanwhile, first of all)."""

        def used(entry: Entry) -> float:
            try:
                return entry.path.stat().st_mtime
            except OSError:
                return 0.0

        found = [self.get(p.name) for p in self.trees.iterdir() if not p.name.startswith(".")]
        return sorted((e for e in found if e), key=used)

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

    async def use(self, key: str) -> Entry:
        """The entry KEY names now, held until release(): its generation stays on disk
        as it is while this run reads it, whatever other runs refresh or prune. Call with
        the build lock held (generations are only deleted under it)."""
        entry = self.get(key)
        if entry is None:
            raise FileNotFoundError(f"no tree {key} in {self.root}")
        if key not in self._using:
            fd = await self._flock(f"{entry.path.name}.use", fcntl.LOCK_SH, None, None)
            assert fd is not None  # exclusive holders hold the build lock too
            self._using[key] = fd
        return entry

    def in_use(self, key: str) -> bool:
        """Whether a run holds the generation KEY names (read from /proc/locks, so that
        looking takes no lock another run could trip over)."""
        entry = self.get(key)
        if entry is None:
            return False
        try:
            st = os.stat(self.locks / f"{entry.path.name}.use")
            with open("/proc/locks", encoding="ascii") as fh:
                held = fh.read().split()
        except OSError:
            return False
        return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}" in held

    def release(self) -> None:
        """Let go of every entry this run used."""
        while self._using:
            os.close(self._using.popitem()[1])

    @contextlib.asynccontextmanager
    async def building(self, key: str, meta: dict[str, Any]) -> AsyncIterator[Path]:
        """A folder to build the entry's root in; committed as KEY's new generation when
        the block ends without error, removed otherwise. Call with the key's lock held."""
        tmp = self.tmp / f"{key}.{os.getpid()}"
        if tmp.exists():
            await remove_tree(tmp)
        (tmp / "root").mkdir(parents=True)
        run = state.current()
        if run is not None:  # mmdebstrap mounts inside it; a killed run leaves them
            run.add_mount(tmp)
        log = proc.current_log.get()
        # The job's log is appended to across runs into one OUT (a killed run, then its
        # rerun): the tree keeps only what was written while this build ran.
        start = _size(log.path) if log is not None else 0
        try:
            yield tmp / "root"
            await _unmount_under(tmp)
            if log is not None and log.path.is_file():
                _copy_from(log.path, start, tmp / "build.log")
            (tmp / "meta.json").write_text(
                json.dumps({**meta, "created": time.time()}, sort_keys=True)
            )
            await proc.run(["sync", "-f", tmp])  # the data is on disk before its key is
            await self._commit(key, tmp)
        finally:
            if tmp.exists():
                with anyio.CancelScope(shield=True):
                    try:
                        await remove_tree(tmp)
                    except proc.CommandError as exc:  # left to the next run's open()
                        proc.note(f"could not remove {tmp} yet: {exc}")
            if run is not None and not tmp.exists():
                run.drop_mount(tmp)

    async def _commit(self, key: str, folder: Path) -> None:
        gen = self.gens / f"{key}.{time.time_ns()}-{os.getpid()}"
        os.rename(folder, gen)
        link, new_link = self.trees / key, self.trees / f".{key}.{os.getpid()}"
        if link.is_dir() and not link.is_symlink():
            # A plain folder that open() could not adopt because a run was reading it by
            # its path: wait for that run to end (only with stores from before gens/).
            await self._drop(key, wait=True)
        new_link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(gen, self.trees), new_link)
        os.replace(new_link, link)  # readers see the old generation or the new one
        if key in self._using:  # this run's hold on the old generation ends here
            os.close(self._using.pop(key))
        await self._collect_key(key)

    def touch(self, entry: Entry) -> None:
        """Mark an entry used now: prune removes the least recently used first."""
        os.utime(entry.path)

    async def remove(self, key: str) -> bool:
        """Take KEY out of the store and delete its tree, unless a run is using it (then
        keep both and return False). Call with the key's build lock held."""
        return await self._drop(key, wait=False)

    async def _drop(self, key: str, *, wait: bool) -> bool:
        entry = self.get(key)
        if entry is None:
            return True
        if key in self._using:
            os.close(self._using.pop(key))
        message = f"waiting: another run is using tree {key[:12]}" if wait else None
        fd = await self._flock(f"{entry.path.name}.use", fcntl.LOCK_EX, message, None)
        if fd is None:
            return False
        try:
            link = self.trees / key
            if link.is_symlink():
                link.unlink()
            await self._delete(entry.path)
        finally:
            os.close(fd)
        return True

    async def _delete(self, generation: Path) -> None:
        """Out of sight at once (rename), then deleted, with its use lock file."""
        doomed = self.tmp / f"{generation.name}.removing.{os.getpid()}"
        os.rename(generation, doomed)
        (self.locks / f"{generation.name}.use").unlink(missing_ok=True)
        await remove_tree(doomed)

    async def _collect_key(self, key: str) -> None:
        """Delete KEY's generations that it no longer names and no run holds. Call with
        the key's build lock held."""
        current = self._current(key)
        for gen in self.gens.glob(f"{key}.*"):
            if current is not None and gen.resolve() == current.resolve():
                continue
            fd = await self._flock(f"{gen.name}.use", fcntl.LOCK_EX, None, None)
            if fd is not None:
                try:
                    await self._delete(gen)
                finally:
                    os.close(fd)

    async def collect(self) -> None:
        """For every key whose build lock is free now: a plain folder becomes a
        generation (if no run uses it), and unnamed, unused generations are deleted."""
        plain = {p.name for p in self.trees.iterdir() if p.is_dir() and not p.is_symlink()}
        named = {g.name.split(".", 1)[0] for g in self.gens.iterdir()}
        for key in sorted(plain | named):
            fd = await self._flock(f"{key}.lock", fcntl.LOCK_EX, None, None)
            if fd is None:
                continue
            try:
                if key in plain and self.get(key) is not None:
                    await self._adopt(key)
                await self._collect_key(key)
            finally:
                os.close(fd)

    async def _adopt(self, key: str) -> None:
        """Move a plain trees/KEY folder into gens/ behind a symlink, unless a run (of an
        older factory) is reading it by that path."""
        fd = await self._flock(f"{key}.use", fcntl.LOCK_EX, None, None)
        if fd is None:
            return
        try:
            gen = self.gens / f"{key}.{time.time_ns()}-{os.getpid()}"
            os.rename(self.trees / key, gen)
            os.symlink(os.path.relpath(gen, self.trees), self.trees / key)
            (self.locks / f"{key}.use").unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.asynccontextmanager
async def opened(root: Path) -> AsyncIterator[Cache]:
    """The cache for one run: entries it used stay protected until the run ends."""
    cache = await Cache(root).open()
    try:
        yield cache
    finally:
        cache.release()


async def _unmount_under(tree: Path) -> None:
    """Nothing mounted may go into the store: mmdebstrap only warns when it cannot unmount
    the tree's /proc ("W: umount /proc failed" when something held it busy)."""
    for point in state.mounts_under(str(tree)):
        proc.note(f"{point} was left mounted; unmounting it")
        await unmount(point)
    if state.mounts_under(str(tree)):
        raise OSError(f"{tree}: cannot unmount {', '.join(state.mounts_under(str(tree)))}")


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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _copy_from(source: Path, offset: int, dest: Path) -> None:
    """SOURCE's bytes from OFFSET on, into DEST."""
    with open(source, "rb") as src, open(dest, "wb") as out:
        src.seek(offset)
        shutil.copyfileobj(src, out)
