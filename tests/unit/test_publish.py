"""Publish targets: the [[publish]] checks, their credentials, the upload jobs in the plan,
what a night that only uploads runs, and the retries (factory.publish)."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from pathlib import Path

import anyio
import pytest

import factory.publish
from factory import outstate, publish
from factory.events import Bus
from factory.executors.local import LocalExecutor
from factory.plan import Job, Plan, describe, make_plan
from factory.publish import Refused, stage, with_retries
from factory.publish.executor import Uploads
from factory.publish.sftp import parse_sums, sums_text
from factory.results import Output, StageError
from factory.routing import router
from factory.runner import Options, RunRefused, run_plan
from factory.scheduler import Scheduler
from factory.spec import MatrixError, check_credentials, load_matrix
from factory.stages import Context, Workspace

from .test_spec import error_of, write

HEAD = [
    'name = "t"',
    'arches = ["amd64", "ppc64el"]',
    'distros = ["debian/bookworm", "debian/trixie"]',
    'formats = ["tar", "qcow2", "docker"]',
]
SFTP = [
    "[[publish]]",
    'name = "downloads"',
    'kind = "sftp"',
    'address = "127.0.0.1"',
    'path = "/srv/images/nightly"',
]
OCI = [
    "[[publish]]",
    'name = "registry"',
    'kind = "oci"',
    'registry = "127.0.0.1:5000"',
    'repository = "factory"',
]

BAD: dict[str, tuple[list[str], str, int, str]] = {
    "sftp-no-address": (
        [*HEAD, *SFTP[:3], 'path = "/srv"'], "publish[0].address", 5, "needs address"
    ),
    "sftp-no-path": ([*HEAD, *SFTP[:4]], "publish[0].path", 5, "needs path"),
    "sftp-relative-path": (
        [*HEAD, *SFTP[:4], 'path = "srv/x"'], "publish[0].path", 9, "plain absolute path"
    ),
    "sftp-bad-address": (
        [*HEAD, *SFTP[:3], 'address = "u@h"', SFTP[4]], "publish[0].address", 8, "hostname"
    ),
    "sftp-port": ([*HEAD, *SFTP, "port = 0"], "publish[0].port", 10, "at least 1"),
    "sftp-key-and-password": (
        [*HEAD, *SFTP, 'key = "/k"', 'password_env = "P"'],
        "publish[0].password_env", 11, "not both",
    ),
    "oci-no-registry": ([*HEAD, *OCI[:3], OCI[4]], "publish[0].registry", 5, "needs registry"),
    "oci-registry-scheme": (
        [*HEAD, *OCI[:3], 'registry = "https://r"', OCI[4]],
        "publish[0].registry", 8, "not a registry",
    ),
    "oci-repository-case": (
        [*HEAD, *OCI[:4], 'repository = "Factory"'], "publish[0].repository", 9, "lowercase"
    ),
    "oci-takes-no-address": (
        [*HEAD, *OCI, 'address = "127.0.0.1"'], "publish[0].address", 10, "for sftp targets"
    ),
    "sftp-takes-no-registry": (
        [*HEAD, *SFTP, 'registry = "r:1"'], "publish[0].registry", 10, "for oci targets"
    ),
    "oci-tar": (
        [*HEAD, *OCI, 'formats = ["docker", "tar"]'],
        "publish[0].formats[1]", 10, "an oci target pushes docker, qcow2",
    ),
    "oci-user-without-password": (
        [*HEAD, *OCI, 'username_env = "U"'], "publish[0].password_env", 5, "go together"
    ),
    "oci-authfile-and-env": (
        [*HEAD, *OCI, 'username_env = "U"', 'password_env = "P"', 'authfile = "/a"'],
        "publish[0].authfile", 12, "not both",
    ),
    "oci-nothing-to-push": (
        [*HEAD[:3], 'formats = ["tar"]', *OCI], "publish[0].kind", 7, "builds none"
    ),
    "format-not-built": (
        [*HEAD, *SFTP, 'formats = ["tar", "vmdk"]'],
        "publish[0].formats[1]", 10, "does not build vmdk",
    ),
    "format-unknown": (
        [*HEAD, *SFTP, 'formats = ["tarball"]'], "publish[0].formats[0]", 10, "unknown format"
    ),
    "formats-empty": ([*HEAD, *SFTP, "formats = []"], "publish[0].formats", 10, "empty"),
    "env-name": (
        [*HEAD, *SFTP, 'password_env = "my secret"'],
        "publish[0].password_env", 10, "not an environment variable name",
    ),
    "kind": ([*HEAD, *SFTP[:2], 'kind = "ftp"', *SFTP[3:]], "publish[0].kind", 7, "'sftp'"),
    "unknown-key": ([*HEAD, *SFTP, 'adress = "x"'], "publish[0].adress", 10, "did you mean"),
    "retries": ([*HEAD, *SFTP, "retries = -1"], "publish[0].retries", 10, "at least 0"),
    "same-name": (
        [*HEAD, *SFTP, *OCI[:1], 'name = "downloads"', *OCI[2:]],
        "publish[1].name", 11, "two publish targets are named 'downloads'",
    ),
    "unsafe-name": (
        [*HEAD, SFTP[0], 'name = "../x"', *SFTP[2:]], "publish[0].name", 6, "unsafe name"
    ),
}  # fmt: skip


@pytest.mark.parametrize(("lines", "field", "line", "fragment"), BAD.values(), ids=BAD.keys())
def test_bad_publish_tables(
    tmp_path: Path, lines: list[str], field: str, line: int, fragment: str
) -> None:
    err = error_of(write(tmp_path, "\n".join(lines) + "\n"))
    assert (err.field, err.line) == (field, line), str(err)
    assert fragment in err.message, err.message


def matrix_file(tmp_path: Path, *extra: str) -> Path:
    return write(tmp_path, "\n".join([*HEAD, *SFTP, *OCI, *extra]) + "\n")


def test_good_targets_load(tmp_path: Path) -> None:
    m = load_matrix(
        write(
            tmp_path,
            "\n".join([*HEAD, *SFTP, "port = 2222", 'formats = ["tar"]', *OCI, "retries = 0"])
            + "\n",
        )
    )
    sftp, oci = m.publish
    assert (sftp.kind, sftp.port, sftp.user, sftp.retries) == ("sftp", 2222, "root", 3)
    assert sftp.wanted(m.formats) == ("tar",)
    assert (oci.kind, oci.tls_verify, oci.retries) == ("oci", True, 0)
    assert oci.wanted(m.formats) == ("qcow2", "docker")  # tar is no OCI format


CREDENTIALS: dict[str, tuple[list[str], str, str]] = {
    "sftp-password": (
        [*SFTP, 'password_env = "FT_SFTP_PASS"'], "publish[0].password_env", "FT_SFTP_PASS"
    ),
    "oci-user": (
        [*OCI, 'username_env = "FT_USER"', 'password_env = "FT_PASS"'],
        "publish[0].username_env", "FT_USER is not set",
    ),
    "key-missing": ([*SFTP, 'key = "nokey"'], "publish[0].key", "no such file"),
    "authfile-missing": ([*OCI, 'authfile = "auth.json"'], "publish[0].authfile", "no such"),
}  # fmt: skip


@pytest.mark.parametrize(("lines", "field", "fragment"), CREDENTIALS.values(), ids=CREDENTIALS)
def test_missing_credentials_are_found_before_the_run(
    tmp_path: Path, lines: list[str], field: str, fragment: str
) -> None:
    path = write(tmp_path, "\n".join([*HEAD, *lines]) + "\n")
    m = load_matrix(path)  # loading needs no secret: `factory plan` works without them
    with pytest.raises(MatrixError) as caught:
        check_credentials(m, environ={})
    err = caught.value
    assert err.field == field
    assert err.line == 1 + next(
        i for i, line in enumerate([*HEAD, *lines]) if line.startswith(field.split(".")[1])
    )
    assert fragment in err.message and "\n" not in str(err), str(err)
    assert str(err).startswith(f"{path}:{err.line}: {field}: ")
    # Another target's credentials are not this run's business.
    check_credentials(m, targets=["other"], environ={})


def test_credentials_that_are_there_pass(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k")
    m = load_matrix(matrix_file(tmp_path, 'username_env = "FT_U"', 'password_env = "FT_P"'))
    check_credentials(m, environ={"FT_U": "u", "FT_P": "p"})
    m = load_matrix(write(tmp_path, "\n".join([*HEAD, *SFTP, 'key = "key"']) + "\n"))
    assert m.publish[0].key == tmp_path / "key"  # relative to the matrix file
    check_credentials(m, environ={})


async def test_a_run_refuses_before_any_work(tmp_path: Path) -> None:
    """An unset variable stops `factory run` before OUT is even made: exit 2's message."""
    m = load_matrix(matrix_file(tmp_path, 'username_env = "FT_NOPE_U"', 'password_env = "FT_P"'))
    out = tmp_path / "out"
    with pytest.raises(
        RunRefused, match=r"publish\[1\]\.username_env: the environment variable FT_NOPE_U"
    ):
        await run_plan(m, make_plan(m), Options(out=out, cache=tmp_path / "cache", jobs=1))
    assert not out.exists()


