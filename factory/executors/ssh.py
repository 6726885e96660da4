"""The SSH transport: how placement's sessions reach a build host, with asyncssh.

One connection per host (keepalives; 3 unanswered and the host is lost), one SFTP session
on it for every file (hooks out, logs, manifests and artifacts back), and per session a
folder under the host's workdir and `COMMAND worker` (nothing else on the remote command
line: every value travels as JSON on its stdin, see protocol.py).
"""

from __future__ import annotations

import contextlib
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import aiofiles
import anyio
import asyncssh

from factory.executors.placement import Channel, HostLost, Link, one_line
from factory.executors.protocol import FOLDER_PREFIX, Go, Request
from factory.results import StageError
from factory.spec import Host

KEEPALIVE_INTERVAL = 5.0  # seconds between keepalives; 3 unanswered and the host is lost
KEEPALIVE_COUNT = 3
CONNECT_TIMEOUT = 20.0
CLOSE_TIMEOUT = 20.0  # for a worker to stop and clean up after its stdin closes
# AES-GCM first: asyncssh's own first choice, chacha20-poly1305, builds several cipher
# objects per packet in Python, AES-GCM is one call into OpenSSL (AES-NI). At 50 hosts that
# was a third of the controller's CPU (scripts/bench --farm-only). The other ciphers stay
# offered, for a server without GCM.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
CHUNK = 8 * 1024 * 1024
ZEROS = bytes(CHUNK)


def known_hosts_for(host: Host) -> str | None:
    """What asyncssh checks the host key against: the known_hosts file when it names this
    host; None (accept) only for a host it does not name and trust_unknown_hosts = true.
    A host the file names with another key is refused by asyncssh itself."""
    path = host.known_hosts
    hint = (
        f"check its fingerprint, then add it: ssh-keyscan -p {host.port} {host.address} >> "
        f"{path}; or set trust_unknown_hosts = true for this host"
    )
    if path.is_file():
        try:
            known = asyncssh.read_known_hosts(str(path))
        except (OSError, ValueError, asyncssh.Error) as exc:
            raise StageError(f"{path}: cannot read known_hosts ({one_line(exc)})") from None
        matched = known.match(host.address, host.address, host.port)
        if matched[0] or matched[1]:  # trusted host keys or CA keys
            return str(path)
        if host.trust_unknown_hosts:
            return None
        raise StageError(f"host key refused: {path} has no key for this host ({hint})")
    if host.trust_unknown_hosts:
        return None
    raise StageError(f"host key refused: {path} does not exist ({hint})")


