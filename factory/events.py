"""What happened during a run, as data.

The scheduler and the stages emit `Event`s; sinks turn them into progress bars, plain
lines, JSON lines (also what a remote worker streams back) and the report.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Literal, TextIO

from pydantic import ConfigDict, TypeAdapter, ValidationError

EventKind = Literal[
    "run-start",  # data: matrix, jobs, costs (job id: estimated seconds)
    "start",  # a job began
    "progress",  # message: what the job is doing now; or no message and data: done, total
    "done",  # a job finished
    "failed",  # message: the error; data: tail
    "skipped",  # a dependency failed or the run was cancelled before it began
    "cancelled",  # the job was running when the run was cancelled
    "artifact",  # data: cell, format, path, size, sha256
    "run-end",  # data: status
]

Sink = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    kind: EventKind
    job: str | None = None
    job_kind: str | None = None
    cell: str | None = None
    host: str | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    # How from_json reads a line: every field of its type, no others (pydantic reads this).
    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False
    )

    def to_json(self) -> str:
        """One JSON line. Shallow: `asdict` deep-copied every event's data first, a third
        of a farm controller's cost of events (a nested dataclass is still turned into its
        fields)."""
        line = {name: getattr(self, name) for name in _FIELDS}
        return json.dumps(line, sort_keys=True, default=_plain)

    @classmethod
    def from_json(cls, line: str) -> Event:
        """An event from a JSON line that may come from another host: each field checked
        (kind one of EventKind, the types of the others, no unknown fields); ValueError
        with one line saying what is wrong."""
        try:
            return _EVENT.validate_json(line)
        except ValidationError as exc:
            raise ValueError(first_error(exc)) from None


_FIELDS = tuple(f.name for f in fields(Event))


def _plain(value: object) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def first_error(exc: ValidationError, under: str = "") -> str:
    """A pydantic error as one line: the first wrong field (`under`: where the validated
    value sits) and what is wrong with it, and how many more there are."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = ".".join(str(p) for p in (*([under] if under else []), *err["loc"]))
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "json_invalid":
        return f"not JSON ({msg.removeprefix('Invalid JSON: ')})"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = "unknown field"
    elif err["type"] not in ("missing", "value_error", "assertion_error") and "input" in err:
        got = repr(err["input"])
        msg += f" (got {got[:60] + '...' if len(got) > 60 else got})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"field {loc}: {msg}{more}" if loc else f"{msg}{more}"


_EVENT = TypeAdapter(Event)


class Bus:
    """Fans events out to every sink, in order."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks: list[Sink] = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)


def summary(event: Event) -> str:
    """The last line of a run: what came of it and where to look."""
    d = event.data
    text = f"run {d.get('status')}: {d.get('artifacts', 0)} artifacts in {d.get('out')}"
    text += f" ({d.get('seconds', 0):.0f} s)"
    failed = d.get("failed") or []
    if failed:
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        text += f"; {failed[0]}{more} failed (see report.json and logs/)"
    return text


def _describe(event: Event) -> str:
    what = event.job or ""
    where = f" on {event.host}" if event.host else ""
    if event.kind == "run-start":
        return f"run {event.data.get('matrix')}: {event.data.get('jobs')} jobs"
    if event.kind == "run-end":
        return summary(event)
    if event.kind == "artifact":
        return f"artifact {event.data.get('path')} ({event.data.get('size')} bytes)"
    text = f"{event.kind:<9} {what}{where}"
    return f"{text}: {event.message}" if event.message else text


def fraction(event: Event) -> float | None:
    """How far a job is, from a progress event with data done and total (0 to 1)."""
    done, total = event.data.get("done"), event.data.get("total")
    if event.kind != "progress" or not isinstance(done, int | float):
        return None
    if not isinstance(total, int | float) or total <= 0:
        return None
    return min(1.0, max(0.0, done / total))


PLAIN_FRACTION_EVERY = 10.0  # seconds: a plain log gets a job's percentage this often at most


class PlainSink:
    """One line per event: for logs, pipes and CI. A job's fractions come a few a second;
    one line per PLAIN_FRACTION_EVERY seconds of them is enough for a log."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._said: dict[str | None, float] = {}

    def __call__(self, event: Event) -> None:
        part = fraction(event)
        if part is not None:
            if event.time - self._said.get(event.job, -PLAIN_FRACTION_EVERY) < PLAIN_FRACTION_EVERY:
                return
            self._said[event.job] = event.time
            event = Event(
                "progress", event.job, event.job_kind, event.cell, event.host,
                f"{part:.0%}", time=event.time,
            )  # fmt: skip
        stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
        print(f"{stamp} {_describe(event)}", file=self.stream, flush=True)


class JsonSink:
    """JSON lines: for machines (and the remote worker's stream back to the controller)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        print(event.to_json(), file=self.stream, flush=True)
