"""`factory merge`: two small synthetic shards into one OUT, and every refusal (one line
naming the shard and the file, exit 2, nothing in --out)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from factory import __version__, cli
from factory.merge import changes_md
from tests.conftest import have
from tests.unit.test_sign import gpg, make_key, new_home, stop_agent

DIGEST = "ab" * 32


def make_shard(
    root: Path,
    cell: str,
    *,
    failed: bool = False,
    digest: str = DIGEST,
    version: str = __version__,
    sign: str | None = None,
) -> Path:
    """A shard as `factory run --only CELL` leaves it: an artifact with its .sha256, a
    manifest, an SBOM, logs, report.json, SHA256SUMS and CHANGES.md."""
    shard = root / cell
    (shard / cell).mkdir(parents=True)
    (shard / "logs").mkdir()
    jobs: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    for kind in ("rootfs", "publish"):
        jid = f"{kind}:{cell}"
        status = "failed" if failed and kind == "publish" else "done"
        (shard / "logs" / f"{jid.replace(':', '_')}.log").write_text(f"{jid} log\n")
        jobs.append(
            {
                "id": jid,
                "kind": kind,
                "cell": cell,
                "status": status,
                "host": None,
                "error": "pack: no space left" if status == "failed" else None,
                "log": f"logs/{jid.replace(':', '_')}.log",
            }
        )
    (shard / cell / f"{cell}.spdx.json").write_text('{"spdxVersion": "SPDX-2.3"}\n')
    (shard / cell / f"{cell}.manifest.json").write_text("[]\n")
    if not failed:
        data = f"the {cell} image\n".encode() * 1000
        rel = f"{cell}/{cell}.tar"
        (shard / rel).write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        (shard / f"{rel}.sha256").write_text(f"{sha}  {cell}.tar\n")
        artifacts.append({"path": rel, "sha256": sha, "cell": cell, "format": "tar"})
    changes = (
        {"added": [{"package": "new", "version": "1"}], "removed": [], "changed": []}
        if cell.endswith("amd64")
        else None
    )
    report = {
        "matrix": "two",
        "factory_version": version,
        "matrix_sha256": digest,
        "host": f"runner-{cell}",
        "sign": sign,
        "status": "failed" if failed else "built",
        "started": 100.0,
        "finished": 200.0 if failed else 300.0,
        "cells": {cell: {"arch": cell.rsplit("-", 1)[1], "changes": changes}},
        "jobs": jobs,
        "artifacts": artifacts,
    }
    (shard / "report.json").write_text(json.dumps(report))
    (shard / "SHA256SUMS").write_text("".join(f"{a['sha256']}  {a['path']}\n" for a in artifacts))
    (shard / "CHANGES.md").write_text(f"# two\n\n## {cell}\n")
    (shard / "report.html").write_text(f"<p>{cell} alone</p>\n")
    return shard


def merge(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["merge", *map(str, args)], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, Path]:
    return (
        make_shard(tmp_path / "a", "debian-bookworm-amd64"),
        make_shard(tmp_path / "b", "debian-bookworm-ppc64el"),
    )


def test_two_shards_make_one_out(shards: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code, err = merge(*shards, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert list(report["cells"]) == ["debian-bookworm-amd64", "debian-bookworm-ppc64el"]
    assert report["status"] == "built" and report["matrix_sha256"] == DIGEST
    assert report["factory_version"] == __version__
    assert (report["started"], report["finished"]) == (100.0, 300.0)
    page = (out / "report.html").read_text()  # the merged run's page, not a shard's
    assert "alone" not in page and all(f">{c}<" in page for c in report["cells"]), page
    # Each job names the machine it ran on, from its shard's report.
    assert {j["id"]: j["host"] for j in report["jobs"]} == {
        "rootfs:debian-bookworm-amd64": "runner-debian-bookworm-amd64",
        "publish:debian-bookworm-amd64": "runner-debian-bookworm-amd64",
        "rootfs:debian-bookworm-ppc64el": "runner-debian-bookworm-ppc64el",
        "publish:debian-bookworm-ppc64el": "runner-debian-bookworm-ppc64el",
    }
    assert [a["path"] for a in report["artifacts"]] == [
        "debian-bookworm-amd64/debian-bookworm-amd64.tar",
        "debian-bookworm-ppc64el/debian-bookworm-ppc64el.tar",
    ]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True)
    assert check.returncode == 0 and check.stdout.count(b": OK") == 2, check
    for shard in shards:
        cell = shard.name
        for rel in (f"{cell}/{cell}.spdx.json", f"{cell}/{cell}.tar.sha256", "logs"):
            assert (out / rel).exists(), rel
        for job in report["jobs"]:
            assert (out / job["log"]).read_text() == f"{job['id']} log\n"
        # Same filesystem: hard links, not copies.
        tar = f"{cell}/{cell}.tar"
        assert (out / tar).stat().st_ino == (shard / tar).stat().st_ino
    text = (out / "CHANGES.md").read_text()
    assert text == changes_md(report)
    assert "## debian-bookworm-amd64\n\n- added new 1" in text
    assert "## debian-bookworm-ppc64el\n\n- first build" in text
    assert "2 cells: 1 changed, 0 unchanged, 1 first build." in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_failed_shard_is_merged_and_its_failure_kept(tmp_path: Path) -> None:
    good = make_shard(tmp_path / "a", "debian-bookworm-amd64")
    bad = make_shard(tmp_path / "b", "debian-bookworm-ppc64el", failed=True)
    out = tmp_path / "merged"
    code, err = merge(good, bad, "--out", out)
    assert code == 1, err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed"
    failed = [j for j in report["jobs"] if j["status"] == "failed"]
    assert [(j["id"], j["error"]) for j in failed] == [
        ("publish:debian-bookworm-ppc64el", "pack: no space left")
    ]
    assert report["shards"][1]["status"] == "failed"
    assert (out / "SHA256SUMS").read_text().count("\n") == 1
    assert (out / "logs" / "publish_debian-bookworm-ppc64el.log").is_file()


def refused(err: str, code: int, out: Path) -> str:
    assert code == 2, err
    (line,) = err.splitlines()
    assert not out.exists(), "a refused merge wrote --out"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []
    return line


def test_one_corrupted_byte_is_refused_naming_shard_and_file(
    shards: tuple[Path, Path], tmp_path: Path
) -> None:
    tar = shards[1] / "debian-bookworm-ppc64el" / "debian-bookworm-ppc64el.tar"
    data = bytearray(tar.read_bytes())
    data[1234] ^= 0x01
    tar.write_bytes(bytes(data))
    out = tmp_path / "merged"
    line = refused(*reversed(merge(*shards, "--out", out)), out)
    assert line.startswith(f"{shards[1]}: debian-bookworm-ppc64el/debian-bookworm-ppc64el.tar: ")
    assert "sha256" in line and "SHA256SUMS" in line


def test_a_missing_file_is_refused(shards: tuple[Path, Path], tmp_path: Path) -> None:
    (shards[0] / "debian-bookworm-amd64" / "debian-bookworm-amd64.tar").unlink()
    out = tmp_path / "merged"
    line = refused(*reversed(merge(*shards, "--out", out)), out)
    assert line == (
        f"{shards[0]}: debian-bookworm-amd64/debian-bookworm-amd64.tar: missing "
        "(SHA256SUMS lists it)"
    )


def test_another_matrix_digest_or_version_is_refused(tmp_path: Path) -> None:
    a = make_shard(tmp_path / "a", "debian-bookworm-amd64")
    b = make_shard(tmp_path / "b", "debian-bookworm-ppc64el", digest="cd" * 32)
    c = make_shard(tmp_path / "c", "debian-bookworm-arm64", version="0.0.9")
    out = tmp_path / "merged"
    line = refused(*reversed(merge(a, b, "--out", out)), out)
    assert line.startswith(f"{b}: report.json: matrix sha256 cdcdcdcd")
    assert f"is not {a}'s abababab" in line
    line = refused(*reversed(merge(a, c, "--out", out)), out)
    assert line.startswith(f"{c}: report.json: factory version 0.0.9 is not {a}'s {__version__}")


def test_a_cell_two_shards_built_is_refused(tmp_path: Path) -> None:
    a = make_shard(tmp_path / "a", "debian-bookworm-amd64")
    b = make_shard(tmp_path / "b", "debian-bookworm-amd64")
    out = tmp_path / "merged"
    line = refused(*reversed(merge(a, b, "--out", out)), out)
    assert line == (
        f"{b}: report.json: cell debian-bookworm-amd64 was built by {a} too (one shard a cell)"
    )


def test_not_a_shard_and_a_full_out_are_refused(shards: tuple[Path, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "merged"
    line = refused(*reversed(merge(shards[0], empty, "--out", out)), out)
    assert line == f"{empty}: report.json: missing (not a factory output folder)"
    out.mkdir()
    (out / "keep").write_text("mine\n")
    code, err = merge(*shards, "--out", out)
    assert code == 2 and "not empty" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_sign_key_missing_here_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    a = make_shard(tmp_path / "a", "debian-bookworm-amd64", sign="nobody@example.invalid")
    out = tmp_path / "merged"
    code, err = merge(a, "--out", out, env={"GNUPGHOME": str(home)})
    line = refused(err, code, out)
    assert "nobody@example.invalid is not a secret key in" in line and "gpg --import" in line


@pytest.mark.skipif(not have("gpg", "gpgconf"), reason="needs gpg")
def test_merged_sums_are_signed_as_a_run_signs_them(tmp_path: Path) -> None:
    home = new_home(tmp_path / "gnupg")
    try:
        key = make_key(home)
        a = make_shard(tmp_path / "a", "debian-bookworm-amd64", sign=key)
        b = make_shard(tmp_path / "b", "debian-bookworm-ppc64el", sign=key)
        (a / "SHA256SUMS.sign").write_text("the shard's own signature, not carried\n")
        out = tmp_path / "merged"
        code, err = merge(a, b, "--out", out, env={"GNUPGHOME": str(home)})
        assert code == 0, err
        verify = gpg(home, "--verify", str(out / "SHA256SUMS.sign"), str(out / "SHA256SUMS"))
        assert verify.returncode == 0
        assert (out / "SHA256SUMS").read_text().count("\n") == 2
    finally:
        stop_agent(home)


def test_with_the_matrix_a_cell_without_shard_fails_the_merge(
    shards: tuple[Path, Path], tmp_path: Path
) -> None:
    matrix = tmp_path / "two.toml"
    matrix.write_text(
        'name = "two"\narches = ["amd64", "arm64", "ppc64el"]\n'
        'distros = ["debian/bookworm"]\nformats = ["tar"]\n'
    )
    digest = hashlib.sha256(matrix.read_bytes()).hexdigest()
    out = tmp_path / "merged"
    # The synthetic shards say another digest: refused, naming the shard and the matrix.
    line = refused(*reversed(merge(*shards, "--matrix", matrix, "--out", out)), out)
    assert line.startswith(f"{shards[0]}: report.json: matrix sha256 abababab")
    assert f"is not {matrix}'s {digest[:16]}" in line
    a = make_shard(tmp_path / "c", "debian-bookworm-amd64", digest=digest)
    b = make_shard(tmp_path / "d", "debian-bookworm-ppc64el", digest=digest)
    code, err = merge(a, b, "--matrix", matrix, "--out", out)
    assert code == 1
    assert (
        err.splitlines()[0] == f"merge: debian-bookworm-arm64: no shard holds this cell of {matrix}"
    )
    report = json.loads((out / "report.json").read_text())
    assert report["missing"] == ["debian-bookworm-arm64"] and report["status"] == "failed"
    assert sorted(report["cells"]) == ["debian-bookworm-amd64", "debian-bookworm-ppc64el"]