# --- planning -------------------------------------------------------------------------------


def uploads(plan: Plan) -> dict[str, Job]:
    return {j.id: j for j in plan.jobs if j.kind == "upload"}


def test_upload_jobs_in_the_plan(tmp_path: Path) -> None:
    m = load_matrix(matrix_file(tmp_path, 'formats = ["docker"]'))
    plan = make_plan(m)
    ups = uploads(plan)
    cells = [c.id for c in m.cells()]
    assert sorted(ups) == sorted(
        [f"upload:{c}:downloads" for c in cells]
        + ["upload:debian-bookworm:registry", "upload:debian-trixie:registry"]
    )
    # SFTP: one per cell, after the cell's publish jobs of every format (the default).
    cell = "debian-bookworm-ppc64el"
    sftp = ups[f"upload:{cell}:downloads"]
    assert (sftp.cell, sftp.arch) == (cell, "ppc64el")
    assert sorted(sftp.deps) == sorted(f"publish:{cell}:{f}" for f in ("tar", "qcow2", "docker"))
    assert [f["name"] for f in sftp.params["files"]] == [
        f"{cell}/{cell}.qcow2", f"{cell}/{cell}.tar", f"{cell}/{cell}.docker.tar"
    ]  # fmt: skip
    assert sftp.params["sftp"]["folder"] == "/srv/images/nightly"
    # OCI: one per distro, after every arch's docker publish job (formats = ["docker"]).
    oci = ups["upload:debian-trixie:registry"]
    assert oci.cell == "debian-trixie"
    assert sorted(oci.deps) == [
        "publish:debian-trixie-amd64:docker", "publish:debian-trixie-ppc64el:docker"
    ]  # fmt: skip
    (push,) = oci.params["oci"]["pushes"]
    assert push["refs"] == [
        "127.0.0.1:5000/factory/debian-trixie:20231114",  # the cells' clock (no archive here)
        "127.0.0.1:5000/factory/debian-trixie:latest",
    ]
    assert [(f["arch"], f["format"]) for f in push["files"]] == [
        ("amd64", "docker"), ("ppc64el", "docker")
    ]  # fmt: skip
    # The cells are still the cells; `factory plan` shows the OCI jobs apart.
    assert plan.cells() == cells
    text = "\n".join(describe(plan))
    assert "debian-trixie (every arch)" in text
    assert "← publish:debian-trixie-amd64:docker, publish:debian-trixie-ppc64el:docker" in text


