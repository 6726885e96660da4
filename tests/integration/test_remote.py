"""Remote build hosts, against real OpenSSH servers on 127.0.0.1.

Each "host" is its own sshd (own host key, key-only auth, own known_hosts line) whose
worker uses its own working, cache and state folders: it shares nothing with the
controller but the installed package (this checkout's .venv/bin/factory). The remote
cells are small (tar only) and their trees are copied into the host's cache from the
controller's, because these tests are about dispatch, not about building trees.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from factory.executors.protocol import PROTOCOL
from tests.conftest import FACTORY, ROOT, factory, have
from tests.integration.conftest import CACHE, Build, run_matrix
from tests.integration.test_interrupt import Running

SSHD = "/usr/sbin/sshd"
WORKER = ROOT / ".venv/bin/factory"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (have("ssh-keygen") and Path(SSHD).exists()), reason="no OpenSSH"),
]

# The default matrix's settings: its trees are usually warm in the controller's cache.
AMD64 = """\
name = "{name}"
arches = ["amd64"]
distros = ["debian/bookworm"]
formats = {formats}
fallback = "{fallback}"
"""
# amd64 here and ppc64el on a host at once. The ppc64el tree the ppc tests build has the
# security suite off (the mirror's ppc64el security index is broken), so this one does too.
MIXED = """\
name = "{name}"
arches = ["amd64", "ppc64el"]
distros = ["debian/bookworm"]
formats = ["tar", "raw"]
fallback = "none"

