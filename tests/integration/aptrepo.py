"""A local signed apt repository for tests: one package, `factory-marker`, at a version
the test chooses, that a later `bump()` moves.

    base/repo/                      the archive (apt source `file://base/repo factory main`)
      dists/factory/{Release,InRelease,Release.gpg}
      dists/factory/main/binary-{amd64,ppc64el,all}/Packages(.gz)
      pool/main/f/factory-marker/factory-marker_VERSION_all.deb
    base/repo.gpg                   its public key, a binary keyring for apt's Signed-By
    base/gnupg/                     the throwaway gpg home that holds the signing key

Everything is made by the Debian tools an archive is made with (dpkg-deb, apt-ftparchive,
gpg); nothing here talks to a network. A test uses `fixture()`:

    repo = aptrepo.fixture("1.0")          # at module level: a fixture named `repo`

    def test_x(repo: aptrepo.AptRepo) -> None:
        ...
        aptrepo.bump(repo, "1.1")
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

PACKAGE = "factory-marker"
SUITE = "factory"
COMPONENT = "main"
ARCHES = ("amd64", "ppc64el", "all")
UID = "factory test repository <repo@example.invalid>"


@dataclass(frozen=True)
class AptRepo:
    base: Path
    fingerprint: str
    version: str

    @property
    def root(self) -> Path:
        return self.base / "repo"

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    @property
    def keyring(self) -> Path:
        return self.base / "repo.gpg"

    @property
    def gnupghome(self) -> Path:
        return self.base / "gnupg"

    @property
    def dist(self) -> Path:
        return self.root / "dists" / SUITE

    @property
    def suite(self) -> str:
        return SUITE

    @property
    def components(self) -> list[str]:
        return [COMPONENT]

    def release(self) -> dict[str, str]:
        """The Release file's single-line fields."""
        return release_fields((self.dist / "Release").read_text())

    def packages(self, arch: str = "amd64") -> str:
        return (self.dist / COMPONENT / f"binary-{arch}" / "Packages").read_text()