def test_containerdisks_and_the_date_tag(tmp_path: Path) -> None:
    m = load_matrix(
        write(tmp_path, "\n".join([*HEAD, "", "[image]", "epoch = 1764633600", *OCI]) + "\n")
    )
    (oci,) = [j for j in uploads(make_plan(m)).values() if j.cell == "debian-bookworm"]
    refs = {p["format"]: p["refs"] for p in oci.params["oci"]["pushes"]}
    assert refs == {
        "qcow2": [
            "127.0.0.1:5000/factory/debian-bookworm-disk:20251202",
            "127.0.0.1:5000/factory/debian-bookworm-disk:latest",
        ],
        "docker": [
            "127.0.0.1:5000/factory/debian-bookworm:20251202",
            "127.0.0.1:5000/factory/debian-bookworm:latest",
        ],
    }
    assert oci.params["epoch"] == 1764633600


def test_upload_keys(tmp_path: Path) -> None:
    """A target's key follows its settings and its artifacts' keys, not its secrets."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def keys(folder: str, *lines: str, sftp: tuple[str, ...] = ()) -> dict[str, str]:
        text = "\n".join([*HEAD, *lines, *SFTP, 'formats = ["tar"]', *sftp, *OCI]) + "\n"
        return {
            j: u.key
            for j, u in uploads(make_plan(load_matrix(write(tmp_path / folder, text)))).items()
        }

    base = keys("a")
    assert base == keys("b")  # the same settings in another file: the same keys
    sftp = "upload:debian-bookworm-amd64:downloads"
    oci = "upload:debian-bookworm:registry"
    port = keys("a", sftp=("port = 2222",))
    assert port[sftp] != base[sftp] and port[oci] == base[oci]
    # qcow2's compression changes the disk, not the tar: only OCI's job has a new key.
    zstd = keys("a", "[image]", 'qcow2_compression = "zstd"')
    assert zstd[sftp] == base[sftp] and zstd[oci] != base[oci]
    pw = keys("a", sftp=('password_env = "A"',))
    pw_b = keys("b", sftp=('password_env = "A"',))
    assert pw == pw_b  # the variable's name counts; its value is never in the plan


def test_a_night_that_only_uploads(tmp_path: Path) -> None:
    """OUT holds the artifacts with this plan's keys, the upload never ran: the sub-plan
    is the upload job alone, its artifacts given."""
    m = load_matrix(
        write(
            tmp_path,
            "\n".join(
                [*HEAD[:2], HEAD[2].replace(', "debian/trixie"', ""), 'formats = ["tar"]', *SFTP]
            )
            + "\n",
        )
    )
    plan = make_plan(m)
    publishes = [j for j in plan.jobs if j.kind == "publish"]
    carried = outstate.Carried(jobs={j.id: {"id": j.id, "key": j.key} for j in publishes})
    todo = outstate.still_needed(plan, carried)
    assert todo is not None
    assert sorted(j.id for j in todo.jobs) == sorted(uploads(plan))
    everything = {**carried.jobs, **{j: {} for j in uploads(plan)}}
    assert outstate.still_needed(plan, outstate.Carried(jobs=everything)) is None


class Echo:
    host: str | None = None

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}

    def limiter(self, job: Job) -> anyio.CapacityLimiter:
        return anyio.CapacityLimiter(2)

    async def run(self, job: Job, inputs: object, emit: object) -> Output:
        self.seen[job.id] = list(inputs)  # type: ignore[call-overload]
        if job.params.get("fail"):
            raise StageError(job.params["fail"])
        return Output()


def job(jid: str, *deps: str, **params: object) -> Job:
    return Job(id=jid, kind="upload", cell="c", arch="amd64", deps=deps, key=jid, params=params)


async def test_the_scheduler_takes_a_dependency_outside_the_plan_as_done(tmp_path: Path) -> None:
    ex = Echo()
    plan = Plan(
        matrix="t",
        jobs=(
            job("upload:a", "publish:given"),
            job("upload:b", "publish:given", fail="publish target b (x): refused"),
            job("upload:c", "upload:b"),
        ),
    )
    runs = await Scheduler(plan, lambda j: ex, Bus(), tmp_path / "logs").run()
    assert {k: r.status for k, r in runs.items()} == {
        "upload:a": "done", "upload:b": "failed", "upload:c": "skipped"
    }  # fmt: skip
    assert ex.seen["upload:a"] == []  # nothing to hand over: the stage reads OUT
    assert runs["upload:b"].error == "publish target b (x): refused"


# --- the stage's parts ------------------------------------------------------------------------


async def test_retries_back_off_and_say_how_many() -> None:
    calls: list[int] = []
    said: list[str] = []

    async def failing() -> str:
        calls.append(1)
        raise StageError("publish target t (sftp://u@h:22/x): connection refused")

    with pytest.raises(StageError) as caught:
        await with_retries(failing, 2, said.append, backoff=0.001)
    assert len(calls) == 3 and len(said) == 2
    assert str(caught.value).endswith("connection refused (after 3 attempts)")
    assert "attempt 1 failed" in said[0]

    async def refused() -> str:
        calls.append(1)
        raise Refused("host key refused")

    calls.clear()
    with pytest.raises(Refused):
        await with_retries(refused, 5, said.append, backoff=0.001)
    assert len(calls) == 1  # another attempt would be refused the same way

    tries = iter([StageError("flaky"), None])

    async def second_time() -> str:
        err = next(tries)
        if err:
            raise err
        return "ok"

    assert await with_retries(second_time, 1, said.append, backoff=0.001) == "ok"


def test_sums_files() -> None:
    text = f"{'a' * 64}  x.tar\n{'B' * 64} *y.qcow2\nnot a line\n"
    sums = parse_sums(text)
    assert sums == {"x.tar": "a" * 64, "y.qcow2": "b" * 64}
    assert parse_sums(sums_text(sums)) == sums
    assert sums_text(sums).splitlines()[0] == f"{'a' * 64}  x.tar"


def test_oci_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = tmp_path / "auth.json"
    token = base64.b64encode(b"bot:s3:cret").decode()
    auth.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": token}}}))
    o = stage.Oci(registry="127.0.0.1:5000", authfile=str(auth), pushes=())
    assert stage.oci_auth(o, "r") == ("bot", "s3:cret")
    other = stage.Oci(registry="127.0.0.1:5001", authfile=str(auth), pushes=())
    with pytest.raises(
        Refused, match=r"publish target r: authfile .*no usable entry for 127\.0\.0\.1:5001"
    ):
        stage.oci_auth(other, "r")
    monkeypatch.setenv("FT_U", "u")
    monkeypatch.delenv("FT_P", raising=False)
    env = stage.Oci(registry="r", username_env="FT_U", password_env="FT_P", pushes=())
    with pytest.raises(Refused, match="password_env: the environment variable FT_P is not set"):
        stage.oci_auth(env, "r")
    monkeypatch.setenv("FT_P", "p")
    assert stage.oci_auth(env, "r") == ("u", "p")
    assert stage.oci_auth(stage.Oci(registry="r", pushes=()), "r") is None


def test_date_tag() -> None:
    assert stage.date_tag(1764633600) == "20251202"
    assert stage.date_tag(1764633599) == "20251201"


class StandIn:
    """factory/publish/oci.py's contract, recorded: that module (skopeo, a registry) is
    another branch's and cannot run here; what the framework hands it can be checked."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[dict[str, object]] = []
        self.failures = failures

        @dataclasses.dataclass(frozen=True)
        class OciAuth:
            username: str
            password: str

        self.OciAuth = OciAuth

    async def _push(self, kind: str, sources: object, refs: object, **kw: object) -> str:
        workdir = kw["workdir"]
        assert isinstance(workdir, Path) and workdir.is_dir()
        self.calls.append({"kind": kind, "sources": list(sources), "refs": list(refs), **kw})  # type: ignore[call-overload]
        if self.failures:
            self.failures -= 1
            raise StageError("manifest invalid")
        return f"sha256:{kind}"

    async def push_images(self, sources: object, refs: object, **kw: object) -> str:
        return await self._push("image", sources, refs, **kw)

    async def push_container_disks(self, sources: object, refs: object, **kw: object) -> str:
        return await self._push("disk", sources, refs, **kw)