class SshLink(Link):
    """One build host over SSH: its one connection and SFTP session, opened once."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.workdir_made = False

    async def open(self) -> None:
        h = self.host
        link = self

        class Client(asyncssh.SSHClient):
            def connection_lost(self, exc: Exception | None) -> None:
                link.lost(f"connection lost ({one_line(exc) if exc else 'closed'})")

        try:
            known = known_hosts_for(h)
            with anyio.fail_after(CONNECT_TIMEOUT):
                self.conn = await asyncssh.connect(
                    h.address,
                    port=h.port,
                    username=h.user,
                    known_hosts=known,
                    client_keys=[str(h.key)] if h.key else (),  # () = agent + ~/.ssh/id_*
                    client_factory=Client,
                    keepalive_interval=KEEPALIVE_INTERVAL,
                    keepalive_count_max=KEEPALIVE_COUNT,
                    connect_timeout=CONNECT_TIMEOUT,
                    encryption_algs=CIPHERS,
                )
                self.sftp = await self.conn.start_sftp_client()
            self.workdir_made = False  # a new connection: the host may have been wiped
            self.down = None
        except StageError as exc:
            self.down = str(exc)
        except asyncssh.HostKeyNotVerifiable as exc:
            self.down = (
                f"host key refused: it does not match {h.known_hosts} ({one_line(exc)}; if "
                "the host was reinstalled, replace its line there after checking the new key)"
            )
        except TimeoutError:
            self.down = f"no answer in {CONNECT_TIMEOUT:.0f} s"
        except (OSError, asyncssh.Error, ValueError) as exc:
            self.down = one_line(exc)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            if self.sftp is not None:
                self.sftp.exit()
            if self.conn is not None:
                self.down = self.down or "closed"
                self.conn.close()
                await self.conn.wait_closed()

    def usable(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        if self.conn is None or self.sftp is None or self.down is not None:
            raise HostLost(f"{self.host.name}: {self.down or 'not connected'}")
        return self.conn, self.sftp

    def lost_by(self, exc: Exception) -> HostLost:
        """What an SSH error means for the session: its host is gone."""
        return HostLost(f"{self.host.name}: {self.down or one_line(exc)}")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[SshChannel]:
        """The session's folder on the host; removed at the end (the worker removes it
        too, and the next worker there removes those of killed workers)."""
        _, sftp = self.usable()
        workdir = self.host.workdir.rstrip("/")
        folder = f"{workdir}/{FOLDER_PREFIX}{secrets.token_hex(8)}"
        try:
            if not self.workdir_made:  # once per connection: a farm runs many sessions
                await sftp.makedirs(workdir, exist_ok=True)
                self.workdir_made = True
            await sftp.mkdir(folder, asyncssh.SFTPAttrs(permissions=0o700))
        except asyncssh.Error as exc:
            self.workdir_made = False  # removed by hand meanwhile? made again next time
            raise self.lost_by(exc) from exc
        channel = SshChannel(self, folder)
        try:
            yield channel
        finally:
            # A worker that exited 0 has removed the folder itself: asking again would cost
            # a few round trips per session for nothing.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                if self.down is None and self.sftp is not None and not channel.cleaned():
                    with contextlib.suppress(OSError, asyncssh.Error):
                        await self.sftp.rmtree(folder, ignore_errors=True)


class SshChannel(Channel):
    """One session: its folder on the host and the worker process started in it."""

    def __init__(self, link: SshLink, folder: str) -> None:
        self.link = link
        self.folder = folder
        self.host = link.host.name
        self.process: asyncssh.SSHClientProcess[str] | None = None
        self.stderr: deque[str] = deque(maxlen=20)

    async def put(self, local: Path, there: str) -> None:
        _, sftp = self.link.usable()
        try:
            await sftp.makedirs(there.rsplit("/", 1)[0], exist_ok=True)
            await sftp.put(str(local), there, recurse=True, preserve=True)
        except asyncssh.Error as exc:
            raise self.link.lost_by(exc) from exc

    @contextlib.asynccontextmanager
    async def worker(self, request: Request) -> AsyncIterator[None]:
        """`COMMAND worker`, nothing else, on the remote command line; stopped by closing
        its stdin, then by a signal, then by closing the channel."""
        conn, _ = self.link.usable()
        command = f"{self.link.host.command} worker"  # validated: no shell syntax
        try:
            process = await conn.create_process(command, encoding="utf-8")
        except asyncssh.Error as exc:
            raise self.link.lost_by(exc) from exc
        self.process = process
        try:
            self._write(request.line())
            yield
        finally:
            with anyio.CancelScope(shield=True):
                self.stop()
                with anyio.move_on_after(CLOSE_TIMEOUT):
                    await process.wait_closed()
                if process.exit_status is None and process.exit_signal is None:
                    with contextlib.suppress(OSError, asyncssh.Error):
                        process.kill()
                process.close()
                with anyio.move_on_after(5):
                    await process.wait_closed()

    def _write(self, line: str) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.process.stdin.write(line)

    def send(self, go: Go) -> None:
        self._write(go.line())

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.process.stdin.write_eof()

    async def watch(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            async for line in self.process.stderr:
                if line.strip():
                    self.stderr.append(line.rstrip("\n"))

    async def lines(self) -> AsyncIterator[str]:
        if self.process is None:
            return
        try:
            async for line in self.process.stdout:
                yield line
        except asyncssh.Error as exc:
            raise self.link.lost_by(exc) from exc

    def cleaned(self) -> bool:
        """The worker exited 0: it removed the session's folder before it exited."""
        return self.process is not None and self.process.exit_status == 0

    def ended(self) -> str:
        process = self.process
        how = (
            "stopped"
            if process is None
            else f"killed by signal {process.exit_signal[0]}"
            if process.exit_signal
            else f"exited {process.exit_status}"
            if process.exit_status is not None
            else "stopped"
        )
        last = f": {self.stderr[-1]}" if self.stderr else ""
        return f"{how}{last}"

    async def read_text(self, path: str) -> str:
        """A small file from the session's folder; a lost host is HostLost."""
        try:
            _, sftp = self.link.usable()
            async with sftp.open(path, "r", encoding="utf-8", errors="replace") as fh:
                text = await fh.read()
        except (OSError, asyncssh.Error) as exc:
            if self.link.down is not None:
                raise HostLost(f"{self.host}: {self.link.down}") from exc
            raise StageError(f"{path} on {self.host}: {one_line(exc)}") from exc
        return str(text)

    async def fetch(
        self, path: str, dest: Path, size: int, extents: Sequence[tuple[int, int]]
    ) -> None:
        """Copy a file exactly, holes kept as holes: only its data extents are read (the
        worker's list; a raw disk is mostly holes) and blocks of zeros are not written.
        A dropped connection is a lost host; a short file is an error."""
        _, sftp = self.link.usable()
        try:
            async with sftp.open(path, "rb") as src, aiofiles.open(dest, "wb") as out:
                for start, length in extents:
                    offset, end = start, start + length
                    while offset < end:
                        want = min(CHUNK, end - offset)
                        chunk = cast(bytes, await src.read(want, offset))
                        if not chunk:
                            raise StageError(f"{path} on {self.host}: ended at {offset} of {size}")
                        if chunk != ZEROS[: len(chunk)]:
                            await out.seek(offset)
                            await out.write(chunk)
                        offset += len(chunk)
                await out.truncate(size)
        except (OSError, asyncssh.Error) as exc:
            if self.link.down is not None or isinstance(exc, asyncssh.DisconnectError):
                raise HostLost(f"{self.host}: {self.link.down or one_line(exc)}") from exc
            if isinstance(exc, asyncssh.SFTPError):
                raise HostLost(f"fetching {path} from {self.host}: {one_line(exc)}") from exc
            raise


__all__ = ["SshChannel", "SshLink", "known_hosts_for"]
