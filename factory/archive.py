"""The archive state: what the mirror holds right now, read before any work.

A tree is a function of its packages, and the packages a function of the archive: the
InRelease (or Release) file of every suite a cell uses names, by digest, every index the
tree's packages come from. Its sha256 goes into the rootfs key, so the same archive gives
a cache hit and a moved archive a new tree; its newest `Date:` is the cell's clock
(SOURCE_DATE_EPOCH) unless the matrix sets one. A few KB per suite, fetched concurrently
from the same sources the tree will use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import anyio

from factory import distros, proc
from factory.spec import Cell, Matrix

FETCH_SECONDS = 30


class ArchiveError(Exception):
    """The archive cannot be read: one line naming the suite, its URL and why."""


@dataclass(frozen=True)
class Suite:
    """One suite of one repository, as read now."""

    uri: str
    suite: str
    components: tuple[str, ...]
    date: str  # the Release file's Date: as written
    epoch: int  # that date in seconds
    sha256: str  # of the InRelease (or Release) file's bytes
    url: str  # the file that was read

    def to_json(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "uri": self.uri,
            "components": list(self.components),
            "date": self.date,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class CellArchive:
    """A cell's apt sources (deb822) and the state of every suite they name."""

    sources: str
    suites: tuple[Suite, ...]

    @property
    def epoch(self) -> int:
        """The newest Date: of the cell's suites."""
        return max(s.epoch for s in self.suites)


def family_sources(family: str, release: str, mirror: str, updates: bool, security: bool) -> str:
    """The sources of a family's archive for `release`, or ArchiveError naming the setting."""
    try:
        return distros.get(family).sources(release, mirror, updates, security)
    except ValueError as exc:
        where = 'mirrors.debian = "host": ' if mirror == "host" else ""
        raise ArchiveError(f"{where}{exc}") from None


def cell_sources(matrix: Matrix, cell: Cell) -> str:
    """The sources a cell's tree is built from: the family's archive and the extra
    repositories."""
    m = matrix.mirrors
    family = distros.get(cell.distro.family)
    main = family_sources(family.name, cell.distro.release, m.debian, m.updates, m.security)
    extra = [
        family.extra_source(
            apt_uri(x.uri),
            x.suite,
            x.components,
            _key(x.signed_by) if x.signed_by else None,
            x.trusted,
        )
        for x in m.extra
    ]
    return "\n".join([main, *extra])


def _key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read the key ({exc})") from None


def apt_uri(uri: str) -> str:
    """A file:// repository is given to apt as copy:, which copies its packages into the
    tree's own cache: dpkg runs chrooted, where the repository's path does not exist."""
    return (
        "copy:" + uri.removeprefix("file:").removeprefix("//") if uri.startswith("file:") else uri
    )


def matrix_uri(uri: str) -> str:
    """The URI as the matrix wrote it (apt_uri undone)."""
    return "file://" + uri.removeprefix("copy:") if uri.startswith("copy:") else uri


def release_urls(uri: str, suite: str) -> tuple[str, str]:
    uri = matrix_uri(uri)
    base = f"{uri.rstrip('/')}/dists/{suite}"
    return f"{base}/InRelease", f"{base}/Release"


def parse_release(data: bytes) -> tuple[str, int]:
    """The Date: of a Release or InRelease file, as written and in seconds. A file
    without one is not a Release file."""
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("Date:"):
            text = line.partition(":")[2].strip()
            try:
                return text, int(parsedate_to_datetime(text).timestamp())
            except (TypeError, ValueError):
                raise ValueError(f"its Date: {text!r} is not a date") from None
    raise ValueError("it is not a Release file (no Date: field)")


async def _fetch(url: str) -> bytes:
    """One file by curl (http, https, file), as apt would read it."""
    got = await proc.run(
        [
            "curl",
            "-fsSL",
            "--globoff",  # a URL's {} and [] are characters, not curl's patterns
            "--proto",
            "=http,https,file",
            "--proto-redir",
            "=http,https",
            "--max-time",
            str(FETCH_SECONDS),
            "--retry",
            "2",
            url,
        ],
        capture=True,
        check=False,
    )
    if got.returncode != 0:
        why = [line for line in got.stderr_tail if line.strip()]
        raise OSError(why[-1].strip() if why else f"curl exited {got.returncode}")
    return got.stdout


async def read_suite(uri: str, suite: str, components: tuple[str, ...]) -> Suite:
    inrelease, release = release_urls(uri, suite)
    try:
        url, data = inrelease, await _fetch(inrelease)
    except OSError:
        try:
            url, data = release, await _fetch(release)
        except OSError as exc:
            raise ArchiveError(
                f"archive: suite {suite} at {inrelease}: cannot be read ({exc}); "
                "check the mirror or the matrix's [mirrors]"
            ) from None
    try:
        date, epoch = parse_release(data)
    except ValueError as exc:
        raise ArchiveError(f"archive: suite {suite} at {url}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    return Suite(matrix_uri(uri), suite, components, date, epoch, digest, url)


async def read_all(
    sources: Mapping[str, str], family: str = "debian"
) -> dict[str, CellArchive]:
    """Every suite the cells' sources name, each read once, all at once."""
    suites_of = distros.get(family).suites_of
    wanted = {s for text in sources.values() for s in suites_of(text)}
    found: dict[tuple[str, str, tuple[str, ...]], Suite] = {}
    errors: list[ArchiveError] = []

    async def one(entry: tuple[str, str, tuple[str, ...]]) -> None:
        try:
            found[entry] = await read_suite(*entry)
        except ArchiveError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for entry in sorted(wanted):
            tg.start_soon(one, entry)
    if errors:
        raise sorted(errors, key=str)[0]
    return {
        cell: CellArchive(text, tuple(found[s] for s in suites_of(text)))
        for cell, text in sources.items()
    }


async def read_matrix(matrix: Matrix) -> dict[str, CellArchive]:
    """The archive state of every cell of the matrix, each family's suites read at once."""
    found: dict[str, CellArchive] = {}
    for family in dict.fromkeys(c.distro.family for c in matrix.cells()):
        cells = [c for c in matrix.cells() if c.distro.family == family]
        found.update(await read_all({c.id: cell_sources(matrix, c) for c in cells}, family))
    return found
