"""Where a sparse file holds data, and what a controller accepts as such from a worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from factory.executors.protocol import extents_of
from factory.fsutil import data_extents

MiB = 1024 * 1024


def sparse(path: Path, size: int, writes: list[int]) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in writes:
            fh.seek(offset)
            fh.write(b"x" * 4096)
    return path


def test_data_extents_skip_holes_and_join_near_ones(tmp_path: Path) -> None:
    f = sparse(tmp_path / "f", 64 * MiB, [0, 4096 * 4, 32 * MiB])
    found = data_extents(f)
    assert len(found) == 2  # the first two are 12 KiB apart: joined
    assert found[0][0] == 0 and found[0][1] >= 5 * 4096
    assert found[1][0] <= 32 * MiB < found[1][0] + found[1][1]
    assert data_extents(f, merge_gap=0)[0][1] < 4 * 4096


def test_data_extents_of_all_holes_and_of_a_full_file(tmp_path: Path) -> None:
    assert data_extents(sparse(tmp_path / "h", 8 * MiB, [])) == []
    full = tmp_path / "full"
    full.write_bytes(os.urandom(100_000))
    assert data_extents(full) == [(0, 100_000)]


@pytest.mark.parametrize(
    "value",
    [None, "0,10", [[0, 10, 1]], [[-1, 5]], [[90, 20]], [[0, True]], [["0", 10]]],
)
def test_bad_extents_from_a_worker_mean_the_whole_file(value: object) -> None:
    assert extents_of(value, 100) == [(0, 100)]


def test_good_extents_are_taken() -> None:
    assert extents_of([[0, 10], [50, 50]], 100) == [(0, 10), (50, 50)]
    assert extents_of([], 100) == []
