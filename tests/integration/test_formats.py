"""The formats beyond what test_amd64 reads back: the run's checksums as `sha256sum -c`
sees them, the docker archive's digests as `docker load` checks them, the ACI's layout,
fixed VHD and default (zlib) qcow2, and the squashfs ACL warning on a tiny tree.

Most tests read the session's `amd64` build; one small extra build (warm cache: assemble
and two conversions) makes the disk formats whose settings that build does not use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import IO

import anyio
import pytest

from factory import proc
from factory.cache import Cache
from factory.plan import Job
from factory.results import Output
from factory.stages import Context, Workspace, pack
from tests.integration.conftest import DATA, Build, run_matrix

# A session build (trees cold: minutes) counts against the first test that uses it.
pytestmark = pytest.mark.timeout(1800)


CELL = "debian-bookworm-amd64"
AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")


def sh(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    return subprocess.run(
        list(map(str, args)), capture_output=True, text=True, check=True, cwd=cwd
    ).stdout


def sha256_stream(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := fh.read(1 << 22):
        h.update(chunk)
    return h.hexdigest()


def test_sha256sum_verifies_the_run(amd64: Build) -> None:
    """Every artifact, checked by coreutils itself: from OUT, and beside each file."""
    out = sh("sha256sum", "-c", "--strict", "SHA256SUMS", cwd=amd64.out)
    assert out.count(": OK") == 10
    for artifact in amd64.report["artifacts"]:
        path = amd64.out / artifact["path"]
        sh("sha256sum", "-c", "--strict", f"{path.name}.sha256", cwd=path.parent)
        assert path.stat().st_size == artifact["size"]


def test_out_holds_only_whole_artifacts(amd64: Build) -> None:
    """Nothing half-written under any name: no hidden temporaries, no work folder, and
    every file in the cell folder is an artifact, its checksum, the manifest or the SBOM."""
    names = {p.name for p in (amd64.out / CELL).iterdir()}
    artifacts = {Path(a["path"]).name for a in amd64.report["artifacts"]}
    expected = artifacts | {f"{a}.sha256" for a in artifacts}
    expected |= {f"{CELL}.manifest.json", f"{CELL}.spdx.json"}
    assert names == expected
    assert not [p for p in amd64.out.rglob(".tmp-*")]
    assert not (amd64.out / ".work").exists()


def test_docker_archive_digests_as_docker_load_checks_them(amd64: Build) -> None:
    with tarfile.open(amd64.artifact("docker")) as archive:
        names = archive.getnames()
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        (image,) = manifest
        assert sorted(names) == sorted(["manifest.json", image["Config"], *image["Layers"]])
        assert image["RepoTags"] == ["itest/debian:bookworm-amd64"]
        config_bytes = archive.extractfile(image["Config"]).read()  # type: ignore[union-attr]
        # The config is named by the sha256 of its bytes: docker's image id.
        assert image["Config"] == f"{hashlib.sha256(config_bytes).hexdigest()}.json"
        config = json.loads(config_bytes)
        assert config["os"] == "linux" and config["architecture"] == "amd64"
        (layer_name,) = image["Layers"]
        layer = archive.extractfile(layer_name)
        assert layer is not None
        digest = sha256_stream(layer)
        # docker load recomputes each layer's sha256 and refuses a diff_id that differs.
        assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{digest}"]}
        assert layer_name == f"{digest}/layer.tar"
        with tarfile.open(fileobj=archive.extractfile(layer_name)) as inner:
            entries = inner.getnames()
    assert len(entries) > 10000
    assert len(entries) == len(set(entries)), "duplicate entries"
    odd = [
        n
        for n in entries
        if n.startswith(("./", "/"))
        or n in (".", "")
        or ".." in n.split("/")
        or n.rsplit("/", 1)[-1].startswith(".wh.")  # would be read as a whiteout
    ]
    assert odd == []
    assert {"etc/fstab", "usr/bin/bash", "etc/factory-test/owned"} <= set(entries)


def test_aci_layout_per_appc_spec(amd64: Build) -> None:
    manifest = json.loads(sh("tar", "-xOf", amd64.artifact("aci"), "manifest"))
    assert AC_IDENTIFIER.match(manifest["name"])
    names = sh("tar", "-tf", amd64.artifact("aci")).splitlines()
    assert len(names) == len(set(names)), "an ACI has no duplicate entries"
    assert {n.rstrip("/").split("/", 1)[0] for n in names} == {"manifest", "rootfs"}
    listing = sh("tar", "--numeric-owner", "-tvf", amd64.artifact("aci"))
    owned = next(line for line in listing.splitlines() if line.endswith("etc/factory-test/owned"))
    assert owned.split()[:2] == ["-rwsr-x---", "4242/4343"]


def test_tgz_is_whole_gzip(amd64: Build) -> None:
    sh("gzip", "-t", amd64.artifact("tgz"))
    assert amd64.artifact("tgz").stat().st_size < amd64.artifact("tar").stat().st_size // 2


def test_squashfs_job_warned_about_acls(amd64: Build) -> None:
    info = amd64.job(f"pack:{CELL}:squashfs")["info"]
    assert info["warnings"] == [pack.SQUASHFS_ACL_WARNING]
    log = (amd64.out / amd64.job(f"pack:{CELL}:squashfs")["log"]).read_text()
    assert f"warning: {pack.SQUASHFS_ACL_WARNING}" in log


def _pack(tree: Path, work: Path, fmt: str) -> tuple[Output, list[str], str]:
    """The pack stage on a small tree, as the scheduler would call it."""
    job = Job(
        id=f"pack:tiny:{fmt}",
        kind="pack",
        cell="tiny",
        arch="amd64",
        deps=("finalise:tiny",),
        key="0" * 64,
        params={
            "format": fmt,
            "arch": "amd64",
            "image_name": "tiny",
            "docker_tag": "t/t:1",
            "epoch": 1_700_000_000,
        },
    )
    said: list[str] = []
    ctx = Context(
        job, {"finalise:tiny": Output(tree)}, Workspace(work, Cache(work / "c")), said.append
    )
    log = work / "pack.log"
    with proc.logging_to(log):
        out = anyio.run(pack.run, ctx)
    return out, said, log.read_text()


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("tiny\n")
    (tree / "plain").write_text("no acl\n")
    return tree


def test_squashfs_warns_only_when_the_tree_has_acls(tiny_tree: Path, tmp_path: Path) -> None:
    out, said, log = _pack(tiny_tree, tmp_path / "a", "squashfs")
    assert "warnings" not in out.info and "ACL" not in log
    sh("setfacl", "-m", "u:4242:r", tiny_tree / "etc" / "hostname")
    out, said, log = _pack(tiny_tree, tmp_path / "b", "squashfs")
    assert out.info["warnings"] == [pack.SQUASHFS_ACL_WARNING]
    assert any("ACL" in s for s in said)
    assert f"warning: {pack.SQUASHFS_ACL_WARNING}" in log
    assert out.path is not None
    assert "squashfs-root/etc/hostname" in sh("unsquashfs", "-l", out.path).splitlines()


def test_docker_layer_of_a_tiny_tree_has_bare_names(tiny_tree: Path, tmp_path: Path) -> None:
    (tiny_tree / "-dash").write_text("a name that looks like an option\n")
    out, _, _ = _pack(tiny_tree, tmp_path / "d", "docker")
    assert out.path is not None
    with tarfile.open(out.path) as archive:
        (image,) = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        with tarfile.open(fileobj=archive.extractfile(image["Layers"][0])) as layer:
            assert sorted(layer.getnames()) == ["-dash", "etc", "etc/hostname", "plain"]


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """qcow2 with the default compression and a fixed VHD, from the session's tree (the
    same packages and hook, so rootfs and finalise come from the cache)."""
    folder = tmp_path_factory.mktemp("disks")
    matrix = folder / "disks.toml"
    matrix.write_text(
        'name = "disks"\narches = ["amd64"]\ndistros = ["debian/bookworm"]\n'
        'formats = ["raw", "qcow2", "vhd"]\n'
        f'[image]\nhooks = ["{DATA / "hooks" / "marker"}"]\nvhd_subformat = "fixed"\n'
        '[mirrors]\ndebian = "host"\n'
    )
    build = run_matrix(matrix, folder / "out")
    assert build.returncode == 0, build.stderr[-3000:]
    return build


def test_fixed_vhd_has_the_exact_size(disks: Build) -> None:
    raw_size = disks.artifact("raw").stat().st_size
    info = json.loads(sh("qemu-img", "info", "--output=json", "-f", "vpc", disks.artifact("vhd")))
    assert info["format"] == "vpc" and info["virtual-size"] == raw_size
    # A fixed VHD is the raw disk and a 512-byte footer ("conectix" cookie).
    vhd = disks.artifact("vhd")
    assert vhd.stat().st_size == raw_size + 512
    with open(vhd, "rb") as fh:
        fh.seek(raw_size)
        footer = fh.read(512)
    assert footer[:8] == b"conectix"
    assert int.from_bytes(footer[60:64], "big") == 2  # disk type 2: fixed


def test_default_qcow2_is_zlib_and_checks(disks: Build) -> None:
    info = json.loads(
        sh("qemu-img", "info", "--output=json", "-f", "qcow2", disks.artifact("qcow2"))
    )
    assert info["format-specific"]["data"]["compression-type"] == "zlib"
    assert info["virtual-size"] == disks.artifact("raw").stat().st_size
    sh("qemu-img", "check", "-f", "qcow2", disks.artifact("qcow2"))
    sh("sha256sum", "-c", "--strict", "SHA256SUMS", cwd=disks.out)