[mirrors]
security = false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """pid and every process below it (sshd's session children call setsid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, []))
    return found


def sshds() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().startswith("sshd"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def workers(folder: Path) -> list[int]:
    """Worker processes serving from `folder` (a host's root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if b"worker" in cmd and str(folder).encode() in env:
                found.append(int(entry.name))
    return found


@dataclass
class Sshd:
    """One build host: a real sshd on 127.0.0.1:port, its folders, its known_hosts line."""

    name: str
    root: Path
    port: int
    client_key: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    def known_hosts_line(self) -> str:
        key = (self.root / "ssh_host_ed25519_key.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n"

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    def folders(self) -> tuple[Path, ...]:
        """The folders the server needs under its root."""
        return (self.workdir, self.cache, self.root / "state")

    def own_config(self) -> str:
        """sshd_config's lines of this kind of server, after those every one has."""
        return (
            "Subsystem sftp internal-sftp\n"
            # The host's own factory state (killed-run records), not the controller's.
            f"SetEnv FACTORY_STATE_DIR={self.root}/state FACTORY_TEST_HOST={self.root}\n"
        )

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self.folders():
            folder.mkdir(exist_ok=True)
        if not self.host_key.exists():
            keygen(self.host_key)
        (self.root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        config = self.root / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.root}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {self.root}/sshd.pid\n" + self.own_config()
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        log = self.log
        # This test's log only, removed before sshd starts: removed after, it could take
        # the line that says sshd listens with it (sshd appends to the file it opened).
        log.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(config), "-E", str(log)], start_new_session=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # not by connecting: that leaves a child behind
            if log.exists() and f"port {self.port}" in log.read_text():
                return self
            if self.proc.poll() is not None:
                self.proc = None
                raise AssertionError(log.read_text() if log.exists() else "sshd: no log")
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"sshd on port {self.port} did not start within 30 s")

    def kill(self) -> None:
        """The host drops: sshd and its connection processes die at once (the worker,
        a child of a session, is left to notice)."""
        self._signal(signal.SIGKILL, only_sshd=True)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, only_sshd=False)

    def _signal(self, sig: signal.Signals, *, only_sshd: bool) -> None:
        if self.proc is None:
            return
        pids = []
        for pid in descendants(self.proc.pid):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("sshd") or not only_sshd:
                pids.append(pid)
                os.kill(pid, sig)
        self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 10
        for pid in pids:  # sshd's children call setsid: wait for each, not the group
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)

    def toml(self, arches: list[str], known_hosts: Path, **extra: Any) -> str:
        lines = [
            "[[hosts]]",
            f'name = "{self.name}"',
            'address = "127.0.0.1"',
            f"port = {self.port}",
            'user = "root"',
            f'key = "{self.client_key}"',
            f'known_hosts = "{known_hosts}"',
            f"arches = {json.dumps(arches)}",
            "jobs = 2",
            f'command = "{extra.pop("command", WORKER)}"',
            f'workdir = "{self.workdir}"',
            f'cache = "{self.cache}"',
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def leftovers(self) -> list[str]:
        """What a test must not leave on the host: worker processes and session folders."""
        deadline = time.monotonic() + 30  # a worker that lost its controller is cleaning up
        while True:
            found = [f"worker pid {p}" for p in workers(self.root)]
            found += [str(p) for p in self.workdir.glob("factory-*")]
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("client") / "id_ed25519"
    keygen(key)
    return key


@pytest.fixture(scope="session")
def host_roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hosts' folders, kept for the session: their caches are seeded once."""
    return tmp_path_factory.mktemp("hosts")


@pytest.fixture
def hosts(host_roots: Path, client_key: Path) -> Iterator[dict[str, Sshd]]:
    """Two build hosts, a and b, up for one test; afterwards nothing of theirs is left."""
    before = sshds()
    started: dict[str, Sshd] = {}
    try:
        for name in "ab":  # one that fails to start stops the one already up
            started[name] = Sshd(name, host_roots / name, free_port(), client_key).start()
        yield started
    finally:
        for host in started.values():
            host.stop()
        # Orphaned privsep children are reaped by pid 1 in its own time: wait for that.
        deadline = time.monotonic() + 20
        while sshds() - before and time.monotonic() < deadline:
            time.sleep(0.1)
    for host in started.values():
        assert host.leftovers() == [], f"host {host.name} left behind"


def plan_keys(matrix: Path) -> dict[str, str]:
    plan = json.loads(factory("plan", matrix, "--json", check=True).stdout)
    return {j["id"]: j["key"] for j in plan["jobs"]}


def seed(host: Sshd, matrix: Path, *, like: Path | None = None) -> None:
    """Put the trees of `matrix`'s cells into the host's cache, copied from the controller's
    cache (built there first if missing); `like`: copy those of another matrix under this
    one's keys (same trees, other parameters)."""
    keys = plan_keys(matrix)
    source = plan_keys(like) if like else keys
    trees = [j for j in keys if j.split(":")[0] in ("rootfs", "finalise")]
    missing = [j for j in trees if not (CACHE / "trees" / source[j] / "meta.json").exists()]
    if missing:  # warm the controller's cache once, here, without the hosts (minutes)
        here = host.root.parent / f"warm-{time.time_ns()}"
        here.mkdir()
        text = (like or matrix).read_text().split("[[hosts]]")[0]
        build = run_matrix(write_matrix(here, text), here / "out")
        assert build.returncode == 0, build.stderr[-3000:]
        shutil.rmtree(here)  # only its trees were wanted, and they are in the cache
    for jid in trees:
        dest = host.cache / "trees" / keys[jid]
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Hard links: cached trees are never changed in place, and a copy of each
            # would cost the disk a gigabyte per host.
            tree = (CACHE / "trees" / source[jid]).resolve()  # the generation KEY names
            subprocess.run(["cp", "-al", str(tree), str(dest)], check=True)


def write_matrix(folder: Path, text: str) -> Path:
    path = folder / "matrix.toml"
    path.write_text(text)
    return path


def known_hosts(folder: Path, *hosts: Sshd) -> Path:
    path = folder / "known_hosts"
    path.write_text("".join(h.known_hosts_line() for h in hosts))
    return path


def check_artifacts(build: Build) -> None:
    """Every artifact is whole and matches its .sha256 and the report."""
    assert build.report["artifacts"], build.stderr[-2000:]
    for art in build.report["artifacts"]:
        path = build.out / art["path"]
        digest = subprocess.run(
            ["sha256sum", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        assert digest == art["sha256"]
        assert Path(f"{path}.sha256").read_text() == f"{digest}  {path.name}\n"
        assert path.stat().st_size == art["size"]


def hosts_of(build: Build, cell: str) -> set[str | None]:
    return {j["host"] for j in build.report["jobs"] if j["cell"] == cell}


def window(build: Build, cell: str) -> tuple[float, float]:
    jobs = [j for j in build.report["jobs"] if j["cell"] == cell and j["started"]]
    return min(j["started"] for j in jobs), max(j["finished"] for j in jobs)


def test_amd64_here_and_ppc64el_on_a_host_at_once(tmp_path: Path, hosts: dict[str, Sshd]) -> None:
    a = hosts["a"]
    matrix = write_matrix(
        tmp_path,
        MIXED.format(name="mixed") + a.toml(["ppc64el"], known_hosts(tmp_path, a)),
    )
    seed(a, matrix)
    build = run_matrix(matrix, tmp_path / "out")
    assert build.returncode == 0, build.stderr[-3000:] + json.dumps(build.report, indent=1)
    check_artifacts(build)
    assert {a["cell"] for a in build.report["artifacts"]} == {
        "debian-bookworm-amd64",
        "debian-bookworm-ppc64el",
    }
    assert hosts_of(build, "debian-bookworm-amd64") == {None}
    assert hosts_of(build, "debian-bookworm-ppc64el") == {"a"}
    # Both cells were under way at the same time.
    here, there = window(build, "debian-bookworm-amd64"), window(build, "debian-bookworm-ppc64el")
    assert here[0] < there[1] and there[0] < here[1], (here, there)
    # The remote raw disk came back sparse: only its data extents crossed the wire.
    raw = build.out / "debian-bookworm-ppc64el/debian-bookworm-ppc64el.raw"
    assert raw.stat().st_blocks * 512 < 0.8 * raw.stat().st_size
    log = (build.out / build.job("publish:debian-bookworm-ppc64el:raw")["log"]).read_text()
    read = int(log.split(" bytes, ", 1)[1].split(" in ", 1)[0])
    assert read < 0.8 * raw.stat().st_size, log
    # The remote cell's manifest came back too.
    assert (build.out / "debian-bookworm-ppc64el/debian-bookworm-ppc64el.manifest.json").is_file()
    # So did each remote job's log, with the commands it ran there (sent with its event).
    assemble = build.job("assemble:debian-bookworm-ppc64el")
    text = (build.out / assemble["log"]).read_text()
    _, _, there = text.partition("# log of assemble:debian-bookworm-ppc64el on a:\n")
    assert "\n$ sfdisk " in f"\n{there}", text[:2000]
    # Progress of remote jobs reached the controller's stream, with the host.
    remote = [e for e in build.events if e["cell"] == "debian-bookworm-ppc64el"]
    assert {"start", "done"} <= {e["kind"] for e in remote}
    assert all(e["host"] == "a" for e in remote if e["kind"] in ("start", "done"))


@pytest.mark.parametrize("then", ["second-host", "fallback", "worker-killed"])
def test_host_lost_mid_build(tmp_path: Path, hosts: dict[str, Sshd], then: str) -> None:
    """Host a's sshd dies while its worker packs: the cell is done again on b (or here).
    worker-killed: the connection stays up but a's worker is SIGKILLed; b takes over."""
    a, b = hosts["a"], hosts["b"]
    blocks = a.toml(["amd64"], known_hosts(tmp_path, a, b))
    if then != "fallback":
        blocks += b.toml(["amd64"], known_hosts(tmp_path, a, b))
    fallback = "local" if then == "fallback" else "none"
    matrix = write_matrix(
        tmp_path, AMD64.format(name="lost", formats='["tar", "tgz"]', fallback=fallback) + blocks
    )
    seed(a, matrix)
    seed(b, matrix)
    run = Running(matrix, tmp_path / "out", CACHE)
    try:
        started = run.wait_for("start", "pack", timeout=300)
        assert started["host"] == "a"
        time.sleep(1.0)
        if then == "worker-killed":
            (worker,) = workers(a.root)
            os.kill(worker, signal.SIGKILL)
        else:
            a.kill()
        assert run.proc.wait(timeout=600) == 0, run.proc.stderr.read() if run.proc.stderr else ""
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    report = run.report()
    build = Build(tmp_path / "out", 0, "", [], report)
    check_artifacts(build)
    jobs = {j["id"]: j for j in report["jobs"]}  # type: ignore[union-attr]
    pack = jobs["pack:debian-bookworm-amd64:tgz"]
    expected = None if then == "fallback" else "b"
    assert pack["host"] == expected
    (retry,) = pack["info"]["retries"]
    assert retry["host"] == "a" and retry["then"] == (expected or "local")
    if then == "worker-killed":
        assert "the worker on a killed by signal" in retry["error"], retry
    else:
        # The session ends with the link's own reason: sshd's end closes the connection.
        assert re.fullmatch(r"a: connection lost \(.+\)", retry["error"]), retry
    # The worker on a saw its controller go, stopped its tar and removed its folder.
    assert a.leftovers() == []


@pytest.mark.parametrize("case", ["changed", "unknown"])
def test_host_key_refused(tmp_path: Path, hosts: dict[str, Sshd], case: str) -> None:
    a, b = hosts["a"], hosts["b"]
    known = tmp_path / "known_hosts"
    if case == "changed":  # a's address and port, another host's key
        known.write_text(b.known_hosts_line().replace(f":{b.port}", f":{a.port}"))
    else:
        known.write_text(b.known_hosts_line())
    matrix = write_matrix(
        tmp_path,
        AMD64.format(name="keys", formats='["tar"]', fallback="none") + a.toml(["amd64"], known),
    )
    build = run_matrix(matrix, tmp_path / "out")
    assert build.returncode == 1
    lines = [line for line in build.stderr.splitlines() if "host a " in line]
    assert len(lines) == 1, build.stderr
    word = "does not match" if case == "changed" else "has no key for this host"
    assert "host key refused" in lines[0] and word in lines[0], lines[0]
    failed = build.job("rootfs:debian-bookworm-amd64")
    assert failed["status"] == "failed" and "host key refused" in failed["error"]
    assert not list(a.workdir.glob("factory-*"))
    # Nothing was run there: the refusal came before any login.
    assert "Accepted publickey" not in (a.root / "sshd.log").read_text()


SHELLY_PATH = "/debian/(echo)*{a,b}?[!x]#~"
RELEASE = b"Origin: test\nSuite: any\nDate: Sat, 11 Jul 2026 10:16:37 UTC\n"


class _AnyRelease(http.server.BaseHTTPRequestHandler):
    """Answers every GET with one Release file: the archive state of any suite."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(RELEASE)))
        self.end_headers()
        self.wfile.write(RELEASE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def release_server() -> Iterator[str]:
    """An HTTP server on loopback that serves Release files; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnyRelease)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_matrix_values_reach_the_worker_only_as_data(
    tmp_path: Path, hosts: dict[str, Sshd], release_server: str
) -> None:
    """A mirror URL full of shell syntax (the schema allows these characters in a URL) is
    sent as JSON on the worker's stdin; the remote command line is `COMMAND worker`.
    The URL's archive is read (from a loopback server) before the run, as every run
    does; its tree is already in the host's cache, so apt never uses it."""
    shelly = release_server + SHELLY_PATH
    a = hosts["a"]
    logged = tmp_path / "bin/factory-logged"
    logged.parent.mkdir()
    logged.write_text(
        f"#!{sys.executable}\n"
        "# Records its command line and its stdin, and passes stdin on to the real factory.\n"
        "import os, subprocess, sys, threading\n"
        f"open({str(tmp_path / 'argv')!r}, 'w').write(chr(10).join(sys.argv[1:]) + chr(10))\n"
        f"worker = subprocess.Popen([{str(WORKER)!r}, *sys.argv[1:]], stdin=subprocess.PIPE)\n"
        "threading.Thread(target=lambda: os._exit(worker.wait()), daemon=True).start()\n"
        f"with open({str(tmp_path / 'stdin')!r}, 'wb') as log:\n"
        "    for line in sys.stdin.buffer:\n"
        "        log.write(line); log.flush()\n"
        "        worker.stdin.write(line); worker.stdin.flush()\n"
        "worker.stdin.close()\n"
        "sys.exit(worker.wait())\n"
    )
    logged.chmod(0o755)
    plain = write_matrix(
        tmp_path, AMD64.format(name="data", formats='["tar"]', fallback="none")
    ).rename(tmp_path / "plain.toml")
    matrix = write_matrix(
        tmp_path,
        AMD64.format(name="data", formats='["tar"]', fallback="none")
        + f"\n[mirrors]\ndebian = {json.dumps(shelly)}\n\n"
        + a.toml(["amd64"], known_hosts(tmp_path, a), command=str(logged)),
    )
    seed(a, matrix, like=plain)
    build = run_matrix(matrix, tmp_path / "out")
    assert build.returncode == 0, build.stderr[-3000:] + json.dumps(build.report, indent=1)
    check_artifacts(build)
    assert hosts_of(build, "debian-bookworm-amd64") == {"a"}
    assert (tmp_path / "argv").read_text() == "worker\n"
    request = json.loads((tmp_path / "stdin").read_text().splitlines()[0])
    (rootfs,) = [j for j in request["plan"]["jobs"] if j["kind"] == "rootfs"]
    assert rootfs["params"]["mirror"] == shelly
    assert shelly not in (a.root / "sshd.log").read_text()


def test_worker_refuses_a_changed_plan(tmp_path: Path) -> None:
    """The worker checks every key against its parameters: data that changed on the way
    is refused, not built."""
    matrix = write_matrix(tmp_path, AMD64.format(name="w", formats='["tar"]', fallback="none"))
    from factory.plan import make_plan
    from factory.spec import load_matrix

    plan = make_plan(load_matrix(matrix)).model_dump(mode="json")
    plan["jobs"][0]["params"]["mirror"] = "http://elsewhere.invalid/debian"
    request = {
        "protocol": PROTOCOL, "plan": plan, "dir": str(tmp_path / "w"), "cache": str(tmp_path)
    }  # fmt: skip
    done = subprocess.run(
        [*FACTORY, "worker"],
        input=json.dumps(request) + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    (event,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert event["kind"] == "run-end" and event["data"]["status"] == "refused"
    assert "key does not match" in event["message"]


# The controller, with its SSH transport's fetch flipping the first byte of every file it
# copies: what a corruption on the wire (or a bad disk here) would leave.
CORRUPTING = """\
import sys

from factory import cli
from factory.executors import ssh

fetch = ssh.SshChannel.fetch


async def corrupted(self, path, dest, size, extents):
    await fetch(self, path, dest, size, extents)
    with open(dest, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))


ssh.SshChannel.fetch = corrupted
sys.argv[0] = "factory"
cli.main()
"""


def test_a_corrupted_copy_is_not_published(tmp_path: Path, hosts: dict[str, Sshd]) -> None:
    """The copy of a remote artifact must match the worker's sha256, or it is refused and
    nothing lands in OUT. Corrupting real TCP on loopback is not possible here (and SSH's
    own MAC would catch it), so the controller runs with its transport class patched: its
    SFTP fetch flips a byte of the copy after it is written, before the check."""
    a = hosts["a"]
    matrix = write_matrix(
        tmp_path,
        AMD64.format(name="corrupt", formats='["tar"]', fallback="none")
        + a.toml(["amd64"], known_hosts(tmp_path, a)),
    )
    seed(a, matrix)
    controller = tmp_path / "corrupting.py"
    controller.write_text(CORRUPTING)
    out = tmp_path / "out"
    args = ["run", str(matrix), "--out", str(out), "--cache", str(CACHE), "--events", "json"]
    done = subprocess.run(
        [sys.executable, str(controller), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
        check=False,
    )
    report = json.loads((out / "report.json").read_text())
    build = Build(out, done.returncode, done.stderr, [], report)
    assert build.returncode == 1, build.stderr[-3000:]
    publish = build.job("publish:debian-bookworm-amd64:tar")
    assert publish["status"] == "failed" and publish["host"] == "a", publish
    assert re.fullmatch(
        r"\S+\.tar: sha256 [0-9a-f]{64} of the copy from a is not the worker's [0-9a-f]{64} "
        r"\(corrupted in transit; not published\)",
        publish["error"],
    ), publish["error"]
    assert report["artifacts"] == []
    cell = out / "debian-bookworm-amd64"
    assert not [p.name for p in cell.iterdir() if ".tar" in p.name], list(cell.iterdir())
    # The jobs on the host did their part: only the copy was refused.
    assert build.job("pack:debian-bookworm-amd64:tar")["status"] == "done"