def oci_job(tmp_path: Path) -> tuple[Job, Workspace]:
    m = load_matrix(
        write(
            tmp_path,
            "\n".join([*HEAD, "", "[image]", "epoch = 1764633600", *OCI, "tls_verify = false"])
            + "\n",
        )
    )
    job = uploads(make_plan(m))["upload:debian-bookworm:registry"]
    out = tmp_path / "out"
    for push in job.params["oci"]["pushes"]:
        for f in push["files"]:
            (out / f["name"]).parent.mkdir(parents=True, exist_ok=True)
            (out / f["name"]).write_text(f["arch"])
    return job, Workspace(out=out, cache=None)  # type: ignore[arg-type]


async def test_the_oci_job_pushes_each_manifest_list_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oci = StandIn(failures=1)
    monkeypatch.setitem(sys.modules, "factory.publish.oci", oci)
    monkeypatch.setattr(factory.publish, "oci", sys.modules["factory.publish.oci"], raising=False)
    monkeypatch.setattr(publish, "BACKOFF", 0.001)
    job, ws = oci_job(tmp_path)
    said: list[str] = []
    done = await stage.run(Context(job, {}, ws, said.append))
    disk, disk_again, image = oci.calls  # the first disk push failed and was tried again
    assert disk == disk_again and "attempt 1 failed" in " ".join(said)
    out = ws.out
    assert disk["kind"] == "disk" and disk["epoch"] == 1764633600
    assert disk["sources"] == [
        ("amd64", out / "debian-bookworm-amd64/debian-bookworm-amd64.qcow2"),
        ("ppc64el", out / "debian-bookworm-ppc64el/debian-bookworm-ppc64el.qcow2"),
    ]
    assert image["refs"] == [
        "127.0.0.1:5000/factory/debian-bookworm:20251202",
        "127.0.0.1:5000/factory/debian-bookworm:latest",
    ]
    assert (image["auth"], image["tls_verify"]) == (None, False)
    assert not (ws.work).exists() or not list(ws.work.iterdir())  # workdirs removed
    pushed = done.info["upload"]["pushed"]
    assert pushed["127.0.0.1:5000/factory/debian-bookworm-disk:latest"] == "sha256:disk"
    assert pushed["127.0.0.1:5000/factory/debian-bookworm:20251202"] == "sha256:image"


