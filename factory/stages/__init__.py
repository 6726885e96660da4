"""The stages: each turns a job and its inputs into an output, with real tools.

A stage reads only its job's params and its inputs' outputs, so the same job runs the
same here or on a remote worker. Each stage module declares a `STAGE`: its kind, its
recipe, its cost, its frozen `Params` model and its `run`; factory.stages.registry
collects them and fingerprints their code for the job keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from factory.cache import Cache
from factory.results import Output, StageError

if TYPE_CHECKING:
    from factory.plan import Job


class StageParams(BaseModel):
    """A stage's parameters: frozen, and nothing it does not know."""

    model_config = ConfigDict(frozen=True, extra="forbid")


P = TypeVar("P", bound=StageParams)


def one_line(exc: ValidationError) -> str:
    """A pydantic error as one line: the first field's place and message."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "params"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


@dataclass(frozen=True)
class Stage:
    """What the registry knows of a stage. `cost` is rough CPU seconds from the job's
    params, for ordering work (longest chains first), never for promises."""

    kind: str
    recipe: int  # bump when the stage's output changes for a reason its code does not show
    params: type[StageParams]
    run: Callable[[Context], Awaitable[Output]]
    cost: Callable[[Mapping[str, Any]], float]
    module: str  # where it is, for the code fingerprint


@dataclass(frozen=True)
class Workspace:
    """Where a run keeps things: OUT for artifacts, OUT/.work beside them for the
    intermediate files (same filesystem, so publishing is a rename), the tree cache."""

    out: Path
    cache: Cache
    refresh: bool = False
    cpus: int | None = None  # threads one job's tool may use: the run's --jobs; None: the cores
    loop: bool = False  # --loop: fill disks through a loop device and a mount

    @property
    def work(self) -> Path:
        return self.out / ".work"


@dataclass(frozen=True)
class Context:
    job: Job
    inputs: Mapping[str, Output]
    ws: Workspace
    emit: Callable[[str], None]

    def params(self, model: type[P]) -> P:
        """The job's params as the stage's model: checked again here, where they are used
        (a worker's plan came over the wire)."""
        try:
            return model.model_validate(self.job.params)
        except ValidationError as exc:
            raise StageError(f"{self.job.id}: malformed params: {one_line(exc)}") from None

    def input(self, kind: str) -> Output:
        """The output of the one dependency of `kind`."""
        found = [out for jid, out in self.inputs.items() if jid.split(":", 1)[0] == kind]
        if len(found) != 1:
            raise StageError(f"{self.job.id} needs one {kind} input, has {len(found)}")
        return found[0]

    def input_path(self, kind: str) -> Path:
        path = self.input(kind).path
        if path is None:
            raise StageError(f"{self.job.id}: the {kind} input has no file")
        return path

    @property
    def cell_work(self) -> Path:
        path = self.ws.work / self.job.cell
        path.mkdir(parents=True, exist_ok=True)
        return path

    def layout_work(self, layout: str) -> Path:
        """A folder of the cell's disk in `layout`: a cell may have several disks."""
        path = self.cell_work / layout
        path.mkdir(exist_ok=True)
        return path
