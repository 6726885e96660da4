"""The SSH farm, simulated honestly: many build hosts on 127.0.0.1, factory's real controller.

Each fake host is an in-process asyncssh server (its own host key, key-only login, a line
in one known_hosts file) that speaks the real SSH protocol. Its `COMMAND worker` reads the
real `protocol.Request` from stdin, waits for the real `Go` lines, and streams the real
event protocol as factory/worker.py does (run-start; per job start, progress, done with its
info, its log and a finalise's manifest; a fetched job's `RemoteFile`; run-end), after a
short sleep per job instead of the work. Its files (the job logs, the manifest, the
artifact) are written in a per-host folder that is also the chroot of its real SFTP
server, where the controller fetches the artifacts.

The controller runs in a process of its own (so its CPU seconds and peak memory are its
own): `runner.run_plan` of a generated matrix (N releases x arches, tar only) whose
`[[hosts]]` are the fake hosts, i.e. routing, placement, the SSH transport, the scheduler,
publish, report.json, SBOMs, exactly as `factory run`. This process reads its events
(`--events json`) and, once part of the jobs are done, drops some hosts that are
running work: "closed" hosts have their connections cut, "hung" ones stop reading and
answering (connection open; the controller's keepalive must notice). Then it checks OUT.

    python -m tests.farm [--hosts 50] [--cells 500] [--drop 5]     prints the figures

scripts/bench --farm-only runs it; tests/unit/test_farm.py runs a small one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncssh

from factory.events import Event
from factory.executors.protocol import Go, Malformed, RemoteFile, Request
from factory.scheduler import log_name

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
COMMAND = "factory"  # the hosts' `command`: the controller runs "factory worker"
WORKDIR = "/work"  # the hosts' workdir, inside each host's SFTP chroot
ARCHES = ("amd64", "arm64")
# How long a fake worker takes per job kind, in seconds: the ideal wall is built from these.
SECONDS = {"rootfs": 0.2, "finalise": 0.1, "pack": 0.1}
# The controller's keepalive interval for short simulations (the test): a hung host is lost
# after about 4 intervals. None keeps factory's own (5 s), as scripts/bench does.
KEEPALIVE = 1.0


# --- the fake hosts --------------------------------------------------------------------------


@dataclass
class FakeHost:
    """One build host: its SSH server, its folder (the SFTP chroot) and what it did."""

    name: str
    root: Path
    key: asyncssh.SSHKey
    port: int = 0
    mode: str = "up"  # up | closed | hung
    acceptor: asyncssh.SSHAcceptor | None = None
    conns: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    running: int = 0  # jobs between start and done right now
    workers: int = 0  # worker sessions started
    pending: int = 0  # jobs of live worker sessions not done yet
    live: int = 0  # worker sessions alive now
    peak: int = 0  # the most alive at once
    done: Counter[str] = field(default_factory=Counter)  # job id -> done events sent
    stalled: asyncio.Event = field(default_factory=asyncio.Event)

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.key.export_public_key().decode().strip()}\n"

    def drop(self, mode: str) -> None:
        """closed: every connection cut at once. hung: nothing read or sent any more, the
        connections left open (a frozen machine, or a network that drops packets)."""
        self.mode = mode
        self.stalled.set()
        for conn in list(self.conns):
            if mode == "closed":
                conn.abort()
            else:
                transport = getattr(conn, "_transport", None)
                if transport is not None:
                    transport.pause_reading()


class _Server(asyncssh.SSHServer):
    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.host.conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.host.conns.discard(self.conn)


def _event(kind: str, job: Any = None, message: str = "", **data: Any) -> str:
    return (
        Event(
            kind,  # type: ignore[arg-type]
            job=job.id if job else None,
            job_kind=job.kind if job else None,
            cell=job.cell if job else None,
            message=message,
            data=data,
        ).to_json()
        + "\n"
    )


async def _worker(host: FakeHost, process: asyncssh.SSHServerProcess[str]) -> None:
    """`factory worker`, quickly: the real request and go lines in, the real events out."""
    if process.command != f"{COMMAND} worker":
        process.stderr.write(f"unknown command {process.command!r}\n")
        process.exit(127)
        return
    host.workers += 1
    host.live += 1
    host.peak = max(host.peak, host.live)
    task = asyncio.current_task()
    assert task is not None
    host.tasks.add(task)
    try:
        await _serve(host, process)
    finally:
        host.live -= 1
        host.tasks.discard(task)


async def _serve(host: FakeHost, process: asyncssh.SSHServerProcess[str]) -> None:
    out = process.stdout

    def send(line: str) -> None:
        if host.mode == "up":
            with contextlib.suppress(OSError, asyncssh.Error):
                out.write(line)

    try:
        req = Request.parse(await process.stdin.readline())
    except Malformed as exc:
        send(_event("run-end", message=str(exc), status="refused"))
        process.exit(2)
        return
    folder = host.root / req.dir.lstrip("/")
    (folder / "out" / "logs").mkdir(parents=True, exist_ok=True)
    jobs = {j.id: j for j in req.plan.jobs}
    gates = {jid: asyncio.Event() for jid in jobs}
    finished = {jid: asyncio.Event() for jid in jobs}
    for jid in req.auto:
        gates[jid].set()
    host.pending += len(jobs)
    send(_event("run-start", matrix=req.plan.matrix, jobs=len(jobs)))

    async def run(jid: str) -> None:
        job = jobs[jid]
        for dep in job.deps:
            await finished[dep].wait()
        await gates[jid].wait()
        if host.mode != "up":
            return
        send(_event("start", job))
        host.running += 1
        t0 = time.monotonic()
        try:
            send(_event("progress", job, "working"))
            await asyncio.sleep(SECONDS.get(job.kind, 0.05))
            if host.mode != "up":
                return  # a dropped host says nothing more
            name = jid.replace(":", "_")
            log = f"# {jid} on {host.name}\n"
            (folder / "out" / "logs" / log_name(jid)).write_text(log)  # where the scheduler's is
            texts = {"log": log}  # as worker.WithTexts sends them
            info: dict[str, Any] = {"cached": True}
            if job.kind == "finalise":
                manifest = folder / "out" / job.params["manifest"]
                manifest.parent.mkdir(parents=True, exist_ok=True)
                rows = [{"package": "base-files", "version": "12.4", "arch": job.arch}]
                manifest.write_text(json.dumps(rows))
                info["manifest"] = job.params["manifest"]
                texts["manifest_text"] = json.dumps(rows)
            if jid in req.fetch:
                artifact = folder / "out" / ".work" / f"{name}.tar"
                artifact.parent.mkdir(parents=True, exist_ok=True)
                data = f"{job.cell} {jid} {job.key} built on {host.name}\n".encode() * 64
                artifact.write_bytes(data)
                info = {"format": job.params.get("format")}
                info["remote"] = RemoteFile(
                    path=f"/{artifact.relative_to(host.root)}",
                    size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    extents=((0, len(data)),),
                ).model_dump(mode="json")
            host.done[jid] += 1
            host.pending -= 1
            seconds = round(time.monotonic() - t0, 3)
            send(_event("done", job, seconds=seconds, info=info, **texts))
            finished[jid].set()
        finally:
            host.running -= 1

    async def controller() -> None:
        while True:
            line = await process.stdin.readline()
            if not line:
                return  # EOF: the controller is done with us
            if line.strip():
                gates[Go.parse(line, gates).go].set()

    tasks = [asyncio.create_task(run(jid)) for jid in jobs]

    async def ended() -> None:
        await asyncio.gather(*tasks)
        if all(f.is_set() for f in finished.values()):
            send(_event("run-end", status="built"))

    end = asyncio.create_task(ended())
    reader = asyncio.create_task(controller())
    stalled = asyncio.create_task(host.stalled.wait())
    try:
        await asyncio.wait({reader, stalled}, return_when=asyncio.FIRST_COMPLETED)
        if host.mode == "hung":
            await asyncio.Event().wait()  # answers nothing, until the simulation ends
    finally:
        host.pending -= sum(not f.is_set() for f in finished.values())
        for t in (*tasks, end, reader, stalled):
            t.cancel()
        shutil.rmtree(folder, ignore_errors=True)
        if host.mode == "up":
            process.exit(0)


@contextlib.asynccontextmanager
async def hosts(base: Path, count: int, client: asyncssh.SSHKey) -> AsyncIterator[list[FakeHost]]:
    """`count` SSH servers on 127.0.0.1, each with its folder under `base`; stopped (every
    connection cut, every worker task cancelled) on exit."""
    base.mkdir(parents=True, exist_ok=True)
    authorized = base / "authorized_keys"
    authorized.write_text(client.export_public_key().decode())
    made: list[FakeHost] = []
    try:
        for i in range(count):
            key = asyncssh.generate_private_key("ssh-ed25519")
            host = FakeHost(f"h{i:02d}", base / f"h{i:02d}", key)
            (host.root / WORKDIR.lstrip("/")).mkdir(parents=True)
            made.append(host)
            chroot = str(host.root).encode()
            host.acceptor = await asyncssh.create_server(
                lambda h=host: _Server(h),  # type: ignore[misc]
                "127.0.0.1",
                0,
                server_host_keys=[key],
                authorized_client_keys=str(authorized),
                process_factory=lambda p, h=host: _worker(h, p),  # type: ignore[misc]
                sftp_factory=lambda chan, c=chroot: asyncssh.SFTPServer(chan, chroot=c),  # type: ignore[misc]
                encoding="utf-8",
            )
            host.port = host.acceptor.sockets[0].getsockname()[1]
        yield made
    finally:
        for host in made:
            host.mode = "closed"
            for task in list(host.tasks):
                task.cancel()
            for conn in list(host.conns):
                conn.abort()
            if host.acceptor is not None:
                host.acceptor.close()
                await host.acceptor.wait_closed()


# --- the controller (its own process) --------------------------------------------------------


def matrix_of(config: dict[str, Any]) -> Any:
    """The generated matrix: `cells` cells (releases x ARCHES), tar only, the fake hosts."""
    from factory.spec import Matrix

    releases = -(-config["cells"] // len(ARCHES))
    cells = [(f"r{i:03d}", a) for i in range(releases) for a in ARCHES][: config["cells"]]
    extra = [(r, a) for r in (f"r{i:03d}" for i in range(releases)) for a in ARCHES]
    exclude = [{"distro": f"debian/{r}", "arch": a} for r, a in extra if (r, a) not in cells]
    return Matrix.model_validate(
        {
            # A file that exists: the report names the matrix's digest (of this config).
            "path": config["config"],
            "name": "farm",
            "arches": list(ARCHES),
            "distros": [f"debian/r{i:03d}" for i in range(releases)],
            "formats": ["tar"],
            "exclude": exclude,
            "fallback": "none",
            "hosts": [
                {
                    "name": h["name"],
                    "address": "127.0.0.1",
                    "port": h["port"],
                    "key": config["client_key"],
                    "known_hosts": config["known_hosts"],
                    "arches": list(ARCHES),
                    "jobs": config["slots"],
                    "command": COMMAND,
                    "workdir": WORKDIR,
                    "cache": "/cache",
                }
                for h in config["hosts"]
            ],
        }
    )


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def controller(config_path: Path) -> int:
    """The controller's process: plan the generated matrix and run it as `factory run` does,
    events as JSON lines on stdout; its own figures into config["figures"]."""
    config = json.loads(config_path.read_text())
    from factory import runner
    from factory.executors import ssh
    from factory.plan import make_plan

    if config["keepalive"]:
        ssh.KEEPALIVE_INTERVAL = config["keepalive"]  # shortened: see KEEPALIVE
    t0, cpu0 = time.monotonic(), time.process_time()
    matrix = matrix_of(config)
    plan = make_plan(matrix)
    planned_cpu = time.process_time() - cpu0
    base_rss = rss_mib()
    record: dict[str, float] = {}
    real_record = runner._record

    async def timed_record(*args: Any, **kwargs: Any) -> None:
        c, t = time.process_time(), time.monotonic()
        try:
            await real_record(*args, **kwargs)
        finally:
            record["cpu"], record["wall"] = time.process_time() - c, time.monotonic() - t

    runner._record = timed_record  # type: ignore[assignment]
    gc.collect()  # as `factory run` does once it has planned (cli.run)
    gc.freeze()
    opts = runner.Options(
        out=Path(config["out"]), cache=Path(config["cache"]), jobs=2, events="json"
    )
    cpu1, t1, sys1 = time.process_time(), time.monotonic(), os.times().system
    profile = cProfile.Profile() if config.get("profile") else None
    if profile is not None:
        profile.enable()
    code = anyio.run(runner.run_plan, matrix, plan, opts)
    if profile is not None:
        profile.disable()
        profile.dump_stats(config["profile"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {
        "exit": code,
        "jobs": len(plan.jobs),
        "cells": len(plan.cells()),
        "plan_cpu": planned_cpu,
        "run_cpu": time.process_time() - cpu1,
        "run_wall": time.monotonic() - t1,
        "record_cpu": record.get("cpu", 0.0),
        "record_wall": record.get("wall", 0.0),
        "total_wall": time.monotonic() - t0,
        "base_rss_mib": base_rss,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "run_sys_cpu": os.times().system - sys1,  # the kernel's part of run_cpu
    }
    Path(config["figures"]).write_text(json.dumps(figures))
    return 0


# --- the simulation --------------------------------------------------------------------------


@dataclass
class Result:
    """What a simulation saw: the controller's figures and what OUT holds."""

    figures: dict[str, Any]
    hosts: int
    dropped: dict[str, str]  # host -> closed | hung
    drop_after: float  # seconds from the controller's start to the drop
    published: Counter[str]  # publish job -> done events in the controller's stream
    artifacts: list[str]  # the *.tar files in OUT
    expected: list[str]  # one per cell of the plan
    strays: list[str]  # files in OUT that no run should leave there
    sums_ok: bool  # SHA256SUMS lists exactly the artifacts, with their sha256
    report: dict[str, Any]
    retries: list[dict[str, Any]]  # each job record's retries, with the job's own host
    problems: list[str]  # what is wrong, in words (empty: all is well)
    stderr: str
    ideal: float
    slots: int = 0  # the fake work's lower bound on the wall time

    @property
    def ok(self) -> bool:
        return not self.problems