async def test_a_failed_oci_push_says_which_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "factory.publish.oci", StandIn(failures=99))
    monkeypatch.setattr(factory.publish, "oci", sys.modules["factory.publish.oci"], raising=False)
    monkeypatch.setattr(publish, "BACKOFF", 0.001)
    job, ws = oci_job(tmp_path)
    with pytest.raises(StageError) as caught:
        await stage.run(Context(job, {}, ws, lambda _: None))
    assert str(caught.value) == (
        "publish target registry (127.0.0.1:5000/factory/debian-bookworm-disk:20251202): "
        "manifest invalid (after 4 attempts)"
    )


async def test_uploads_run_here_in_slots_of_their_own(tmp_path: Path) -> None:
    """Beside OUT, never on a build host, and without a connection to one when the run
    only uploads."""
    m = load_matrix(
        write(
            tmp_path,
            "\n".join(
                [*HEAD, *SFTP, "[[hosts]]", 'name = "h"', 'address = "192.0.2.1"',
                 'arches = ["amd64", "ppc64el"]']
            ) + "\n",
        )
    )  # fmt: skip
    plan = make_plan(m)
    only_uploads = plan.select(uploads(plan), given=[j.id for j in plan.jobs if j.kind != "upload"])
    assert {j.kind for j in only_uploads.jobs} == {"upload"}
    local = LocalExecutor(Workspace(out=tmp_path, cache=None), 2)  # type: ignore[arg-type]
    async with router(m, local, only_uploads) as route:
        executors = {route(j) for j in only_uploads.jobs}
    (ex,) = executors
    assert isinstance(ex, Uploads) and ex.host is None
    assert ex.limiter(only_uploads.jobs[0]) is not local.cpu


def test_the_targets_modules_are_in_the_upload_keys_code() -> None:
    """A change to how a target pushes must change the upload jobs' keys, so the next
    night pushes again: both targets' modules are in the upload stage's fingerprint."""
    from factory.stages import registry

    code = registry.code_of("upload")
    assert {"factory.publish.oci", "factory.publish.sftp", "factory.publish.stage"} <= set(code)
