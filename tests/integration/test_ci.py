"""The pipeline `factory ci gitlab` prints, run for real by gitlab-ci-local on its shell
executor: two cells built as separate jobs in separate folders, their outputs handed on
as artifacts, then the merge job. And `factory merge` refusing a real shard with one
corrupted byte.

The two cells share their trees with other modules (a warm cache rebuilds nothing): the
amd64 tree of layouts.toml (its layouts choose the tree's boot packages; security off)
and the ppc64el tree of ppc64el.toml. No [image] boot_test: no disk is made or booted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FACTORY, factory, have
from tests.integration.conftest import CACHE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have("gitlab-ci-local", "rsync", "git"), reason="gitlab-ci-local"),
]

MATRIX = """\
# Two cells of trees other tests build: amd64 as layouts.toml, ppc64el as ppc64el.toml.
name = "itest-ci"
arches = ["amd64", "ppc64el"]
distros = ["debian/bookworm"]
formats = ["tar"]

[image]
layout = ["mbr", "gpt-efi", "ppc-prep"]

[mirrors]
debian = "host"
security = false
"""
CELLS = ("debian-bookworm-amd64", "debian-bookworm-ppc64el")
GCL = ".gitlab-ci-local"


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=factory", "-c", "user.email=factory@example.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@dataclass
class Pipeline:
    repo: Path
    result: subprocess.CompletedProcess[str]

    def artifacts(self, job: str) -> Path:
        return self.repo / GCL / "artifacts" / job


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """A git repository holding the matrix and the emitted pipeline, run once: each job
    in its own folder (--shell-isolation), so a shard reaches the merge only as an
    artifact. gitlab-ci-local's own folder is in the repository and removed after."""
    repo = tmp_path_factory.mktemp("ci-repo")
    (repo / "ci.toml").write_text(MATRIX)
    venv_bin = Path(sys.executable).parent
    emitted = subprocess.run(  # from the repository's root, as a user makes it
        [
            *FACTORY,
            "ci",
            "gitlab",
            "ci.toml",
            "--setup",
            f"export PATH={venv_bin}:$PATH",
            f"--run-arg=--cache={CACHE}",
            "--run-arg=--events=plain",
            "--output",
            ".gitlab-ci.yml",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert emitted.returncode == 0, emitted.stderr
    git(repo, "init", "-q", ".")
    git(repo, "add", "ci.toml", ".gitlab-ci.yml")
    git(repo, "commit", "-q", "-m", "the matrix and its pipeline")
    home = repo / "gcl-home"
    home.mkdir()
    try:
        result = subprocess.run(
            [
                "gitlab-ci-local",
                "--shell-executor-no-image",
                "--shell-isolation",
                "--no-color",
                "--home",
                str(home),
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=1500,
            env={**os.environ, "HOME": str(home)},
        )
        yield Pipeline(repo, result)
    finally:
        shutil.rmtree(repo / GCL, ignore_errors=True)
        shutil.rmtree(repo / "merged", ignore_errors=True)
        shutil.rmtree(repo / "shards", ignore_errors=True)
    assert not (repo / GCL).exists()


@pytest.mark.timeout(1800)
def test_gitlab_pipeline_runs_shards_apart_then_merges(pipeline: Pipeline) -> None:
    r = pipeline.result
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for job in (*CELLS, "merge"):
        assert f"PASS  {job}" in r.stdout, r.stdout[-4000:]
    # Each cell job's artifact holds its own shard and nothing of the other cell's.
    for cell in CELLS:
        shards = pipeline.artifacts(cell) / "shards"
        assert sorted(p.name for p in shards.iterdir()) == [cell]
        report = json.loads((shards / cell / "report.json").read_text())
        assert list(report["cells"]) == [cell] and report["status"] == "built"
    merged = pipeline.artifacts("merge") / "merged"
    check = subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=merged, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(check.stdout.splitlines()) == [f"{c}/{c}.tar: OK" for c in CELLS]
    report = json.loads((merged / "report.json").read_text())
    assert sorted(report["cells"]) == list(CELLS)
    assert report["status"] == "built"
    assert (
        report["matrix_sha256"]
        == json.loads(
            (pipeline.artifacts(CELLS[0]) / "shards" / CELLS[0] / "report.json").read_text()
        )["matrix_sha256"]
    )
    assert {j["cell"] for j in report["jobs"] if j["status"] == "done"} == set(CELLS)
    assert all(j["host"] for j in report["jobs"])
    for cell in CELLS:
        assert (merged / cell / f"{cell}.spdx.json").is_file()
    changes = (merged / "CHANGES.md").read_text()
    assert all(f"## {c}" in changes for c in CELLS)


def test_merge_refuses_a_real_shard_with_one_corrupted_byte(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    assert pipeline.result.returncode == 0
    shards = [pipeline.artifacts(c) / "shards" / c for c in CELLS]
    tar = shards[1] / CELLS[1] / f"{CELLS[1]}.tar"
    # A new inode with one bit flipped: the file the merged OUT may link stays intact.
    bad = tar.with_name("corrupt.tmp")
    shutil.copyfile(tar, bad)
    with open(bad, "r+b") as fh:
        fh.seek(4096 * 7 + 5)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.replace(bad, tar)
    out = tmp_path / "merged"
    result = factory("merge", *shards, "--out", out)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{shards[1]}: {CELLS[1]}/{CELLS[1]}.tar: sha256 "), line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
