"""Progress on a terminal: one bar for the run, a row for each running job.

A job whose tools say how far they are (progress events with data done and total) gets a
percentage bar; the others a pulsing one. The run's bar counts estimated seconds, not jobs:
each job weighs its stage's cost (what the scheduler ranks by), a finished job all of it
and a running one its fraction of it, so a long conversion moves the bar as it goes and
ten quick publishes do not.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from factory.events import Event, fraction, summary

_END = {
    "done": "[green]done[/]",
    "failed": "[red]FAILED[/]",
    "skipped": "[yellow]skipped[/]",
    "cancelled": "[yellow]cancelled[/]",
}


class _Left(ProgressColumn):
    """Time left (`~M:SS`), where a bar has a total to go by (rich's estimate from its
    speed so far)."""

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        if task.total is None or left is None or task.finished:
            return Text("")
        minutes, seconds = divmod(int(left), 60)
        return Text(f"~{minutes}:{seconds:02d}", style="progress.remaining")


class RichSink:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            _Left(),
            console=self.console,
            transient=False,
        )
        self.total: TaskID | None = None
        self.running: dict[str, TaskID] = {}
        self.costs: dict[str, float] = {}
        self.parts: dict[str, float] = {}  # a running job's fraction
        self.jobs = 0
        self.ended = 0
        self.spent = 0.0  # the costs of the jobs that ended

    def __enter__(self) -> RichSink:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def cost(self, job: str | None) -> float:
        return self.costs.get(job or "", 1.0)

    def _advance_run(self) -> None:
        if self.total is None:
            return
        done = self.spent + sum(self.cost(j) * part for j, part in self.parts.items())
        self.progress.update(self.total, completed=done, count=f"{self.ended}/{self.jobs} jobs")

    def __call__(self, event: Event) -> None:
        p = self.progress
        if event.kind == "run-start":
            self.jobs = int(event.data.get("jobs") or 0)
            costs = event.data.get("costs")
            if isinstance(costs, dict):
                self.costs = {str(k): float(v) for k, v in costs.items()}
            weight = sum(self.costs.values()) if self.costs else float(self.jobs)
            self.total = p.add_task(
                f"[bold]{event.data.get('matrix')}[/]",
                total=weight or None,
                count=f"0/{self.jobs} jobs",
            )
        elif event.kind == "start" and event.job:
            where = f" [dim]on {event.host}[/]" if event.host else ""
            self.running[event.job] = p.add_task(f"  {event.job}{where}", total=None, count="")
        elif event.kind == "progress" and event.job in self.running:
            task = self.running[event.job]
            part = fraction(event)
            if part is not None:
                self.parts[event.job] = part
                p.update(task, total=100, completed=100 * part, count=f"{part:4.0%}")
                self._advance_run()
            elif event.message:
                p.update(task, description=f"  {event.job}: {event.message}")
        elif event.kind in _END and event.job:
            if event.job in self.running:
                p.remove_task(self.running.pop(event.job))
            self.parts.pop(event.job, None)
            self.ended += 1
            self.spent += self.cost(event.job)
            self._advance_run()
            if event.kind != "done" or event.job_kind in ("publish", "rootfs", "assemble"):
                detail = f": {event.message}" if event.message else ""
                p.console.print(f"{_END[event.kind]} {event.job}{detail}", highlight=False)
        elif event.kind == "run-end":
            p.console.print(summary(event), highlight=False)
        elif event.kind == "artifact":
            p.console.print(f"  → {event.data.get('path')}", highlight=False)
