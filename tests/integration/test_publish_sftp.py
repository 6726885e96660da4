"""Publish targets over SFTP, against a real OpenSSH server on 127.0.0.1.

The server is sshd with its internal-sftp subsystem logging at VERBOSE, root with a key
from a temporary folder; its folder is a local one, so the tests read what a mirror
would serve straight from the disk. The cell is the integration tests' amd64 bookworm
(the same [image] and [mirrors] as data/amd64.toml, so its tree comes from the cache) in
two cheap formats. What the server received is proved from the server's side: its log
of SFTP opens and renames, and its files' inodes and mtimes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FACTORY, ROOT, STARTED, have
from tests.integration.conftest import CACHE, DATA, Build, run_matrix
from tests.integration.test_remote import SSHD, Sshd, free_port, keygen, sshds

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (have("ssh-keygen") and Path(SSHD).exists() and Path(SFTP_SERVER).exists()),
        reason="no OpenSSH server",
    ),
]

CELL = "debian-bookworm-amd64"
FILES = (f"{CELL}/{CELL}.tar", f"{CELL}/{CELL}.tar.gz")

MATRIX = f"""\
name = "pubtest"
arches = ["amd64"]
distros = ["debian/bookworm"]
formats = ["tar", "tgz"]

[image]
hooks = ["{DATA / "hooks/marker"}"]
qcow2_compression = "zstd"

[mirrors]
debian = "host"
"""


class SftpServer(Sshd):
    """An sshd whose internal-sftp logs every open, write and rename (VERBOSE)."""

    def folders(self) -> tuple[Path, ...]:
        return (self.srv,)

    def own_config(self) -> str:
        # OpenSSH's sftp-server, its log (every open, write and rename) to a file.
        return f"Subsystem sftp {SFTP_SERVER} -e -l VERBOSE 2>>{self.sftp_log}\n"

    def kill(self) -> None:
        """The server dies at once: sshd, its session and its sftp-server."""
        self._signal(signal.SIGKILL, only_sshd=False)

    @property
    def sftp_log(self) -> Path:
        return self.root / "sftp-server.log"

    @property
    def srv(self) -> Path:
        return self.root / "srv"

    def writes(self) -> list[str]:
        """The server's own record of files opened for writing and renames."""
        text = self.sftp_log.read_text() if self.sftp_log.exists() else ""
        return [
            line
            for line in text.splitlines()
            if re.search(r'open ".*" flags [A-Z,]*WRITE', line) or "posix-rename" in line
            or re.search(r"rename old", line)
        ]

    def logins(self) -> int:
        text = self.log.read_text() if self.log.exists() else ""
        return text.count("Accepted publickey")

    def target(self, known_hosts: Path, **extra: object) -> str:
        """A [[publish]] table for this server (`extra`: keys to set or add)."""
        lines = [
            "[[publish]]",
            f'name = "{extra.pop("name", "downloads")}"',
            'kind = "sftp"',
            'address = "127.0.0.1"',
            f"port = {extra.pop('port', self.port)}",
            'user = "root"',
            f'path = "{extra.pop("path", self.srv / "nightly")}"',
            f'key = "{self.client_key}"',
            f'known_hosts = "{known_hosts}"',
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SftpServer]:
    """One SFTP server for one test; afterwards none of its processes is left."""
    before = sshds()
    key = tmp_path / "client" / "id_ed25519"
    key.parent.mkdir()
    keygen(key)
    srv = SftpServer("mirror", tmp_path / "server", free_port(), key)
    try:
        yield srv.start()
    finally:
        srv.stop()
        deadline = time.monotonic() + 20
        while sshds() - before and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cell's artifacts, made once for the module (no [[publish]] target: publish
    jobs do not depend on them); each test starts from a copy of this OUT."""
    folder = tmp_path_factory.mktemp("sftp-built")
    matrix = folder / "matrix.toml"
    matrix.write_text(MATRIX)
    build = run_matrix(matrix, folder / "out", "--only", "publish:*")
    assert build.returncode == 0, build.stderr[-3000:]
    return build.out


def out_from(built: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", "--reflink=auto", built, out], check=True)
    return out


def write_matrix(folder: Path, server: SftpServer, *targets: dict[str, object]) -> Path:
    """The test's matrix with these [[publish]] targets, and a known_hosts that trusts the
    server's key on every port they name (one of them may have nothing listening)."""
    known = folder / "known_hosts"
    line = server.known_hosts_line()
    ports = {int(str(t.get("port", server.port))) for t in targets} | {server.port}
    known.write_text("".join(line.replace(f"]:{server.port} ", f"]:{p} ") for p in sorted(ports)))
    text = MATRIX + "".join("\n" + server.target(known, **t) for t in targets)
    path = folder / "matrix.toml"
    path.write_text(text)
    return path


def upload(build: Build, target: str = "downloads") -> dict[str, object]:
    return build.job(f"upload:{CELL}:{target}")


