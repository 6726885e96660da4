"""The tree side is bit-for-bit reproducible: the same matrix on the same archive state
gives the same tar, tgz, squashfs, aci and docker bytes and the same package manifest,
whether the trees come from the cache or are rebuilt (`--refresh`: mmdebstrap and
finalise again), in another OUT and with another TMPDIR."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import DATA, Build, run_matrix

FORMATS = ["tar", "tgz", "squashfs", "aci", "docker"]
EPOCH = 1_700_000_000


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def built(build: Build) -> Build:
    assert build.returncode == 0, build.stderr[-3000:]
    return build


def test_two_builds_give_the_same_tree_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    matrix = DATA / "repro-tree.toml"
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp-one"))
    (tmp_path / "tmp-one").mkdir()
    one = built(run_matrix(matrix, tmp_path / "one"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp-two"))
    (tmp_path / "tmp-two").mkdir()
    two = built(run_matrix(matrix, tmp_path / "two", "--refresh"))
    assert two.job("finalise:debian-bookworm-amd64").get("info", {}).get("cached") is not True
    differ = [f for f in FORMATS if digest(one.artifact(f)) != digest(two.artifact(f))]
    assert differ == []
    manifests = [
        (b.out / "debian-bookworm-amd64" / "debian-bookworm-amd64.manifest.json").read_bytes()
        for b in (one, two)
    ]
    assert manifests[0] == manifests[1]
    rows = json.loads(manifests[0])
    assert rows == sorted(rows, key=lambda r: (r["package"], r["arch"]))
    assert {"source", "source_version", "maintainer"} <= set(rows[0])
    with tarfile.open(one.artifact("tar")) as tf:
        names = tf.getnames()
        assert max(m.mtime for m in tf.getmembers()) <= EPOCH
    assert "./var/cache/ldconfig/aux-cache" not in names
    assert "./var/lib/systemd/random-seed" not in names
