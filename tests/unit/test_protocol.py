"""The controller-worker wire (executors/protocol.py), and placement over a transport that
is not SSH: a malformed line on either end is one clear line, never a traceback, and
placement needs nothing from a transport but the Link/Channel interface."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from factory.events import Bus, Event
from factory.executors import placement
from factory.executors.placement import Channel, HostLost, Link
from factory.executors.protocol import (
    INLINE_TEXT,
    PROTOCOL,
    Go,
    Malformed,
    RemoteFile,
    Request,
    parse_event,
    remote_file,
)
from factory.plan import Job, job_key, make_plan
from factory.results import Output, StageError
from factory.scheduler import JobRun, Scheduler, log_name
from factory.spec import Host, Matrix
from factory.worker import Refused, WithTexts, read_request
from tests.conftest import ROOT

WORKER = ROOT / ".venv/bin/factory"
CELL = "debian-bookworm-ppc64el"


def matrix(hosts: Sequence[str] = ("a", "b")) -> Matrix:
    return Matrix.model_validate(
        {
            "name": "t",
            "arches": ["ppc64el"],
            "distros": ["debian/bookworm"],
            "formats": ["tar"],
            "fallback": "none",
            "hosts": [
                {
                    "name": name,
                    "address": "192.0.2.1",  # never contacted: the transport is a fake
                    "arches": ["ppc64el"],
                    "known_hosts": "/nonexistent",
                }
                for name in hosts
            ],
        }
    )


def request_line(**change: Any) -> str:
    plan = make_plan(matrix())
    first = plan.jobs[0].id
    data = json.loads(Request(plan=plan, dir="/w/f", cache="/c", auto=(first,)).line())
    data.update(change)
    return json.dumps(data)


# --- the request -----------------------------------------------------------------------------


def test_a_request_goes_through_the_wire_unchanged() -> None:
    plan = make_plan(matrix())
    sent = Request(plan=plan, dir="/w/f", cache="/c", refresh=True, fetch=(plan.jobs[2].id,))
    line = sent.line()
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line)["protocol"] == PROTOCOL
    assert Request.parse(line) == sent


BAD_REQUESTS = [
    ("{not json", "the request is not JSON"),
    ('["a list"]', f"protocol None is not this worker's {PROTOCOL}"),
    (
        request_line(protocol=PROTOCOL + 1),
        f"protocol {PROTOCOL + 1} is not this worker's {PROTOCOL} (install the same factory",
    ),
    (request_line(protocol=str(PROTOCOL)), f"protocol '{PROTOCOL}' is not this worker's"),
    (request_line(plan={"matrix": "t"}), "field plan.jobs: Field required"),
    (request_line(plan={"matrix": "t", "jobs": [{"id": "x"}]}), "field plan.jobs.0.kind:"),
    (request_line(dir="relative/folder"), "field dir: 'relative/folder' is not an absolute"),
    (request_line(cache="/a\0b"), "field cache: '/a\\x00b' is not an absolute path"),
    (request_line(auto=["rootfs:nope"]), "field auto: 'rootfs:nope' is not a job of the plan"),
    (request_line(fetch=["pack:nope"]), "field fetch: 'pack:nope' is not a job of the plan"),
    (request_line(refresh="yes"), "field refresh: Input should be a valid boolean (got 'yes')"),
    (request_line(auto="rootfs"), "field auto: Input should be a valid tuple"),
    (request_line(shell="rm -rf /"), "field shell: unknown field"),
]


@pytest.mark.parametrize(("line", "says"), BAD_REQUESTS)
def test_a_malformed_request_is_one_clear_line(line: str, says: str) -> None:
    with pytest.raises(Malformed) as caught:
        Request.parse(line)
    message = str(caught.value)
    assert says in message, message
    assert "\n" not in message and "Traceback" not in message


def test_a_go_line_names_a_job_of_the_plan() -> None:
    jobs = {"rootfs:x"}
    assert Go.parse(Go(go="rootfs:x").line(), jobs).go == "rootfs:x"
    for line, says in [
        ('{"go": 1}', "malformed go line: field go: Input should be a valid string (got 1)"),
        ("go!", "malformed go line: not JSON"),
        ('{"go": "rootfs:x", "now": true}', "malformed go line: field now: unknown field"),
        ('{"go": "pack:y"}', "go for 'pack:y', which is not a job of the plan"),
    ]:
        with pytest.raises(Malformed) as caught:
            Go.parse(line, jobs)
        assert str(caught.value).startswith("the controller sent ") and says in str(caught.value)


def test_params_that_do_not_fit_their_stage_are_refused_in_one_line(tmp_path: Path) -> None:
    """validate_params: the stage registry's Params, then the keys and hook digests."""
    plan = make_plan(matrix())
    jobs = plan.by_id()
    finalise = jobs[f"finalise:{CELL}"]
    for hooks, says in [
        ([{"name": "h"}], f"finalise:{CELL}: malformed params: hooks.0"),
        ([{"name": "h", "path": str(tmp_path), "digest": "x"}], "hook h arrived different"),
    ]:
        params = {**finalise.params, "hooks": hooks}
        key = job_key("finalise", params, [jobs[d].key for d in finalise.deps])
        changed = finalise.model_copy(update={"params": params, "key": key})
        bad = plan.model_copy(
            update={"jobs": tuple(changed if j.id == changed.id else j for j in plan.jobs)}
        )
        with pytest.raises(Refused) as caught:
            read_request(Request(plan=bad, dir="/d", cache="/c").line())
        assert says in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_the_real_worker_refuses_a_malformed_request_in_one_line() -> None:
    """`factory worker` itself: the refusal is its only output, and no traceback."""
    if not WORKER.exists():
        pytest.skip(f"{WORKER} is not installed (scripts/setup)")
    for line, says in [
        ("{not json", "the request is not JSON"),
        (request_line(dir="relative"), "field dir: 'relative' is not an absolute path"),
        (request_line(protocol=PROTOCOL + 1), f"protocol {PROTOCOL + 1} is not this worker's"),
    ]:
        done = subprocess.run(
            [str(WORKER), "worker"],
            input=line + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.strip() == "", done.stderr
        (out,) = done.stdout.splitlines()
        event = Event.from_json(out)
        assert event.kind == "run-end" and event.data == {"status": "refused"}
        assert says in event.message and "\n" not in event.message, event.message


# --- events ----------------------------------------------------------------------------------

SUM = "0" * 64


def done_line(remote: Any) -> str:
    return json.dumps({"kind": "done", "job": "pack:x", "data": {"info": {"remote": remote}}})


def test_an_event_goes_through_the_wire_unchanged() -> None:
    remote = RemoteFile(path="/w/f/out/x.tar", size=10, sha256=SUM, extents=[(0, 4)])
    event = Event("done", job="pack:x", host=None, data={"info": {"remote": remote.model_dump()}})
    got = parse_event(event.to_json(), "h")
    assert got == Event.from_json(event.to_json())
    assert remote_file(got.data["info"]) == remote
    # No extents (or a list that does not fit the file) means: read the whole file.
    whole = parse_event(done_line({"path": "/f", "size": 10, "sha256": SUM}), "h")
    assert (found := remote_file(whole.data["info"])) and found.extents == ((0, 10),)


BAD_EVENTS = [
    ("{nope", "not JSON ("),
    ('["done"]', "Input should be an object"),
    ('{"kind": "finished"}', "field kind: Input should be 'run-start', 'start'"),
    ('{"job": "x"}', "field kind: Field required"),
    ('{"kind": "done", "job": 3}', "field job: Input should be a valid string (got 3)"),
    ('{"kind": "done", "host": ["a"]}', "field host: Input should be a valid string"),
    ('{"kind": "progress", "message": null}', "field message: Input should be a valid string"),
    ('{"kind": "done", "data": []}', "field data: Input should be an object"),
    ('{"kind": "done", "time": "now"}', "field time: Input should be a valid number"),
    ('{"kind": "done", "time": NaN}', "field time: "),
    ('{"kind": "done", "cell": "c", "extra": 1}', "field extra: unknown field"),
    ('{"kind": "done", "data": {"info": "x"}}', "field data.info: "),
    ('{"kind": "failed", "data": {"tail": "x"}}', "field data.tail: Input should be a valid list"),
    ('{"kind": "run-end", "data": {}}', "field data.status: Field required"),
    (done_line({"path": "rel", "size": 1, "sha256": SUM}), "field data.info.remote.path: 'rel'"),
    (done_line({"path": "/f", "size": -1, "sha256": SUM}), "field data.info.remote.size: "),
    (done_line({"path": "/f", "size": "1", "sha256": SUM}), "field data.info.remote.size: "),
    (done_line({"path": "/f", "size": 1, "sha256": "abc"}), "field data.info.remote.sha256: "),
    (done_line({"path": "/f", "size": 1}), "field data.info.remote.sha256: Field required"),
    (done_line({"path": "/f", "size": 1, "sha256": SUM, "mode": 1}), "remote.mode: unknown"),
    ('{"kind": "done", "data": {"log": 3}}', "field data.log: Input should be a valid string"),
    ('{"kind": "failed", "data": {"log": ["x"]}}', "field data.log: Input should be a valid str"),
    ('{"kind": "done", "data": {"manifest_text": 1}}', "field data.manifest_text: Input should"),
    (
        json.dumps({"kind": "done", "data": {"log": "x" * (INLINE_TEXT + 1)}}),
        "field data.log: String should have at most",
    ),
]


@pytest.mark.parametrize(("line", "says"), BAD_EVENTS)
def test_a_malformed_event_is_one_clear_line(line: str, says: str) -> None:
    with pytest.raises(Malformed) as caught:
        parse_event(line, "h")
    message = str(caught.value)
    assert message.startswith("worker on h sent a malformed event: "), message
    assert says in message, message
    assert "\n" not in message and "Traceback" not in message


# --- placement over a fake transport ---------------------------------------------------------


class FakeWorkspace:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.refresh = False
        self.loop = False


class FakeLocal:
    """The run's local executor: no job of these plans may run here."""

    host: str | None = None

    def __init__(self, out: Path) -> None:
        self.ws = FakeWorkspace(out)
        self.cpu = anyio.CapacityLimiter(2)

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return self.cpu

    async def run(
        self, job: Job, inputs: Mapping[str, Output], emit: Callable[[str], None]
    ) -> Output:
        raise AssertionError(f"{job.id} ran here")


class MemoryLink(Link):
    """A host in memory: its worker "runs" a job at its go line (at once for `auto`),
    streams the events a real worker would, and keeps its files in a dict. `dies_at`:
    the link drops when that kind of job is started there. `inline`: its events carry
    each job's log and manifest, as the real worker's do (else the controller reads them:
    `reads`)."""

    def __init__(self, host: Host, dies_at: str | None = None, inline: bool = True) -> None:
        super().__init__(host)
        self.dies_at = dies_at
        self.inline = inline
        self.requests: list[Request] = []
        self.started: list[str] = []
        self.reads: list[str] = []

    async def open(self) -> None:
        self.down = None

    async def aclose(self) -> None:
        self.down = self.down or "closed"

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Channel]:
        if self.down is not None:
            raise HostLost(f"{self.host.name}: {self.down}")
        yield MemoryChannel(self, f"/work/factory-{len(self.requests)}")


