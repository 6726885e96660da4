"""Nightly builds (issue 10): reproducible, a no-op when no archive moved, with a changelog.

The acceptance test drives the real CLI four times against a local signed apt repository
(tests/integration/aptrepo.py) that carries one package, factory-marker:

1. a build: OUT holds only what is published, SHA256SUMS is signed, the SBOM lists
   factory-marker 1.0, report.json records each cell's epoch and archive state;
2. the same command again: nothing moved, so nothing is done and no file in OUT changes;
3. a --refresh build into another OUT with another TMPDIR: the same bytes, all formats;
4. factory-marker 1.1 published, the first command again: the tree is rebuilt and the
   change is told in CHANGES.md, report.json and `factory diff`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, factory, have, sha256
from tests.integration import aptrepo
from tests.integration.aptrepo import AptRepo
from tests.integration.conftest import CACHE

CELL = "debian-bookworm-amd64"
FORMATS = ["raw", "qcow2", "vhd", "vmdk", "vdi", "tar", "tgz", "squashfs", "aci", "docker"]
PURL = "pkg:deb/debian/factory-marker@{version}?arch=all&distro=debian-12"
NEEDS = ("gpg", "gpgv", "gpgconf", "dpkg-deb", "apt-ftparchive")

pytestmark = pytest.mark.skipif(not have(*NEEDS), reason=f"needs {', '.join(NEEDS)}")

repo = aptrepo.fixture("1.0")


# ---- helpers -----------------------------------------------------------------------


@dataclass
class Run:
    out: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    report: dict[str, Any]

    def job(self, jid: str) -> dict[str, Any]:
        (found,) = [j for j in self.report["jobs"] if j["id"] == jid]
        return found

    def artifacts(self) -> dict[str, dict[str, Any]]:
        return {a["format"]: a for a in self.report["artifacts"]}

    def failure(self) -> str:
        jobs = [j for j in self.report.get("jobs", []) if j["status"] not in ("done", "unchanged")]
        return f"exit {self.returncode}\n{self.stderr[-3000:]}\n{json.dumps(jobs, indent=1)}"


def run(matrix: Path, out: Path, *args: str, env: dict[str, str]) -> Run:
    started = time.monotonic()
    done = factory(
        "run", matrix, "--out", out, "--cache", CACHE, "--events", "json", *args, env=env
    )
    seconds = time.monotonic() - started
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return Run(out, done.returncode, done.stdout, done.stderr, seconds, report)


def write_matrix(path: Path, repo: AptRepo, key: str) -> Path:
    path.write_text(
        f"""\
name = "nightly-test"
arches = ["amd64"]
distros = ["debian/bookworm"]
formats = {json.dumps(FORMATS)}

[image]
packages = ["factory-marker"]

[[mirrors.extra]]
uri = "{repo.uri}"
suite = "{repo.suite}"
components = {json.dumps(repo.components)}
signed_by = "{repo.keyring}"

[sign]
gpg_key = "{key}"
"""
    )
    return path


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under `out`, by relative path."""
    found = {}
    for folder, _, files in os.walk(out):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            found[os.path.relpath(os.path.join(folder, name), out)] = (st.st_ino, st.st_mtime_ns)
    return found


def published(build: Run) -> set[str]:
    """What OUT may hold besides logs/: the artifacts, their .sha256 files, the cell's
    manifest and SBOM, and the run's own files."""
    expected = {"SHA256SUMS", "SHA256SUMS.sign", "report.json", "report.html", "CHANGES.md"}
    for artifact in build.report["artifacts"]:
        expected |= {artifact["path"], f"{artifact['path']}.sha256"}
    expected |= {f"{CELL}/{CELL}.manifest.json", f"{CELL}/{CELL}.spdx.json"}
    return expected


def check_out_holds_only_what_is_published(build: Run) -> None:
    assert sorted(build.artifacts()) == sorted(FORMATS)
    files = set(snapshot(build.out))
    missing = published(build) - files
    assert not missing, f"missing from {build.out}: {sorted(missing)}"
    others = sorted(f for f in files - published(build) if not f.startswith("logs/"))
    assert others == [], f"{build.out} holds more than what is published: {others}"
    assert (build.out / "logs").is_dir() and any((build.out / "logs").iterdir())
    dirs = sorted(p.name for p in build.out.iterdir() if p.is_dir())
    assert dirs == sorted([CELL, "logs"]), f"folders in {build.out}: {dirs}"


