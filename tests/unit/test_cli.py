"""The command line as a user meets it: exit codes, one-line errors, plan output, cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import ROOT, factory


def test_bad_matrix_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\narch = ["amd64"]\ndistros = ["debian/bookworm"]\nformats = ["raw"]\n'
    )
    for command in ("run", "plan"):
        result = factory(command, bad)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"{bad}:2: arch: unknown key 'arch' (did you mean 'arches'?)"
        ]
        assert result.stdout == ""


def test_missing_matrix(tmp_path: Path) -> None:
    result = factory("run", tmp_path / "nope.toml")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "no such file" in result.stderr


def test_plan_json_has_one_rootfs_per_cell() -> None:
    result = factory("plan", ROOT / "matrix/nightly.toml", "--json")
    assert result.returncode == 0, result.stderr
    jobs = json.loads(result.stdout)["jobs"]
    cells = {j["cell"] for j in jobs}
    rootfs = [j["cell"] for j in jobs if j["kind"] == "rootfs"]
    assert sorted(rootfs) == sorted(cells) and len(cells) == 4
    assert set(jobs[0]) == {"id", "kind", "cell", "deps", "key"}


def test_plan_is_readable() -> None:
    result = factory("plan", ROOT / "matrix/default.toml")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan default: ")
    assert any("← rootfs" in line for line in lines)


def test_only_that_matches_nothing_is_bad_input(tmp_path: Path) -> None:
    result = factory(
        "run", ROOT / "matrix/default.toml", "--only", "nothing-*", "--out", tmp_path / "out"
    )
    assert result.returncode == 2
    assert "--only: nothing-* matches no cell or job" in result.stderr
    assert not (tmp_path / "out").exists()


def test_boot_needs_an_image(tmp_path: Path) -> None:
    result = factory("boot", tmp_path / "nope.raw")
    assert result.returncode == 2 and "not a file" in result.stderr


def test_boot_without_arch_of_an_image_that_does_not_say_is_one_line(tmp_path: Path) -> None:
    """Before any QEMU starts (it used to boot such a disk as amd64 until the timeout)."""
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(1024 * 1024))
    result = factory("boot", blank)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"boot: {blank}: no partition table (give --arch)"
    ]


def test_cache_ls_and_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for key, age in (("a" * 64, 30), ("b" * 64, 0)):
        entry = cache / "trees" / key
        (entry / "root").mkdir(parents=True)
        (entry / "meta.json").write_text(json.dumps({"kind": "rootfs", "cell": "c", "bytes": 0}))
        then = time.time() - age * 86400
        os.utime(entry, (then, then))
    listing = factory("cache", "ls", "--cache", cache)
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["a" * 16, "b" * 16]
    pruned = factory("cache", "prune", "--cache", cache, "--older-than", "7")
    assert pruned.stdout.strip() == "removed 1 trees"
    assert sorted(p.name for p in (cache / "trees").iterdir()) == ["b" * 64]
    assert factory("cache", "prune", "--cache", cache, "--all").stdout.strip() == "removed 1 trees"
    assert list((cache / "trees").iterdir()) == []