class MemoryChannel(Channel):
    def __init__(self, link: MemoryLink, folder: str) -> None:
        self.link = link
        self.folder = folder
        self.files: dict[str, bytes] = {}
        self.send_events, self.events = anyio.create_memory_object_stream[str](100)
        self.jobs: dict[str, Job] = {}
        self.fetch_ids: set[str] = set()

    async def put(self, local: Path, there: str) -> None:
        self.files[there] = b"hook"

    @contextlib.asynccontextmanager
    async def worker(self, request: Request) -> AsyncIterator[None]:
        request = Request.parse(request.line())  # what the worker would read
        self.link.requests.append(request)
        self.jobs = request.plan.by_id()
        self.fetch_ids = set(request.fetch)
        try:
            for jid in request.auto:
                self._run(jid)
            yield
        finally:
            self.send_events.close()

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            self.send_events.send_nowait(event.to_json() + "\n")

    def _run(self, jid: str) -> None:
        job = self.jobs[jid]
        if job.kind == self.link.dies_at:
            self.link.lost("connection lost (pulled the plug)")
            self.send_events.close()
            return
        self.link.started.append(jid)
        self._emit(Event("start", job=jid, cell=job.cell))
        self._emit(Event("progress", job=jid, message="working"))
        info: dict[str, Any] = {"ran": f"{jid} on {self.link.host.name}"}
        log = f"$ make {jid} on {self.link.host.name}\n"
        self.files[f"{self.folder}/out/logs/{log_name(jid)}"] = log.encode()
        texts = {"log": log} if self.link.inline else {}
        if job.kind == "finalise":
            info["manifest"] = f"{job.cell}/{job.cell}.manifest.json"
            self.files[f"{self.folder}/out/{info['manifest']}"] = b'{"packages": []}\n'
            if self.link.inline:
                texts["manifest_text"] = '{"packages": []}\n'
        if jid in self.fetch_ids:
            data = f"{jid} made on {self.link.host.name}\n".encode()
            path = f"{self.folder}/out/{job.id.replace(':', '_')}"
            self.files[path] = data
            digest = hashlib.sha256(data).hexdigest()
            remote = RemoteFile(path=path, size=len(data), sha256=digest)
            info["remote"] = remote.model_dump(mode="json")
        data = {"seconds": 0.0, "info": info, **texts}
        self._emit(Event("done", job=jid, cell=job.cell, data=data))

    def send(self, go: Go) -> None:
        self._run(Go.parse(go.line(), self.jobs).go)

    async def watch(self) -> None:
        pass

    async def lines(self) -> AsyncIterator[str]:
        async with self.events:
            async for line in self.events:
                yield line

    def stop(self) -> None:
        self.send_events.close()

    def ended(self) -> str:
        return "exited 0"

    async def read_text(self, path: str) -> str:
        self.link.reads.append(path.removeprefix(f"{self.folder}/out/"))
        if self.link.down is not None:
            raise HostLost(f"{self.link.host.name}: {self.link.down}")
        if path not in self.files:
            raise StageError(f"{path} on {self.link.host.name}: no such file")
        return self.files[path].decode()

    async def fetch(
        self, path: str, dest: Path, size: int, extents: Sequence[tuple[int, int]]
    ) -> None:
        dest.write_bytes(self.files[path])


