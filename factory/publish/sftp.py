"""A download server over SFTP: a cell's artifacts into FOLDER/CELL/, with asyncssh.

How a mirror stays consistent:
- Every file is written under a hidden temporary name in its destination folder
  (`.NAME.RANDOM.factory-part`), checked, and then renamed over its final name with the
  posix-rename extension, so a reader sees the old file or the new one, never part of
  one. Temporary files a killed upload left behind are removed by the next upload into
  that folder.
- The checks cost a second transfer: OpenSSH's sftp-server has no hash command, and an
  upload-only account has no shell to run sha256sum in, so the temporary file is read back
  over the same SFTP session and hashed here before it is renamed (for a 1 GiB qcow2 on a
  slow link that doubles the time; it is the price of knowing that what the server holds
  is what OUT holds).
- SHA256SUMS comes last. Each cell's folder has its own `CELL/SHA256SUMS`, written by that
  cell's job only, after its files: concurrent jobs (the cells of one run, or the shards
  of a CI pipeline on several machines) never write the same sums file. Before a file
  listed there is replaced, its line is taken out first, so the sums never name bytes
  that are not there. Then FOLDER/SHA256SUMS, all cells' lines (`CELL/NAME`), is made
  again from every `*/SHA256SUMS` on the server; one run writes it under a lock per
  target. Two machines publishing at the same moment can each write it from a listing
  that lacks the other's cell: the per-cell sums stay right, and the next publish into
  the folder writes the whole index again.
- Unchanged files are not sent. The server's own CELL/SHA256SUMS says what factory wrote
  last time, and factory sets each file's mtime to the cell's clock (its archive's
  date): a file whose line there has our sha256, whose size is ours and whose mtime is
  that clock is taken as sent, without reading it. A file someone changed on the server
  has another mtime (or size), and is sent again. After a no-op night the upload job does
  not even run (its key is unchanged); run again, it sends nothing and writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import anyio
import asyncssh

from factory.executors.placement import one_line
from factory.executors.ssh import known_hosts_for
from factory.publish import Refused
from factory.results import StageError
from factory.spec import Host

SUMS = "SHA256SUMS"
PART = ".factory-part"
CONNECT_TIMEOUT = 20.0
CLOSE_TIMEOUT = 10.0
CHUNK = 4 * 1024 * 1024

# One run writes a target's top-level SHA256SUMS at a time.
_INDEX_LOCKS: dict[str, anyio.Lock] = {}


@dataclass(frozen=True)
class Server:
    """Where to: a [[publish]] target of kind sftp, as the upload job's params carry it."""

    address: str
    port: int
    user: str
    folder: str
    known_hosts: Path
    trust_unknown_hosts: bool = False
    key: Path | None = None
    password: str | None = None  # read from the environment by the caller

    def __str__(self) -> str:
        return f"sftp://{self.user}@{self.address}:{self.port}{self.folder}"


@dataclass(frozen=True)
class Local:
    """A file of OUT to send, by its OUT-relative name (it keeps it on the server)."""

    name: str
    path: Path
    sha256: str
    size: int


@dataclass
class Sent:
    """What an upload did, for the job's record: the names it sent and those it skipped."""

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sums: list[str] = field(default_factory=list)  # sums files written


def _one_line(exc: BaseException) -> str:
    """placement's one line (asyncssh's reason), cut to what an error line can hold."""
    text = one_line(exc)
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.asynccontextmanager
async def session(server: Server) -> AsyncIterator[asyncssh.SFTPClient]:
    """One SSH connection and SFTP session to the server, closed on the way out whatever
    happens (shielded, bounded). Host keys follow [[hosts]]' rules (known_hosts_for)."""
    host = Host.model_construct(
        name="publish",
        address=server.address,
        port=server.port,
        known_hosts=server.known_hosts,
        trust_unknown_hosts=server.trust_unknown_hosts,
        arches=(),
    )
    try:
        known = known_hosts_for(host)
    except StageError as exc:
        raise Refused(str(exc)) from None
    conn, sftp = await _open(server, known)
    try:
        yield sftp
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            sftp.exit()
            conn.close()
            await conn.wait_closed()