def spdx_package(out: Path, name: str) -> dict[str, Any]:
    sbom = json.loads((out / CELL / f"{CELL}.spdx.json").read_text())
    found = [p for p in sbom.get("packages", []) if p.get("name") == name]
    assert len(found) == 1, f"{name} in the SBOM: {found}"
    return found[0]


def purls(package: dict[str, Any]) -> list[str]:
    return [
        ref["referenceLocator"]
        for ref in package.get("externalRefs", [])
        if ref.get("referenceType") == "purl"
    ]


def check_sbom(out: Path, version: str) -> None:
    tool = ROOT / ".venv" / "bin" / "pyspdxtools"
    validated = subprocess.run(
        [
            str(tool if tool.exists() else "pyspdxtools"),
            "-i",
            str(out / CELL / f"{CELL}.spdx.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert validated.returncode == 0, validated.stdout[-2000:] + validated.stderr[-2000:]
    marker = spdx_package(out, "factory-marker")
    assert marker.get("versionInfo") == version
    assert PURL.format(version=version) in purls(marker)


def differing(first: Run, second: Run) -> list[str]:
    """The formats whose artifact differs between two builds: by the sha256 in each
    report.json, and by hashing the files themselves."""
    a, b = first.artifacts(), second.artifacts()
    bad = []
    for fmt in FORMATS:
        if fmt not in a or fmt not in b:
            bad.append(f"{fmt} (not built)")
            continue
        reported = (a[fmt]["sha256"], b[fmt]["sha256"])
        hashed = (sha256(first.out / a[fmt]["path"]), sha256(second.out / b[fmt]["path"]))
        if reported[0] != reported[1] or hashed[0] != hashed[1]:
            bad.append(f"{fmt} (reported {reported[0][:12]}/{reported[1][:12]}, "
                       f"files {hashed[0][:12]}/{hashed[1][:12]})")  # fmt: skip
        elif reported != hashed:
            bad.append(f"{fmt} (report.json says {reported[0][:12]}, file is {hashed[0][:12]})")
    return bad


def archive_entry(build: Run, suite: str) -> dict[str, Any]:
    (entry,) = [a for a in build.report["cells"][CELL]["archive"] if a["suite"] == suite]
    return entry


@pytest.fixture
def signing(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The gpg home the factory runs sign SHA256SUMS from, and its key's fingerprint."""
    home = tmp_path / "gnupg"
    try:
        yield home, aptrepo.new_key(home, "factory nightly test <nightly@example.invalid>")
    finally:
        aptrepo.stop_agent(home)


# ---- the repository helper on its own (quick) --------------------------------------


def test_aptrepo_is_signed_and_bumps(repo: AptRepo) -> None:
    aptrepo.verify(repo)
    for arch in aptrepo.ARCHES:
        assert "Package: factory-marker\n" in repo.packages(arch)
        assert "Version: 1.0\n" in repo.packages(arch)
        assert (repo.dist / "main" / f"binary-{arch}" / "Packages.gz").is_file()
    release = repo.release()
    assert release["Suite"] == "factory" and release["Components"] == "main"
    assert release["Architectures"].split() == ["amd64", "ppc64el", "all"]
    (deb,) = (repo.root / "pool").rglob("*.deb")
    assert deb.name == "factory-marker_1.0_all.deb"
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    assert "./usr/share/factory-marker/VERSION" in listing
    assert repo.keyring.read_bytes()[:1] != b"-"  # binary, as apt's Signed-By takes it

    old_date = release["Date"]
    bumped = aptrepo.bump(repo, "1.1")
    aptrepo.verify(bumped)
    assert "Version: 1.1\n" in bumped.packages("amd64")
    assert "Version: 1.0\n" not in bumped.packages("amd64")
    assert [p.name for p in (repo.root / "pool").rglob("*.deb")] == ["factory-marker_1.1_all.deb"]
    assert bumped.release()["Date"] != old_date

    # a Release that was changed after signing is refused
    inrelease = repo.dist / "InRelease"
    inrelease.write_text(inrelease.read_text().replace("Suite: factory", "Suite: f4ctory"))
    with pytest.raises(RuntimeError, match="BAD signature"):
        aptrepo.verify(bumped)


def test_matrix_helper_writes_the_contract(repo: AptRepo, tmp_path: Path) -> None:
    import tomllib

    matrix = tomllib.loads(write_matrix(tmp_path / "m.toml", repo, "ABCD").read_text())
    assert matrix["mirrors"]["extra"] == [
        {
            "uri": repo.uri,
            "suite": "factory",
            "components": ["main"],
            "signed_by": str(repo.keyring),
        }
    ]
    assert matrix["sign"] == {"gpg_key": "ABCD"}
    assert matrix["formats"] == FORMATS


# ---- the acceptance test -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)  # three runs, the last with --refresh
def test_nightly(repo: AptRepo, signing: tuple[Path, str], tmp_path: Path) -> None:
    home, key = signing
    matrix = write_matrix(tmp_path / "nightly.toml", repo, key)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    tmp_a, tmp_b = tmp_path / "tmp-a", tmp_path / "tmp-b"
    tmp_a.mkdir()
    tmp_b.mkdir()
    env_a = {"GNUPGHOME": str(home), "TMPDIR": str(tmp_a)}
    env_b = {"GNUPGHOME": str(home), "TMPDIR": str(tmp_b)}

    # 1. a build
    first = run(matrix, out1, env=env_a)
    assert first.returncode == 0, first.failure()
    check_out_holds_only_what_is_published(first)
    check_sbom(out1, "1.0")
    verified = subprocess.run(
        ["gpg", "--batch", "--verify", str(out1 / "SHA256SUMS.sign"), str(out1 / "SHA256SUMS")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "GNUPGHOME": str(home)},
    )
    assert verified.returncode == 0, verified.stderr
    cell = first.report["cells"][CELL]
    assert isinstance(cell["epoch"], int) and not isinstance(cell["epoch"], bool)
    suites = [a["suite"] for a in cell["archive"]]
    assert len(suites) == len(set(suites)), f"one entry per suite: {suites}"
    assert {"bookworm", "factory"} <= set(suites), suites
    for entry in cell["archive"]:
        assert set(entry) >= {"suite", "uri", "date", "sha256"}, entry
    ours = archive_entry(first, "factory")
    assert ours["uri"].rstrip("/") == repo.uri.rstrip("/")
    assert ours["sha256"] in {
        sha256(repo.dist / "InRelease"),
        sha256(repo.dist / "Release"),
    }, "the archive state of the extra repository is the hash of its (In)Release"

    # 2. nothing moved: nothing done, nothing in OUT touched
    before = snapshot(out1)
    second = run(matrix, out1, env=env_a)
    assert second.returncode == 0, second.failure()
    assert "unchanged since" in second.stdout + second.stderr, second.stderr[-2000:]
    assert second.seconds < 60, f"a no-op run took {second.seconds:.0f} s"
    after = snapshot(out1)
    touched = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert touched == [], f"a no-op run touched (inode or mtime): {touched}"

    # 3. --refresh into another OUT, another TMPDIR: the same bytes
    third = run(matrix, out2, "--refresh", env=env_b)
    assert third.returncode == 0, third.failure()
    check_out_holds_only_what_is_published(third)
    bad = differing(first, third)
    assert bad == [], f"not reproducible across --refresh, OUT and TMPDIR: {bad}"

    # 4. the archive moved: the tree is rebuilt and the change is told
    aptrepo.bump(repo, "1.1")
    fourth = run(matrix, out1, env=env_a)
    assert fourth.returncode == 0, fourth.failure()
    rootfs = fourth.job(f"rootfs:{CELL}")
    assert rootfs["status"] != "unchanged", rootfs
    check_out_holds_only_what_is_published(fourth)
    check_sbom(out1, "1.1")
    assert archive_entry(fourth, "factory")["sha256"] != ours["sha256"]
    changes = (out1 / "CHANGES.md").read_text()
    assert "factory-marker 1.0 → 1.1" in changes, changes[-2000:]
    changed = fourth.report["cells"][CELL]["changes"]["changed"]
    assert {"package": "factory-marker", "old": "1.0", "new": "1.1"} in changed, changed
    diff = factory("diff", out2, out1, env=env_a, timeout=300)
    assert diff.returncode == 0, diff.stderr[-2000:]
    assert "factory-marker 1.0 → 1.1" in diff.stdout, diff.stdout[-2000:]