def _run(
    argv: list[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: Any = subprocess.PIPE,
) -> str:
    done = subprocess.run(
        list(map(str, argv)),
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout if isinstance(done.stdout, str) else ""


# ---- gpg ---------------------------------------------------------------------------


def gpg(home: Path, *args: str | os.PathLike[str], stdout: Any = subprocess.PIPE) -> str:
    return _run(["gpg", "--batch", "--no-tty", *args], env={"GNUPGHOME": str(home)}, stdout=stdout)


def new_key(home: Path, uid: str) -> str:
    """A signing key without a passphrase in the gpg home `home` (made if needed); its
    fingerprint."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = gpg(home, "--with-colons", "--list-secret-keys", uid)
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent that gpg started for `home` (it outlives the gpg commands)."""
    subprocess.run(
        ["gpgconf", "--kill", "all"],
        env={**os.environ, "GNUPGHOME": str(home)},
        capture_output=True,
        check=False,
    )


# ---- the archive -------------------------------------------------------------------


def release_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def build_deb(folder: Path, version: str, epoch: int) -> Path:
    """factory-marker_VERSION_all.deb in `folder`; holds /usr/share/factory-marker/VERSION."""
    staging = folder / f".{PACKAGE}-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "DEBIAN").mkdir(parents=True)
    share = staging / "usr" / "share" / PACKAGE
    share.mkdir(parents=True)
    (share / "VERSION").write_text(f"{version}\n")
    (staging / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Section: misc\n"
        "Priority: optional\n"
        "Maintainer: factory tests <test@example.invalid>\n"
        "Description: marks an image built by factory's tests\n"
        " Holds /usr/share/factory-marker/VERSION, the version a test published.\n"
    )
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    deb = folder / f"{PACKAGE}_{version}_all.deb"
    _run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", staging, deb],
        env={"SOURCE_DATE_EPOCH": str(epoch)},
    )
    shutil.rmtree(staging)
    return deb


def _publish(base: Path, fingerprint: str, version: str, date: datetime) -> AptRepo:
    repo = AptRepo(base, fingerprint, version)
    pool = repo.root / "pool" / COMPONENT / PACKAGE[0] / PACKAGE
    pool.mkdir(parents=True)
    build_deb(pool, version, int(date.timestamp()))
    for arch in ARCHES:
        binary = repo.dist / COMPONENT / f"binary-{arch}"
        binary.mkdir(parents=True)
        listing = _run(
            ["apt-ftparchive", "--arch", arch, "packages", f"pool/{COMPONENT}"], cwd=repo.root
        )
        (binary / "Packages").write_text(listing)
        with gzip.GzipFile(binary / "Packages.gz", "wb", mtime=0) as gz:
            gz.write(listing.encode())
    fields = {
        "Origin": "factory-test",
        "Label": "factory-test",
        "Suite": SUITE,
        "Codename": SUITE,
        "Date": format_datetime(date, usegmt=True).replace("GMT", "UTC"),
        "Architectures": " ".join(ARCHES),
        "Components": COMPONENT,
        "Description": "factory test repository",
    }
    options = [a for k, v in fields.items() for a in ("-o", f"APT::FTPArchive::Release::{k}={v}")]
    # Made before Release is there: apt-ftparchive would list a Release file it found.
    release = _run(["apt-ftparchive", *options, "release", repo.dist])
    (repo.dist / "Release").write_text(release)
    sign = ["--local-user", fingerprint, "--yes", "--digest-algo", "SHA512"]
    gpg(repo.gnupghome, *sign, "--clearsign", "-o", repo.dist / "InRelease", repo.dist / "Release")
    gpg(repo.gnupghome, *sign, "--detach-sign", "--armor", "-o", repo.dist / "Release.gpg",
        repo.dist / "Release")  # fmt: skip
    with open(repo.keyring, "wb") as fh:
        gpg(repo.gnupghome, "--export", fingerprint, stdout=fh)
    for path in [repo.root, *repo.root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    repo.keyring.chmod(0o644)
    return repo


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def create(base: Path, version: str = "1.0", *, date: datetime | None = None) -> AptRepo:
    """A new repository with its own key in `base` (made if needed), publishing `version`."""
    base.mkdir(parents=True, exist_ok=True)
    fingerprint = new_key(base / "gnupg", UID)
    return _publish(base, fingerprint, version, date or _now())


def bump(repo: AptRepo, version: str, *, date: datetime | None = None) -> AptRepo:
    """Publish `version` instead (the old one is removed), signed by the same key; the
    Release Date moves forward (at least a second) unless `date` is given."""
    old = parsedate_to_datetime(repo.release()["Date"])
    shutil.rmtree(repo.root)
    return _publish(
        repo.base, repo.fingerprint, version, date or max(_now(), old + timedelta(seconds=1))
    )


def verify(repo: AptRepo) -> None:
    """What apt checks: InRelease and Release.gpg by the keyring alone (gpgv); raises
    RuntimeError with gpgv's words when either fails."""
    _run(["gpgv", "--keyring", repo.keyring, repo.dist / "InRelease"])
    _run(["gpgv", "--keyring", repo.keyring, repo.dist / "Release.gpg", repo.dist / "Release"])


@contextlib.contextmanager
def repository(base: Path, version: str = "1.0") -> Iterator[AptRepo]:
    """`create()`, and the gpg-agent stopped afterwards."""
    try:
        yield create(base, version)
    finally:
        stop_agent(base / "gnupg")


def fixture(version: str = "1.0") -> Callable[..., Any]:
    """A pytest fixture that gives each test a fresh repository at `version`, in its
    tmp_path; assign it at module level under the name the tests ask for."""

    @pytest.fixture
    def repo(tmp_path: Path) -> Iterator[AptRepo]:
        with repository(tmp_path / "apt", version) as made:
            yield made

    return repo