async def run_on(
    tmp_path: Path,
    hosts: Sequence[str],
    dies_at: dict[str, str] | None = None,
    inline: bool = True,
) -> tuple[dict[str, JobRun], dict[str, MemoryLink]]:
    """The plan of `hosts`' matrix, run by the real scheduler and placement."""
    m = matrix(hosts)
    plan = make_plan(m)
    made: dict[str, MemoryLink] = {}

    def transport(host: Host) -> Link:
        made[host.name] = MemoryLink(host, (dies_at or {}).get(host.name), inline)
        return made[host.name]

    local: Any = FakeLocal(tmp_path / "out")
    with anyio.fail_after(10):
        async with placement.farm(m.hosts, m.fallback, plan, local, transport) as farm:
            runs = await Scheduler(plan, farm.route, Bus(), tmp_path / "logs").run()
    return runs, made


async def test_a_cell_runs_over_a_transport_that_is_not_ssh(tmp_path: Path) -> None:
    runs, links = await run_on(tmp_path, ["a"])
    assert {jid: r.status for jid, r in runs.items()} == dict.fromkeys(runs, "done")
    assert {r.host for r in runs.values()} == {"a"}
    (request,) = links["a"].requests
    assert request.fetch == (f"pack:{CELL}:tar",) and request.auto == ()
    assert [j.kind for j in request.plan.jobs] == ["rootfs", "finalise", "pack"]
    # The file came back through the publish stage: checked, with its .sha256, in OUT.
    out = tmp_path / "out"
    artifact = out / CELL / f"{CELL}.tar"
    assert artifact.read_text() == f"pack:{CELL}:tar made on a\n"
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert (out / CELL / f"{CELL}.tar.sha256").read_text() == f"{digest}  {CELL}.tar\n"
    publish = runs[f"publish:{CELL}:tar"].output
    assert publish is not None and publish.info["artifact"]["sha256"] == digest
    assert (out / CELL / f"{CELL}.manifest.json").read_text() == '{"packages": []}\n'
    assert not [p for p in (out / CELL).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("inline", [True, False], ids=["sent-with-events", "read-by-sftp"])
async def test_each_jobs_log_and_the_manifest_come_back(tmp_path: Path, inline: bool) -> None:
    """A job's log and a finalise's manifest ride in its done event (no round trips);
    a worker whose files were too big to send is read instead, with the same result."""
    runs, links = await run_on(tmp_path, ["a"], inline=inline)
    assert {r.status for r in runs.values()} == {"done"}
    remote = (f"rootfs:{CELL}", f"finalise:{CELL}", f"pack:{CELL}:tar")
    for jid in remote:
        log = (tmp_path / "logs" / log_name(jid)).read_text()
        assert log == f"# log of {jid} on a:\n$ make {jid} on a\n"
    manifest = tmp_path / "out" / CELL / f"{CELL}.manifest.json"
    assert manifest.read_text() == '{"packages": []}\n'
    reads = sorted(links["a"].reads)
    if inline:
        assert reads == []
    else:
        logs = [f"logs/{log_name(j)}" for j in remote]
        assert reads == sorted([f"{CELL}/{CELL}.manifest.json", *logs])


def test_the_worker_sends_small_logs_and_manifests_with_the_event(tmp_path: Path) -> None:
    """worker.WithTexts: a done or failed event gets the job's log, a finalise's done its
    manifest, each only up to INLINE_TEXT bytes (then the controller reads the file)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "finalise_c.log").write_text("$ chroot ...\n")
    (tmp_path / "logs" / "pack_c_tar.log").write_bytes(b"x" * (INLINE_TEXT + 1))
    (tmp_path / "logs" / "rootfs_c.log").write_bytes(b"I: \xff\n")
    # Few bytes, but six characters each in a JSON line (\u001b): read by SFTP instead.
    (tmp_path / "logs" / "assemble_c.log").write_bytes(b"\x1b" * (INLINE_TEXT // 5))
    (tmp_path / "c.manifest.json").write_text("[]")
    sent: list[Event] = []
    texts = WithTexts(sent.append, tmp_path)
    manifest = {"info": {"manifest": "c.manifest.json"}}
    texts(Event("done", job="finalise:c", data=manifest))
    texts(Event("done", job="pack:c:tar", data={"info": {}}))
    texts(Event("failed", job="rootfs:c", message="no", data={"tail": []}))
    texts(Event("progress", job="finalise:c", message="working"))
    texts(Event("done", job="boot:c", data={"info": {}}))  # no log: nothing added
    texts(Event("done", job="assemble:c", data={"info": {}}))
    final, pack, rootfs, progress, boot, assemble = sent
    assert assemble.data == {"info": {}}
    assert final.data == {**manifest, "log": "$ chroot ...\n", "manifest_text": "[]"}
    assert pack.data == {"info": {}}  # too big: read by SFTP
    assert rootfs.data == {"tail": [], "log": "I: \ufffd\n"}  # as an SFTP read decodes it
    assert progress.data == {} and boot.data == {"info": {}}
    for event in sent:
        assert parse_event(event.to_json(), "h") == event


async def test_a_lost_host_moves_the_cell_to_the_second_host(tmp_path: Path) -> None:
    runs, links = await run_on(tmp_path, ["a", "b"], dies_at={"a": "pack"})
    assert {r.status for r in runs.values()} == {"done"}
    assert links["a"].started == [f"rootfs:{CELL}", f"finalise:{CELL}"]
    pack = runs[f"pack:{CELL}:tar"]
    assert pack.host == "b"
    assert pack.output is not None
    (retry,) = pack.output.info["retries"]
    assert retry["host"] == "a" and retry["then"] == "b"
    assert retry["error"] == "a: connection lost (pulled the plug)"
    # b redid what pack needs (its tree was on a) at once, without waiting for go.
    (request,) = links["b"].requests
    assert request.auto == (f"rootfs:{CELL}", f"finalise:{CELL}")
    artifact = tmp_path / "out" / CELL / f"{CELL}.tar"
    assert artifact.read_text() == f"pack:{CELL}:tar made on b\n"


async def test_a_malformed_event_is_a_lost_host(tmp_path: Path) -> None:
    """A worker that says something this version does not send is not trusted further:
    its cell moves on, and with no other host the job fails with that one line."""

    class Garbling(MemoryChannel):
        def _emit(self, event: Event) -> None:
            if event.kind == "done" and event.job and event.job.startswith("finalise"):
                super()._emit(Event("done", job=event.job, data={"info": {"remote": 1}}))
            else:
                super()._emit(event)

    class GarblingLink(MemoryLink):
        @contextlib.asynccontextmanager
        async def session(self) -> AsyncIterator[Channel]:
            yield Garbling(self, "/work/factory-0")

    m = matrix(["a"])
    plan = make_plan(m)
    local: Any = FakeLocal(tmp_path / "out")
    with anyio.fail_after(10):
        async with placement.farm(m.hosts, m.fallback, plan, local, GarblingLink) as farm:
            runs = await Scheduler(plan, farm.route, Bus(), tmp_path / "logs").run()
    assert runs[f"rootfs:{CELL}"].status == "done"
    finalise = runs[f"finalise:{CELL}"]
    assert finalise.status == "failed"
    assert finalise.error is not None and "\n" not in finalise.error
    assert "a: worker on a sent a malformed event: field data.info.remote: " in finalise.error
    assert not (tmp_path / "out" / CELL).exists()


def test_placement_does_not_import_asyncssh() -> None:
    code = (
        "import sys; import factory.executors.placement, factory.worker; "
        "assert 'asyncssh' not in sys.modules, 'asyncssh imported'"
    )
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