def state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under a folder (files and folders): its inode and mtime."""
    found = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        st = path.lstat()
        found[str(path.relative_to(folder))] = (st.st_ino, st.st_mtime_ns)
    return found


def sha256sum_c(folder: Path) -> str:
    proc = subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_publish_then_a_noop_night_sends_nothing(
    built: Path, tmp_path: Path, server: SftpServer
) -> None:
    """A real run publishes its cell to the server (and a target whose server is down
    fails alone); the next night is a no-op, and the server sees no login at all; a
    run whose upload job must run again (its settings changed) sends nothing either."""
    out = out_from(built, tmp_path)
    broken = {"name": "broken", "port": free_port(), "retries": 1}
    first = run_matrix(write_matrix(tmp_path, server, {}, broken), out)
    assert first.returncode == 1, first.stderr[-3000:]
    failed = [j for j in first.report["jobs"] if j["status"] not in ("done", "unchanged")]
    assert [j["id"] for j in failed] == [f"upload:{CELL}:broken"], failed
    error = failed[0]["error"]
    assert "\n" not in error
    assert error.startswith(f"publish target broken (sftp://root@127.0.0.1:{broken['port']}")
    assert "refused" in error.lower() and "after 2 attempts" in error, error
    assert upload(first)["status"] == "done"
    assert sorted(upload(first)["info"]["upload"]["sent"]) == sorted(FILES)

    dest = server.srv / "nightly"
    assert sha256sum_c(dest).count(": OK") == 2
    assert sha256sum_c(dest / CELL).count(": OK") == 2
    epoch = first.report["cells"][CELL]["epoch"]
    for name in FILES:  # the same bytes as OUT, and the cell's clock as their mtime
        assert (dest / name).read_bytes() == (out / name).read_bytes()
        assert (dest / name).stat().st_mtime == epoch
    assert not list(dest.rglob("*.factory-part"))
    lines = (out / "SHA256SUMS").read_text().splitlines()
    sums = {line.split()[1]: line.split()[0] for line in lines}
    assert (dest / "SHA256SUMS").read_text() == "".join(
        f"{sums[n]}  {n}\n" for n in sorted(FILES)
    )

    # The no-op night, without the broken target: nothing to do, no login on the server.
    logins, writes, before = server.logins(), server.writes(), state(dest)
    assert writes, "the server's log shows no writes of the first run"
    second = run_matrix(write_matrix(tmp_path, server, {}), out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "unchanged since" in second.stderr
    assert (server.logins(), server.writes(), state(dest)) == (logins, writes, before)

    # A changed setting gives the upload job a new key: it runs (alone: the artifacts are
    # OUT's), finds every file there with its sha256, size and mtime, and writes nothing.
    third = run_matrix(write_matrix(tmp_path, server, {"retries": 5}), out)
    assert third.returncode == 0, third.stderr[-3000:]
    ran = [j["id"] for j in third.report["jobs"] if j["status"] == "done"]
    assert ran == [f"upload:{CELL}:downloads"]
    info = upload(third)["info"]["upload"]
    assert (info["sent"], sorted(info["skipped"]), info["sums"]) == ([], sorted(FILES), [])
    assert server.logins() == logins + 1
    assert (server.writes(), state(dest)) == (writes, before)

    # A file touched on the server is no longer the one factory wrote: it is sent again,
    # alone, and its line in the sums is taken out before it is replaced.
    tar = dest / FILES[0]
    os.utime(tar)
    fourth = run_matrix(write_matrix(tmp_path, server, {"retries": 4}), out)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    info = upload(fourth)["info"]["upload"]
    assert (info["sent"], info["skipped"]) == ([FILES[0]], [FILES[1]])
    assert tar.stat().st_mtime == epoch and tar.stat().st_ino != before[FILES[0]][0]
    assert sha256sum_c(dest).count(": OK") == 2
    new = server.writes()[len(writes) :]
    assert [w.split('"')[-2].rsplit("/", 1)[-1] for w in new if "posix-rename" in w] == [
        "SHA256SUMS", f"{CELL}.tar", "SHA256SUMS"
    ]  # fmt: skip


def test_server_killed_mid_upload(built: Path, tmp_path: Path, server: SftpServer) -> None:
    """sshd and its SFTP session die while the tar is on its way: no file is under its
    final name on the server, the upload job alone fails and says why, and the next run
    (the server back) cleans up and publishes the cell whole."""
    out = out_from(built, tmp_path)  # the artifacts, sent nowhere yet
    matrix = write_matrix(tmp_path, server, {"retries": 0})
    dest = server.srv / "nightly" / CELL
    log = tmp_path / "events.json"
    with log.open("w") as events:
        proc = subprocess.Popen(
            [*FACTORY, "run", str(matrix), "--out", str(out), "--cache", str(CACHE),
             "--events", "json"],
            cwd=ROOT, stdout=events, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        STARTED.add(proc.pid)
        caught = None
        deadline = time.monotonic() + 300  # the tar goes first: catch it on its way
        while caught is None and proc.poll() is None and time.monotonic() < deadline:
            parts = list(dest.glob(f".{CELL}.tar.*.factory-part")) if dest.exists() else []
            if parts:
                caught = parts[0].name
                server.kill()
            time.sleep(0.002)
        _, stderr = proc.communicate(timeout=300)
    assert caught is not None, f"the upload ended before it could be caught: {stderr[-2000:]}"
    assert proc.returncode == 1, stderr[-3000:]
    assert [p.name for p in dest.iterdir() if not p.name.endswith(".factory-part")] == []
    report = json.loads((out / "report.json").read_text())
    failed = [j for j in report["jobs"] if j["status"] not in ("done", "unchanged")]
    assert [j["id"] for j in failed] == [f"upload:{CELL}:downloads"], failed
    error = failed[0]["error"]
    assert error.startswith("publish target downloads (sftp://") and "\n" not in error, error

    server.start()  # back: the next run removes what the killed one left and sends all
    again = run_matrix(matrix, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(dest.parent.rglob("*.factory-part"))
    assert sha256sum_c(dest).count(": OK") == 2
    assert sha256sum_c(dest.parent).count(": OK") == 2