async def _open(
    server: Server, known: str | None
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
    conn: asyncssh.SSHClientConnection | None = None
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            conn = await asyncssh.connect(
                server.address,
                port=server.port,
                username=server.user,
                known_hosts=known,
                client_keys=[str(server.key)] if server.key else (),
                password=server.password,
                connect_timeout=CONNECT_TIMEOUT,
                keepalive_interval=5.0,
                keepalive_count_max=3,
            )
            return conn, await conn.start_sftp_client()
    except BaseException as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            raise Refused(
                f"host key refused: it does not match {server.known_hosts} ({_one_line(exc)})"
            ) from None
        if isinstance(exc, asyncssh.PermissionDenied):
            raise Refused(
                f"login refused for {server.user} ({_one_line(exc)}; check key or password_env)"
            ) from None
        if isinstance(exc, TimeoutError):
            raise StageError(f"no answer in {CONNECT_TIMEOUT:.0f} s") from None
        if isinstance(exc, OSError) and exc.errno:
            raise StageError(f"cannot connect: {os.strerror(exc.errno)}") from None
        if isinstance(exc, OSError | asyncssh.Error):
            raise StageError(_one_line(exc)) from None
        raise


def parse_sums(text: str) -> dict[str, str]:
    """`sha256  name` lines (sha256sum's text mode; `*name`, its binary mode, too)."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if sep and len(digest) == 64 and name:
            sums[name] = digest.lower()
    return sums


def sums_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


async def _read_text(sftp: asyncssh.SFTPClient, path: str) -> str | None:
    try:
        async with sftp.open(path, "rb") as fh:
            data = cast(bytes, await fh.read())
    except asyncssh.SFTPNoSuchFile:
        return None
    return data.decode("utf-8", errors="replace")


async def _write_text(sftp: asyncssh.SFTPClient, path: str, text: str, old: str | None) -> bool:
    """A small file replaced atomically, and only when its text changes."""
    if old == text:
        return False
    folder, name = posixpath.split(path)
    tmp = posixpath.join(folder, f".{name}.{secrets.token_hex(4)}{PART}")
    try:
        async with sftp.open(tmp, "wb") as fh:
            await fh.write(text.encode())
        await sftp.posix_rename(tmp, path)
    except BaseException:
        await _forget(sftp, tmp)
        raise
    return True


async def _forget(sftp: asyncssh.SFTPClient, path: str) -> None:
    """Remove a temporary file if it is still there; a lost connection is not our worry
    here (the next upload into the folder removes it)."""
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(CLOSE_TIMEOUT),
        contextlib.suppress(OSError, asyncssh.Error),
    ):
        await sftp.remove(path)


async def _clear_parts(sftp: asyncssh.SFTPClient, folder: str) -> None:
    """Temporary files a killed upload left in this folder."""
    for name in await sftp.listdir(folder):
        if name.startswith(".") and name.endswith(PART):
            await _forget(sftp, posixpath.join(folder, name))


async def _hash_remote(sftp: asyncssh.SFTPClient, path: str) -> str:
    h = hashlib.sha256()
    async with sftp.open(path, "rb", block_size=256 * 1024) as fh:
        while chunk := cast(bytes, await fh.read(CHUNK)):
            await anyio.to_thread.run_sync(h.update, chunk)
    return h.hexdigest()


async def _send(
    sftp: asyncssh.SFTPClient, folder: str, f: Local, mtime: int, emit: Callable[[str], None]
) -> None:
    """One file: to a temporary name, its mtime set, read back and hashed, renamed."""
    base = posixpath.basename(f.name)
    tmp = posixpath.join(folder, f".{base}.{secrets.token_hex(4)}{PART}")
    final = posixpath.join(folder, base)
    try:
        emit(f"sending {f.name} ({f.size} bytes)")
        await sftp.put(str(f.path), tmp)
        await sftp.utime(tmp, (mtime, mtime))
        emit(f"checking {f.name}")
        got = await _hash_remote(sftp, tmp)
        if got != f.sha256:
            raise StageError(f"{f.name}: the server's copy has sha256 {got}, not {f.sha256}")
        await sftp.posix_rename(tmp, final)
    except BaseException:
        await _forget(sftp, tmp)
        raise


async def _unchanged(
    sftp: asyncssh.SFTPClient, folder: str, f: Local, sums: dict[str, str], mtime: int
) -> bool:
    base = posixpath.basename(f.name)
    if sums.get(base) != f.sha256:
        return False
    try:
        attrs = await sftp.stat(posixpath.join(folder, base))
    except asyncssh.SFTPNoSuchFile:
        return False
    return attrs.size == f.size and attrs.mtime == mtime


async def upload(
    server: Server, files: Sequence[Local], mtime: int, emit: Callable[[str], None]
) -> Sent:
    """Send `files` (one cell's) to the server, then their folder's SHA256SUMS, then the
    index of every cell's sums in the target's folder (see the module's docstring)."""
    done = Sent()
    by_folder: dict[str, list[Local]] = {}
    for f in files:
        parent = str(PurePosixPath(f.name).parent)
        by_folder.setdefault("" if parent == "." else parent, []).append(f)
    try:
        async with session(server) as sftp:
            for sub, items in by_folder.items():
                folder = posixpath.join(server.folder, sub) if sub else server.folder
                if not await sftp.isdir(folder):
                    await sftp.makedirs(folder, exist_ok=True)
                await _clear_parts(sftp, folder)
                sums_path = posixpath.join(folder, SUMS)
                old_text = await _read_text(sftp, sums_path)
                old = parse_sums(old_text or "")
                todo = []
                for f in items:
                    if await _unchanged(sftp, folder, f, old, mtime):
                        done.skipped.append(f.name)
                    else:
                        todo.append(f)
                # The lines of the files about to be replaced go first: the sums must
                # never name bytes the server does not hold.
                going = {posixpath.basename(f.name) for f in todo}
                kept = {n: d for n, d in old.items() if n not in going}
                if kept != old and await _write_text(sftp, sums_path, sums_text(kept), old_text):
                    old_text = sums_text(kept)
                for f in todo:
                    await _send(sftp, folder, f, mtime, emit)
                    done.sent.append(f.name)
                new = {posixpath.basename(f.name): f.sha256 for f in items}
                if await _write_text(sftp, sums_path, sums_text(new), old_text):
                    done.sums.append(posixpath.join(sub, SUMS) if sub else SUMS)
            if any(by_folder):
                async with _INDEX_LOCKS.setdefault(str(server), anyio.Lock()):
                    if await _write_index(sftp, server.folder):
                        done.sums.append(SUMS)
    except (OSError, asyncssh.Error) as exc:
        raise StageError(_one_line(exc)) from None
    return done


async def _write_index(sftp: asyncssh.SFTPClient, folder: str) -> bool:
    """FOLDER/SHA256SUMS: the lines of every FOLDER/*/SHA256SUMS, as `SUB/NAME`."""
    lines: dict[str, str] = {}
    for entry in await sftp.readdir(folder):
        raw = entry.filename
        name = raw if isinstance(raw, str) else raw.decode(errors="replace")
        if name.startswith(".") or entry.attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            continue
        text = await _read_text(sftp, posixpath.join(folder, name, SUMS))
        for base, digest in parse_sums(text or "").items():
            lines[f"{name}/{base}"] = digest
    path = posixpath.join(folder, SUMS)
    return await _write_text(sftp, path, sums_text(lines), await _read_text(sftp, path))
