"""The stages: each turns a job and its inputs into an output, with real tools.

A stage reads only its job's params and its inputs' outputs, so the same job runs the
same here or on a remote worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from factory.cache import Cache
from factory.plan import Job
from factory.results import Output, StageError


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
