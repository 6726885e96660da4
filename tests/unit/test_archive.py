"""The archive state: Release files read from the sources a tree uses, their digests in the
rootfs key, their newest Date: the cell's clock."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from factory import archive
from factory.distros import debian
from factory.plan import make_plan
from factory.spec import load_matrix

DATE = "Sat, 11 Jul 2026 10:16:37 UTC"
LATER = "Mon, 30 Nov 2026 02:21:41 UTC"


def release(date: str, suite: str = "factory", signed: bool = True) -> bytes:
    body = f"Origin: test\nSuite: {suite}\nCodename: {suite}\nDate: {date}\nArchitectures: all\n"
    if signed:
        body = (
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n"
            f"{body}-----BEGIN PGP SIGNATURE-----\n\nxx\n-----END PGP SIGNATURE-----\n"
        )
    return body.encode()


def repo(root: Path, suite: str, data: bytes, name: str = "InRelease") -> str:
    dists = root / "dists" / suite
    dists.mkdir(parents=True, exist_ok=True)
    (dists / name).write_bytes(data)
    return f"file://{root}"


async def test_reads_inrelease_digest_and_date(tmp_path: Path) -> None:
    data = release(DATE)
    uri = repo(tmp_path, "factory", data)
    got = await archive.read_suite(uri, "factory", ("main",))
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.date == DATE
    assert got.epoch == 1783764997
    assert got.url.endswith("/dists/factory/InRelease")


async def test_falls_back_to_release(tmp_path: Path) -> None:
    uri = repo(tmp_path, "factory", release(DATE, signed=False), name="Release")
    got = await archive.read_suite(uri, "factory", ("main",))
    assert got.url.endswith("/dists/factory/Release")


async def test_unreachable_names_suite_and_url(tmp_path: Path) -> None:
    with pytest.raises(archive.ArchiveError) as err:
        await archive.read_suite(f"file://{tmp_path}/nothing", "bookworm-security", ("main",))
    text = str(err.value)
    assert "bookworm-security" in text
    assert f"file://{tmp_path}/nothing/dists/bookworm-security/InRelease" in text
    assert "\n" not in text


async def test_refused_connection_is_one_line() -> None:
    with pytest.raises(archive.ArchiveError, match=r"suite bookworm at http://127\.0\.0\.1:9/"):
        await archive.read_suite("http://127.0.0.1:9/debian", "bookworm", ("main",))


async def test_broken_release_file(tmp_path: Path) -> None:
    uri = repo(tmp_path, "factory", b"<html>not found</html>\n")
    with pytest.raises(archive.ArchiveError, match="not a Release file"):
        await archive.read_suite(uri, "factory", ("main",))


async def test_cells_share_a_suite_and_take_the_newest_date(tmp_path: Path) -> None:
    a = repo(tmp_path / "a", "one", release(DATE, "one"))
    b = repo(tmp_path / "b", "two", release(LATER, "two"))
    sources = (
        f"Types: deb\nURIs: {a}\nSuites: one\nComponents: main\nTrusted: yes\n\n"
        f"Types: deb\nURIs: {b}\nSuites: two\nComponents: main contrib\nTrusted: yes\n"
    )
    states = await archive.read_all({"x": sources, "y": sources})
    assert [s.suite for s in states["x"].suites] == ["one", "two"]
    assert states["x"].suites[1].components == ("main", "contrib")
    assert states["x"].epoch == states["x"].suites[1].epoch > states["x"].suites[0].epoch


def test_parse_release_rejects_a_bad_date() -> None:
    with pytest.raises(ValueError, match="not a date"):
        archive.parse_release(b"Date: yesterday\n")


def _matrix(tmp_path: Path, epoch: str = "") -> Path:
    (tmp_path / "repo.gpg").write_bytes(b"key")
    path = tmp_path / "m.toml"
    path.write_text(
        'name = "t"\narches = ["amd64"]\ndistros = ["debian/bookworm"]\nformats = ["tar"]\n'
        + (f"[image]\nepoch = {epoch}\n" if epoch else "")
        + '[mirrors]\ndebian = "http://mirror.example/debian"\n'
        + "[[mirrors.extra]]\n"
        + f'uri = "file://{tmp_path}/repo"\nsuite = "factory"\nsigned_by = "repo.gpg"\n'
    )
    return path


async def test_archive_state_is_in_the_rootfs_key_but_not_the_mirror(tmp_path: Path) -> None:
    m = load_matrix(_matrix(tmp_path))
    (cell,) = m.cells()
    sources = archive.cell_sources(m, cell)
    assert f"URIs: copy:{tmp_path}/repo" in sources  # dpkg, chrooted, cannot see the path
    # The key is embedded: apt's unprivileged fetcher needs no file of ours, nor a host.
    assert "Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n a2V5\n" in sources

    def state(digest: str, uri: str) -> archive.CellArchive:
        suites = tuple(
            archive.Suite(uri, s, ("main",), DATE, 1783764997, digest, f"{uri}/x")
            for s in ("bookworm", "bookworm-updates", "bookworm-security", "factory")
        )
        return archive.CellArchive(sources, suites)

    def rootfs_key(st: archive.CellArchive) -> str:
        return next(j.key for j in make_plan(m, {cell.id: st}).jobs if j.kind == "rootfs")

    same = rootfs_key(state("a" * 64, "http://one.example"))
    assert rootfs_key(state("a" * 64, "http://two.example")) == same  # another mirror
    assert rootfs_key(state("b" * 64, "http://one.example")) != same  # the archive moved
    plan = make_plan(m, {cell.id: state("a" * 64, "http://one.example")})
    assert {j.params.get("epoch") for j in plan.jobs if j.kind != "publish"} == {1783764997}


def test_matrix_epoch_wins(tmp_path: Path) -> None:
    m = load_matrix(_matrix(tmp_path, "1700000000"))
    plan = make_plan(m)
    assert {j.params["epoch"] for j in plan.jobs if j.kind == "rootfs"} == {1700000000}


def test_embedded_key_is_what_gpg_armors(tmp_path: Path) -> None:
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    subprocess.run(
        [*gpg, "--passphrase", "", "--quick-gen-key", "t <t@example.invalid>", "ed25519"],
        check=True,
        capture_output=True,
    )
    binary = subprocess.run([*gpg, "--export"], check=True, capture_output=True).stdout
    armored = subprocess.run([*gpg, "--armor", "--export"], check=True, capture_output=True)
    want = [line or "." for line in armored.stdout.decode().strip().splitlines()]
    assert debian.embedded_key(binary).split("\n ")[1:] == want
    assert debian.embedded_key(armored.stdout) == debian.embedded_key(binary)
