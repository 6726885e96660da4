"""The tree cache between runs: --refresh and prune never pull a tree from under a run
that reads it, and no run waits for another to end. Two Cache objects on one folder are
two runs: flock locks of two open files conflict even inside one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from factory import proc, state
from factory.cache import Cache, Entry, opened
from tests.conftest import factory

KEY = "ab" * 32
OTHER = "cd" * 32


async def build(cache: Cache, text: str, key: str = KEY) -> Entry:
    """What rootfs and finalise do: build (or rebuild) under the lock, then use."""
    async with cache.lock(key):
        async with cache.building(key, {"kind": "test"}) as root:
            (root / "file").write_text(text)
        return await cache.use(key)


def generations(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "gens").iterdir())


async def test_refresh_replaces_a_tree_another_run_reads_without_waiting(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path) as first:
        old = await build(first, "old")
        async with opened(tmp_path) as second:
            with anyio.fail_after(10):
                new = await build(second, "new")
            # The key names the new tree; the first run still reads its own, whole.
            assert (tmp_path / "trees" / KEY / "root/file").read_text() == "new"
            assert (old.root / "file").read_text() == "old"
            assert new.path != old.path and len(generations(tmp_path)) == 2
    # Both runs are over: the next one to open the store deletes the old generation.
    await Cache(tmp_path).open()
    assert generations(tmp_path) == [new.path.name]
    assert not old.path.exists() and list((tmp_path / "tmp").iterdir()) == []


async def test_two_refreshing_runs_crossing_over_do_not_deadlock(tmp_path: Path) -> None:
    """Run A uses X and refreshes Y while run B uses Y and refreshes X."""
    async with opened(tmp_path) as a, opened(tmp_path) as b:
        await build(a, "x1", KEY)
        await build(b, "y1", OTHER)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(build, a, "y2", OTHER)
                tg.start_soon(build, b, "x2", KEY)
    assert (tmp_path / "trees" / KEY / "root/file").read_text() == "x2"
    assert (tmp_path / "trees" / OTHER / "root/file").read_text() == "y2"


async def test_remove_keeps_a_used_tree(tmp_path: Path) -> None:
    async with opened(tmp_path) as first:
        await build(first, "x")
        second = await Cache(tmp_path).open()
        async with second.lock(KEY):
            assert await second.remove(KEY) is False
        assert second.get(KEY) is not None and second.in_use(KEY)
    async with second.lock(KEY):
        assert not second.in_use(KEY)
        assert await second.remove(KEY) is True
    assert second.get(KEY) is None and generations(tmp_path) == []


async def test_a_plain_folder_from_an_older_store_is_adopted(tmp_path: Path) -> None:
    plain = tmp_path / "trees" / KEY
    (plain / "root").mkdir(parents=True)
    (plain / "root/file").write_text("kept")
    (plain / "meta.json").write_text(json.dumps({"kind": "rootfs"}))
    cache = await Cache(tmp_path).open()
    assert plain.is_symlink()
    entry = cache.get(KEY)
    assert entry is not None and (entry.root / "file").read_text() == "kept"
    async with opened(tmp_path) as run:
        await build(run, "rebuilt")
    assert (plain / "root/file").read_text() == "rebuilt"


@pytest.mark.parametrize("in_use", [True, False])
async def test_prune_all_skips_trees_in_use(tmp_path: Path, in_use: bool) -> None:
    async with opened(tmp_path) as run:
        await build(run, "x")
        if not in_use:
            run.release()
        listing = await anyio.to_thread.run_sync(
            lambda: factory("cache", "ls", "--cache", tmp_path, timeout=60).stdout
        )
        proc = await anyio.to_thread.run_sync(
            lambda: factory("cache", "prune", "--all", "--cache", tmp_path, timeout=60)
        )
    assert proc.returncode == 0, proc.stderr
    assert listing.rstrip().endswith("in use") is in_use, listing
    if in_use:
        assert f"kept {KEY[:12]}: a running build is using it" in proc.stdout
        assert "removed 0 trees" in proc.stdout
        assert (tmp_path / "trees" / KEY / "root/file").exists()
    else:
        assert "removed 1 trees" in proc.stdout
        assert not (tmp_path / "trees" / KEY).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
async def test_nothing_mounted_goes_into_the_store(tmp_path: Path) -> None:
    cache = await Cache(tmp_path).open()
    async with cache.lock(KEY), cache.building(KEY, {}) as root:
        (root / "proc").mkdir()
        await proc.run(["mount", "-t", "tmpfs", "left", root / "proc"])
    assert state.mounts_under(str(tmp_path)) == []
    entry = cache.get(KEY)
    assert entry is not None and (entry.root / "proc").is_dir()


async def test_a_tree_keeps_only_its_own_builds_log(tmp_path: Path) -> None:
    """A job's log in OUT is appended to by a rerun into that OUT (after a killed run):
    the tree's build.log is what was written while this build ran, not the attempt
    before it too."""
    log = tmp_path / "out" / "logs" / "finalise.log"
    log.parent.mkdir(parents=True)
    log.write_text("$ the killed run's command\n")
    cache = await Cache(tmp_path / "cache").open()
    with proc.logging_to(log):
        proc.note("before the build")
        await build(cache, "tree")
        proc.note("after the build")
    entry = cache.get(KEY)
    assert entry is not None
    assert entry.log.read_text() == ""
    with proc.logging_to(log):
        async with cache.lock(KEY), cache.building(KEY, {}) as root:
            proc.note("inside")
            await proc.run(["touch", root / "file"])
    entry = cache.get(KEY)
    assert entry is not None
    text = entry.log.read_text()
    assert text.startswith("# inside\n$ touch ") and "killed run" not in text
