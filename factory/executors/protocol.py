"""The wire between a controller and a `factory worker`, as checked models.

One JSON object per line. The controller writes the `Request`, then `Go` lines, to the
worker's stdin; the worker writes events (`factory.events.Event`, as `factory run
--events json`) to its stdout, the last one `run-end`. Both ends build what they send from
these models and validate what they receive with them, so a line that is not what this
version sends is refused with one line saying which field is wrong, never a traceback:
the worker answers a bad request with its `run-end` status "refused"; the controller
treats a bad event as the loss of its worker (its jobs move to another host).

Both ends ship together (the request's `protocol` must equal the worker's), so a change
of shape bumps PROTOCOL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from factory.events import Event, EventKind, first_error
from factory.plan import Plan

PROTOCOL = 2  # 2: done and failed events carry the job's log (and manifest) inline
FOLDER_PREFIX = "factory-"  # a session's folder on a host: the worker cleans up stale ones

_WIRE = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Malformed(ValueError):
    """A line on the wire is not what this version sends; the message says why (one line)."""


def _absolute(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError(f"{value!r} is not an absolute path")
    return value


AbsolutePath = Annotated[StrictStr, AfterValidator(_absolute)]


class Request(BaseModel):
    """The controller's request: a self-consistent plan and plain absolute paths. `dir` is
    the session's folder there (the controller made it; the worker removes it)."""

    model_config = _WIRE

    protocol: StrictInt = PROTOCOL
    plan: Plan
    dir: AbsolutePath
    cache: AbsolutePath
    refresh: StrictBool = False
    loop: StrictBool = False  # --loop
    auto: tuple[StrictStr, ...] = ()  # jobs to run at once: their outputs were on a lost host
    fetch: tuple[StrictStr, ...] = ()  # jobs whose file the controller fetches (see RemoteFile)

    @model_validator(mode="after")
    def _known_ids(self) -> Request:
        if self.protocol != PROTOCOL:
            raise ValueError(f"protocol {self.protocol} is not {PROTOCOL}")
        ids = {j.id for j in self.plan.jobs}
        for name in ("auto", "fetch"):
            unknown = [jid for jid in getattr(self, name) if jid not in ids]
            if unknown:
                raise ValueError(f"field {name}: {unknown[0]!r} is not a job of the plan")
        return self

    def line(self) -> str:
        return self.model_dump_json() + "\n"

    @classmethod
    def parse(cls, line: str) -> Request:
        """The worker's reading of the first line; Malformed says what is wrong with it.
        The protocol is checked first: another version may send another shape."""
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise Malformed(f"the request is not JSON ({exc})") from None
        got = data.get("protocol") if isinstance(data, dict) else None
        if got != PROTOCOL or type(got) is not int:
            raise Malformed(
                f"protocol {got!r} is not this worker's {PROTOCOL} "
                "(install the same factory version on the controller and the host)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            detail = first_error(exc)
            raise Malformed(f"the controller sent a malformed request: {detail}") from None


class Go(BaseModel):
    """The controller's scheduler starts a job (it holds a slot of the host for it)."""

    model_config = _WIRE

    go: StrictStr

    def line(self) -> str:
        return self.model_dump_json() + "\n"

    @classmethod
    def parse(cls, line: str, jobs: Container[str]) -> Go:
        """A go line for one of `jobs` (the plan's job ids)."""
        try:
            go = cls.model_validate_json(line)
        except ValidationError as exc:
            detail = first_error(exc)
            raise Malformed(f"the controller sent a malformed go line: {detail}") from None
        if go.go not in jobs:
            raise Malformed(f"the controller sent go for {go.go!r}, which is not a job of the plan")
        return go


def extents_of(value: object, size: int) -> list[tuple[int, int]]:
    """The worker's data extents of a file, if they are well formed; else the whole file.
    They only say what to read: a bad list costs time, never correctness (the copy's
    sha256 is checked against the worker's)."""
    whole = [(0, size)]
    if not isinstance(value, list | tuple):
        return whole
    found: list[tuple[int, int]] = []
    for item in value:
        if not (
            isinstance(item, list | tuple) and len(item) == 2 and all(type(n) is int for n in item)
        ):
            return whole
        start, length = item
        if start < 0 or length < 0 or start + length > size:
            return whole
        found.append((start, length))
    return found


SHA256 = re.compile(r"[0-9a-f]{64}")


class RemoteFile(BaseModel):
    """A fetched job's file on the host (its `done` info's "remote"): where it is, its
    exact size and sha256, and the (start, length) extents that hold data."""

    model_config = _WIRE

    path: AbsolutePath
    size: StrictInt = Field(ge=0)
    sha256: StrictStr = Field(pattern=SHA256.pattern)
    extents: tuple[tuple[int, int], ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _extents(cls, data: Any) -> Any:
        if isinstance(data, dict) and type(data.get("size")) is int:
            data = {**data, "extents": extents_of(data.get("extents"), data["size"])}
        return data


class JobInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    remote: RemoteFile | None = None


# A job's log, and a finalise's manifest, ride in its done or failed event up to this size:
# the controller needs both, and reading each by SFTP took 4 round trips (tests/farm.py).
# A bigger file is read by SFTP from the session folder, as before.
INLINE_TEXT = 256 * 1024


class _DoneData(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    info: JobInfo = JobInfo()
    log: StrictStr | None = Field(default=None, max_length=INLINE_TEXT)
    manifest_text: StrictStr | None = Field(default=None, max_length=INLINE_TEXT)


class _FailedData(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    tail: list[StrictStr] = []
    log: StrictStr | None = Field(default=None, max_length=INLINE_TEXT)


class _EndData(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    status: StrictStr


# What the controller reads from each kind's data; other keys are carried as they are.
_DATA: dict[EventKind, type[BaseModel]] = {
    "done": _DoneData,
    "failed": _FailedData,
    "run-end": _EndData,
}


def parse_event(line: str, host: str) -> Event:
    """An event line from the worker on `host`; Malformed (one line) if it is not one."""
    try:
        event = Event.from_json(line)
    except ValueError as exc:
        raise Malformed(f"worker on {host} sent a malformed event: {exc}") from None
    model = _DATA.get(event.kind)
    if model is not None:
        try:
            model.model_validate(event.data)
        except ValidationError as exc:
            detail = first_error(exc, under="data")
            raise Malformed(f"worker on {host} sent a malformed event: {detail}") from None
    return event


def remote_file(info: Any) -> RemoteFile | None:
    """The "remote" of a done event's info (parse_event has checked it), if any."""
    if isinstance(info, dict) and "remote" in info:
        return RemoteFile.model_validate(info["remote"])
    return None


__all__ = [
    "FOLDER_PREFIX",
    "INLINE_TEXT",
    "PROTOCOL",
    "Go",
    "Malformed",
    "RemoteFile",
    "Request",
    "extents_of",
    "parse_event",
    "remote_file",
]
