"""Progress on a terminal: one bar for the run, a spinner for each running job."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from factory.events import Event, summary

_END = {
    "done": "[green]done[/]",
    "failed": "[red]FAILED[/]",
    "skipped": "[yellow]skipped[/]",
    "cancelled": "[yellow]cancelled[/]",
}


class RichSink:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.total: TaskID | None = None
        self.running: dict[str, TaskID] = {}

    def __enter__(self) -> RichSink:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, event: Event) -> None:
        p = self.progress
        if event.kind == "run-start":
            self.total = p.add_task(
                f"[bold]{event.data.get('matrix')}[/]", total=event.data.get("jobs")
            )
        elif event.kind == "start" and event.job:
            where = f" [dim]on {event.host}[/]" if event.host else ""
            self.running[event.job] = p.add_task(f"  {event.job}{where}", total=None)
        elif event.kind == "progress" and event.job in self.running:
            p.update(self.running[event.job], description=f"  {event.job}: {event.message}")
        elif event.kind in _END and event.job:
            task = self.running.pop(event.job, None)
            if task is not None:
                p.remove_task(task)
            if self.total is not None:
                p.advance(self.total)
            if event.kind != "done" or event.job_kind in ("publish", "rootfs", "assemble"):
                detail = f": {event.message}" if event.message else ""
                p.console.print(f"{_END[event.kind]} {event.job}{detail}", highlight=False)
        elif event.kind == "run-end":
            p.console.print(summary(event), highlight=False)
        elif event.kind == "artifact":
            p.console.print(f"  → {event.data.get('path')}", highlight=False)
