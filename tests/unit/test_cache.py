"""The tree cache between runs: a run's entries are safe from another run's --refresh and
prune until it ends. Two Cache objects on one folder are two runs: flock locks of two
open files conflict even inside one process."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from factory.cache import Cache, opened
from tests.conftest import factory

KEY = "ab" * 32


async def build(cache: Cache, text: str) -> None:
    async with cache.lock(KEY), cache.building(KEY, {"kind": "test"}) as root:
        (root / "file").write_text(text)
    await cache.use(KEY)


async def test_refresh_waits_for_the_run_that_reads_the_tree(tmp_path: Path) -> None:
    async with opened(tmp_path) as first:
        await build(first, "old")
        second = await Cache(tmp_path).open()
        said: list[str] = []
        replaced = anyio.Event()

        async def refresh() -> None:
            async with second.lock(KEY), second.building(KEY, {}, said.append) as root:
                (root / "file").write_text("new")
            replaced.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh)
            await anyio.sleep(1.5)
            # The first run still reads its tree, whole; the second said why it waits.
            assert (tmp_path / "trees" / KEY / "root/file").read_text() == "old"
            assert not replaced.is_set()
            assert said == [
                f"waiting: another run is using tree {KEY[:12]}; it is replaced when that run ends"
            ]
            first.release()
            with anyio.fail_after(10):
                await replaced.wait()
        assert (tmp_path / "trees" / KEY / "root/file").read_text() == "new"
        assert list((tmp_path / "tmp").iterdir()) == []


async def test_remove_without_waiting_keeps_a_used_tree(tmp_path: Path) -> None:
    async with opened(tmp_path) as first:
        await build(first, "x")
        second = await Cache(tmp_path).open()
        async with second.lock(KEY):
            assert await second.remove(KEY, wait=False) is False
        assert second.get(KEY) is not None
    # The first run is over: now it goes.
    async with second.lock(KEY):
        assert await second.remove(KEY, wait=False) is True
    assert second.get(KEY) is None


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