async def simulate(
    n_hosts: int = 50,
    cells: int = 500,
    drop: int = 5,
    *,
    slots: int = 2,
    drop_at: float = 0.3,
    keepalive: float | None = KEEPALIVE,
    modes: tuple[str, ...] = ("closed", "hung"),
    base: Path | None = None,
    profile: Path | None = None,
    keep: bool = False,
) -> Result:
    """Run the controller against `n_hosts` fake hosts building `cells` cells; when
    `drop_at` of the jobs are done, drop `drop` hosts that are running work (their
    mode taken in turn from `modes`). Returns what happened; nothing is asserted here."""
    tmp = Path(tempfile.mkdtemp(prefix="factory-farm-", dir=base))
    try:
        return await _simulate(tmp, n_hosts, cells, drop, slots, drop_at, keepalive, modes, profile)
    finally:
        if keep:
            print(f"farm: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def _simulate(
    tmp: Path,
    n_hosts: int,
    cells: int,
    drop: int,
    slots: int,
    drop_at: float,
    keepalive: float | None,
    modes: tuple[str, ...],
    profile: Path | None,
) -> Result:
    client = asyncssh.generate_private_key("ssh-ed25519")
    client_key = tmp / "id_ed25519"
    client.write_private_key(str(client_key))
    out, figures_path = tmp / "out", tmp / "figures.json"
    async with hosts(tmp / "hosts", n_hosts, client) as farm:
        known = tmp / "known_hosts"
        known.write_text("".join(h.known_hosts_line() for h in farm))
        config = {
            "cells": cells,
            "slots": slots,
            "keepalive": keepalive,
            "client_key": str(client_key),
            "known_hosts": str(known),
            "hosts": [{"name": h.name, "port": h.port} for h in farm],
            "out": str(out),
            "cache": str(tmp / "cache"),
            "figures": str(figures_path),
            "config": str(tmp / "config.json"),
            "profile": str(profile) if profile else None,
        }
        config_path = tmp / "config.json"
        config_path.write_text(json.dumps(config))
        env = {
            **os.environ,
            "FACTORY_STATE_DIR": str(tmp / "state"),
            "FACTORY_LOCK_DIR": str(tmp / "locks"),
        }
        python = str(PYTHON if PYTHON.exists() else sys.executable)
        published: Counter[str] = Counter()
        dropped: dict[str, str] = {}
        started = time.monotonic()
        drop_after = 0.0
        done = 0  # jobs done, of 4 per cell
        cpu0, busy0 = time.process_time(), busy_seconds()
        async with await anyio.open_process(
            [python, "-m", "tests.farm", "--controller", str(config_path)],
            cwd=ROOT,
            env=env,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            errors: list[bytes] = []

            async def drain() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    errors.append(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                buf = b""
                async for chunk in proc.stdout:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        event = json.loads(line)
                        if event["kind"] != "done":
                            continue
                        done += 1
                        if event["job_kind"] == "publish":
                            published[event["job"]] += 1
                        if len(dropped) < drop and done >= drop_at * 4 * cells:
                            # Hosts with a cell in progress, so that each drop loses work.
                            for host in [h for h in farm if h.pending and h.mode == "up"]:
                                if len(dropped) < drop:
                                    dropped[host.name] = modes[len(dropped) % len(modes)]
                                    host.drop(dropped[host.name])
                                    drop_after = time.monotonic() - started
            await proc.wait()
        stderr = b"".join(errors).decode(errors="replace")
        servers_cpu = time.process_time() - cpu0
        busy = busy_seconds() - busy0
    figures = json.loads(figures_path.read_text()) if figures_path.exists() else {}
    figures["workers"] = sum(h.workers for h in farm)
    figures["servers_cpu"] = servers_cpu
    figures["peak_sessions"] = max((h.peak for h in farm), default=0)
    figures["others_cpu"] = max(0.0, busy - servers_cpu - figures.get("run_cpu", 0.0))
    # Session folders left on hosts that stayed up (a dropped host's stay: the next worker
    # there removes them).
    left = [
        str(p.relative_to(tmp))
        for h in farm
        if h.mode == "up"
        for p in (h.root / WORKDIR.lstrip("/")).iterdir()
    ]
    result = _check(out, figures, n_hosts, cells, dropped, drop_after, published, stderr, slots)
    if len(dropped) < drop:
        result.problems.append(f"dropped {len(dropped)} hosts, not {drop}: none had work")
    if left:
        result.problems.append(f"session folders left on hosts that stayed up: {left[:3]}")
    return result


EXPECTED_PER_CELL = (".tar", ".tar.sha256", ".manifest.json", ".spdx.json")


def _check(
    out: Path,
    figures: dict[str, Any],
    n_hosts: int,
    cells: int,
    dropped: dict[str, str],
    drop_after: float,
    published: Counter[str],
    stderr: str,
    slots: int,
) -> Result:
    problems: list[str] = []
    report: dict[str, Any] = {}
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"no report.json: {exc}")
    cell_ids = sorted({j["cell"] for j in report.get("jobs", [])})
    expected = sorted(f"{c}/{c}.tar" for c in cell_ids)
    if len(cell_ids) != cells:
        problems.append(f"report.json has {len(cell_ids)} cells, not {cells}")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    artifacts = [f for f in files if f.endswith(".tar")]
    allowed = {f"{c}/{c}{suffix}" for c in cell_ids for suffix in EXPECTED_PER_CELL}
    allowed |= {"report.json", "report.html", "SHA256SUMS", "CHANGES.md"}
    strays = [f for f in files if f not in allowed and not f.startswith("logs/")]
    if artifacts != expected:
        missing = sorted(set(expected) - set(artifacts))
        problems.append(f"OUT's artifacts are not one per cell (missing: {missing[:5]})")
    if strays:
        problems.append(f"OUT holds files no run should leave: {strays[:5]}")
    twice = [j for j, n in published.items() if n != 1]
    if twice or len(published) != len(cell_ids):
        problems.append(
            f"publish jobs done {len(published)} (of {len(cell_ids)}); more than once: {twice[:5]}"
        )
    sums: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (out / "SHA256SUMS").read_text().splitlines():
            digest, _, path = line.partition("  ")
            sums[path] = digest
    sums_ok = sorted(sums) == expected and all(
        (out / p).is_file() and hashlib.sha256((out / p).read_bytes()).hexdigest() == d
        for p, d in sums.items()
    )
    if not sums_ok:
        problems.append("SHA256SUMS does not list exactly the artifacts with their sha256")
    for path in artifacts:  # each names its own cell: nothing was swapped between cells
        cell = path.split("/")[0]
        if not (out / path).read_text().startswith(f"{cell} "):
            problems.append(f"{path} holds another cell's bytes")
    bad = [j["id"] for j in report.get("jobs", []) if j["status"] != "done"]
    if bad or report.get("status") != "built":
        problems.append(f"report.json: status {report.get('status')}, not done: {bad[:5]}")
    retries = [
        {"job": j["id"], "host": j["host"], "retries": j["info"]["retries"]}
        for j in report.get("jobs", [])
        if j.get("info", {}).get("retries")
    ]
    named = {r["host"] for rec in retries for r in rec["retries"]}
    if set(dropped) - named:
        problems.append(f"report.json names no retry from {sorted(set(dropped) - named)}")
    for rec in retries:
        last = rec["retries"][-1]
        if last.get("then") != rec["host"] or last["host"] in (rec["host"], None):
            problems.append(f"report.json: {rec['job']}: retries {rec['retries']} end elsewhere")
            break
    if figures.get("exit") != 0:
        problems.append(f"the controller exited {figures.get('exit')}: {stderr[-2000:]}")
    per_cell = sum(SECONDS.values())
    ideal = max(per_cell, per_cell * cells / (n_hosts * slots))
    return Result(
        figures, n_hosts, dropped, drop_after, published, artifacts, expected, strays,
        sums_ok, report, retries, problems, stderr, ideal, slots,
    )  # fmt: skip


def describe(r: Result) -> list[str]:
    """The figures for people (scripts/bench prints these)."""
    f = r.figures
    jobs = f.get("jobs", 0) or 1
    sched_cpu = f.get("run_cpu", 0.0) - f.get("record_cpu", 0.0)
    lost = ", ".join(f"{h} {m}" for h, m in sorted(r.dropped.items()))
    return [
        f"farm: {r.hosts} hosts, {f.get('cells')} cells, {f.get('jobs')} jobs "
        f"(rootfs, finalise, pack tar, publish tar per cell); dropped after "
        f"{r.drop_after:.1f} s: {lost or 'none'}",
        f"  wall {f.get('run_wall', 0):.1f} s (report, SBOMs and sums {f.get('record_wall', 0):.1f}"
        f" s of it); ideal {r.ideal:.1f} s (the fake workers' own time over every slot)",
        f"  controller CPU {f.get('run_cpu', 0):.1f} s: {1000 * f.get('run_cpu', 0) / jobs:.2f} "
        f"ms per job; scheduling alone (without the report) {1000 * sched_cpu / jobs:.2f} "
        f"ms per job; planning {f.get('plan_cpu', 0):.1f} s; in the kernel "
        f"{f.get('run_sys_cpu', 0):.1f} s of the run's",
        f"  the hosts' process ({r.hosts} SSH servers and fake workers) CPU "
        f"{f.get('servers_cpu', 0):.1f} s; other processes on the machine meanwhile "
        f"{f.get('others_cpu', 0):.1f} CPU s",
        f"  controller peak RSS {f.get('peak_rss_mib', 0):.0f} MiB (after imports and "
        f"planning {f.get('base_rss_mib', 0):.0f} MiB)",
        f"  worker sessions {f.get('workers')} for {f.get('cells')} cells; at most "
        f"{f.get('peak_sessions')} alive at once on one host ({r.slots} slots)",
        f"  OUT: {len(r.artifacts)} artifacts for {len(r.expected)} cells, "
        f"{sum(r.published.values())} publish done events, SHA256SUMS "
        f"{'checks' if r.sums_ok else 'WRONG'}, strays {len(r.strays)}",
        f"  report.json: {len(r.retries)} jobs name retries, from "
        f"{', '.join(sorted({x['host'] for rec in r.retries for x in rec['retries']})) or '-'}",
        f"  {'exactly once: yes' if r.ok else 'PROBLEMS: ' + '; '.join(r.problems)}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--drop", type=int, default=5)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument(
        "--keepalive", type=float, help="the controller's keepalive interval (default factory's)"
    )
    parser.add_argument("--json", type=Path, help="the figures and problems into this file too")
    parser.add_argument("--profile", type=Path, help="cProfile the controller into this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--controller", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.controller:
        return controller(opts.controller)
    result = anyio.run(
        lambda: simulate(
            opts.hosts,
            opts.cells,
            opts.drop,
            slots=opts.slots,
            keepalive=opts.keepalive,
            profile=opts.profile and opts.profile.resolve(),
            keep=opts.keep,
        )
    )
    print("\n".join(describe(result)))
    if opts.json:
        data = {
            **result.figures,
            "problems": result.problems,
            "dropped": result.dropped,
            "retries": len(result.retries),
            "ideal": result.ideal,
        }
        opts.json.write_text(json.dumps(data, indent=1))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
