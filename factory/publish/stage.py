"""upload: send a cell's published artifacts to a [[publish]] target.

One job per (cell, SFTP target): the cell's files into FOLDER/CELL/ (factory.publish.sftp).
One job per (distro, OCI target): every arch's image joined into one manifest list, so it
waits for the publish jobs of all the distro's cells (factory.publish.oci). If one arch's
cell failed, the OCI job is skipped, not pushed with the arches that built: the tags it
would move (`latest` and the date) keep the complete list of the last good night, where
a partial list would take an arch away from its users overnight; the skip names the job
that failed.

The job's params hold the target's settings and the names of its credentials, never the
secrets; its key covers them and its inputs' keys, so an unchanged night skips it like
any other job (factory.outstate). Credentials are read when it runs: environment
variables, a key file, a containers auth.json.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from factory.cache import remove_tree
from factory.fsutil import sha256_file
from factory.publish import Refused, with_retries
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams

if TYPE_CHECKING:
    from factory.publish import sftp


class File(StageParams):
    name: str  # under OUT; kept under the target's folder
    format: str
    arch: str


class Sftp(StageParams):
    address: str
    port: int
    user: str
    folder: str
    key: str | None = None
    known_hosts: str
    trust_unknown_hosts: bool = False
    password_env: str | None = None


class Push(StageParams):
    """One manifest list: an image (docker) or a containerDisk (qcow2) of every arch."""

    format: Literal["docker", "qcow2"]
    refs: tuple[str, ...]
    files: tuple[File, ...]


class Oci(StageParams):
    registry: str
    tls_verify: bool = True
    username_env: str | None = None
    password_env: str | None = None
    authfile: str | None = None
    pushes: tuple[Push, ...]


class Params(StageParams):
    target: str
    kind: Literal["sftp", "oci"]
    retries: int
    epoch: int  # the cells' clock: the files' mtime on a server, the date tag
    sftp: Sftp | None = None
    files: tuple[File, ...] = ()  # sftp: what to send
    oci: Oci | None = None


def date_tag(epoch: int) -> str:
    """The date a night's images are tagged with: its archive's date (UTC), so the same
    archive gives the same tag and the same job key."""
    return time.strftime("%Y%m%d", time.gmtime(epoch))


def secret(var: str | None, target: str, field: str) -> str | None:
    """A credential from the environment (checked before the run; checked again here)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise Refused(
            f"publish target {target}: {field}: the environment variable {var} is not set "
            "(export it before the run)"
        )
    return value


async def _sha256(ctx: Context, name: str) -> str:
    """An artifact's sha256: from its publish job's output when it ran now, else from the
    `.sha256` beside it in OUT (a carried artifact, checked by factory.outstate)."""
    for out in ctx.inputs.values():
        art = out.info.get("artifact")
        if isinstance(art, Mapping) and art.get("path") == name:
            return str(art["sha256"])
    side = ctx.ws.out / f"{name}.sha256"
    try:
        digest = side.read_text().split()[0]
        if len(digest) == 64:
            return digest
    except (OSError, IndexError):
        pass
    return await sha256_file(ctx.ws.out / name)


async def _local(ctx: Context, f: File) -> sftp.Local:
    from factory.publish import sftp  # asyncssh and the ssh transport: only when needed

    path = ctx.ws.out / f.name
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise StageError(f"{f.name}: not in OUT ({exc.strerror})") from None
    return sftp.Local(f.name, path, await _sha256(ctx, f.name), size)


async def _sftp(ctx: Context, p: Params) -> dict[str, Any]:
    from factory.publish import sftp  # asyncssh and the ssh transport: only when needed

    s = p.sftp
    assert s is not None
    server = sftp.Server(
        address=s.address,
        port=s.port,
        user=s.user,
        folder=s.folder,
        known_hosts=Path(s.known_hosts),
        trust_unknown_hosts=s.trust_unknown_hosts,
        key=Path(s.key) if s.key else None,
        password=secret(s.password_env, p.target, "password_env"),
    )
    files = [await _local(ctx, f) for f in p.files]

    async def attempt() -> sftp.Sent:
        try:
            return await sftp.upload(server, files, p.epoch, ctx.emit)
        except StageError as exc:
            raise type(exc)(f"publish target {p.target} ({server}): {exc}") from None

    done = await with_retries(attempt, p.retries, ctx.emit)
    return {"target": p.target, "to": str(server), "sent": done.sent, "skipped": done.skipped,
            "sums": done.sums}  # fmt: skip


def oci_auth(o: Oci, target: str) -> tuple[str, str] | None:
    """(username, password) from the environment, or from a containers auth.json's entry
    for the registry; None: anonymous."""
    if o.username_env is not None:
        user = secret(o.username_env, target, "username_env")
        password = secret(o.password_env, target, "password_env")
        assert user is not None and password is not None
        return user, password
    if o.authfile is None:
        return None
    try:
        auths = json.loads(Path(o.authfile).read_text()).get("auths", {})
        entry = auths.get(o.registry) or auths.get(f"https://{o.registry}") or {}
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise Refused(
            f"publish target {target}: authfile {o.authfile}: no usable entry for "
            f"{o.registry} ({type(exc).__name__}: {exc}; log in with skopeo login "
            f"--authfile {o.authfile} {o.registry})"
        ) from None
    return user, password


async def _oci(ctx: Context, p: Params) -> dict[str, Any]:
    o = p.oci
    assert o is not None
    from factory.publish import oci  # skopeo, the manifest lists: only when needed
    creds = oci_auth(o, p.target)
    auth = oci.OciAuth(username=creds[0], password=creds[1]) if creds else None
    pushed: dict[str, str] = {}
    for push in o.pushes:
        sources = []
        for f in push.files:
            path = ctx.ws.out / f.name
            if not path.is_file():
                raise StageError(f"publish target {p.target}: {f.name} is not in OUT")
            sources.append((f.arch, path))
        work = ctx.ws.work / f"upload-{ctx.job.id.replace(':', '_')}"

        async def attempt(
            push: Push = push, sources: list[tuple[str, Path]] = sources, work: Path = work
        ) -> str:
            work.mkdir(parents=True, exist_ok=True)
            try:
                if push.format == "docker":
                    digest = await oci.push_images(
                        sources, push.refs, auth=auth, tls_verify=o.tls_verify, workdir=work
                    )
                else:
                    digest = await oci.push_container_disks(
                        sources, push.refs, auth=auth, tls_verify=o.tls_verify, workdir=work,
                        epoch=p.epoch,
                    )  # fmt: skip
                return str(digest)
            except StageError as exc:
                raise type(exc)(f"publish target {p.target} ({push.refs[0]}): {exc}") from None
            finally:
                with anyio.CancelScope(shield=True):
                    await remove_tree(work)

        ctx.emit(f"pushing {', '.join(push.refs)}")
        digest = await with_retries(attempt, p.retries, ctx.emit)  # one push, every ref
        pushed.update(dict.fromkeys(push.refs, digest))
    return {"target": p.target, "pushed": pushed}


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    info = await (_sftp(ctx, p) if p.kind == "sftp" else _oci(ctx, p))
    return Output(None, {"upload": info})


def cost(params: Mapping[str, Any]) -> float:
    """Network time, not CPU: small, so the builds that feed other jobs go first."""
    return 1.0


STAGE = Stage(kind="upload", recipe=1, params=Params, run=run, cost=cost, module=__name__)
