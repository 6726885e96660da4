"""The `factory` command: parse, call, print. The work is done elsewhere."""

from __future__ import annotations

import fnmatch
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import anyio
import typer

from factory import plan as planning
from factory import report
from factory.cache import DEFAULT_CACHE, Cache, remove_tree
from factory.events import Bus, Event, JsonSink, PlainSink
from factory.executors.local import LocalExecutor
from factory.scheduler import JobRun, Scheduler, default_jobs
from factory.spec import Matrix, MatrixError, load_matrix
from factory.stages import Workspace

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build a matrix of bootable Linux images: arch × distro × format.",
)
cache_app = typer.Typer(no_args_is_help=True, help="The tree cache.")
app.add_typer(cache_app, name="cache")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

MatrixArg = Annotated[Path, typer.Argument(help="the matrix file (TOML)", show_default=False)]
CacheOpt = Annotated[Path, typer.Option("--cache", help="tree cache folder")]


def fail_usage(message: str) -> typer.Exit:
    print(message, file=sys.stderr)
    return typer.Exit(EXIT_USAGE)


def _load(path: Path) -> Matrix:
    try:
        return load_matrix(path)
    except MatrixError as exc:
        raise fail_usage(str(exc)) from None


def _select(matrix: Matrix, plan: planning.Plan, only: list[str]) -> planning.Plan:
    if not only:
        return plan
    ids = [
        j.id
        for j in plan.jobs
        if any(fnmatch.fnmatchcase(j.cell, g) or fnmatch.fnmatchcase(j.id, g) for g in only)
    ]
    if not ids:
        cells = ", ".join(plan.cells())
        raise fail_usage(
            f"{matrix.path}:1: --only: {' '.join(only)} matches no cell or job (cells: {cells})"
        )
    return plan.select(ids)


@app.command("plan")
def plan_cmd(
    matrix: MatrixArg,
    as_json: Annotated[bool, typer.Option("--json", help="print the jobs as JSON")] = False,
) -> None:
    """Print the jobs a run of MATRIX would do, and what each waits for."""
    m = _load(matrix)
    p = planning.make_plan(m)
    if as_json:
        print(json.dumps(p.to_json(), indent=2))
    else:
        print("\n".join(planning.describe(p)))


@app.command()
def run(
    matrix: MatrixArg,
    out: Annotated[Path | None, typer.Option(help="output folder [default: out/NAME]")] = None,
    jobs: Annotated[int | None, typer.Option(min=1, help="jobs at once [default: cores]")] = None,
    only: Annotated[list[str] | None, typer.Option(help="only cells or jobs matching GLOB")] = None,
    fail_fast: Annotated[bool, typer.Option(help="stop everything at the first failure")] = False,
    events: Annotated[
        Literal["auto", "rich", "plain", "json"], typer.Option(help="progress display")
    ] = "auto",
    cache: CacheOpt = DEFAULT_CACHE,
    refresh: Annotated[bool, typer.Option(help="rebuild cached trees")] = False,
) -> None:
    """Build every image of MATRIX."""
    m = _load(matrix)
    p = _select(m, planning.make_plan(m), only or [])
    out_dir = (out or Path("out") / m.name).absolute()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail_usage(f"{out_dir}: --out: cannot create ({exc.strerror})") from None
    mode = events if events != "auto" else ("rich" if sys.stderr.isatty() else "plain")
    code = anyio.run(_run, m, p, out_dir, jobs or default_jobs(), fail_fast, mode, cache, refresh)
    raise typer.Exit(code)


async def _run(
    m: Matrix,
    p: planning.Plan,
    out: Path,
    jobs: int,
    fail_fast: bool,
    mode: str,
    cache_dir: Path,
    refresh: bool,
) -> int:
    from factory.progress import RichSink

    try:
        cache = await Cache(cache_dir).open()
    except OSError as exc:
        print(f"{cache_dir}: --cache: cannot use ({exc.strerror})", file=sys.stderr)
        return EXIT_USAGE
    rich = RichSink() if mode == "rich" else None
    bus = Bus(rich if rich else JsonSink() if mode == "json" else PlainSink())
    executor = LocalExecutor(Workspace(out, cache, refresh), jobs)
    sched = Scheduler(p, lambda job: executor, bus, out / "logs", fail_fast=fail_fast)
    started = time.time()
    interrupted = False
    if rich:
        rich.__enter__()
    try:
        bus.emit(Event("run-start", data={"matrix": m.name, "jobs": len(p.jobs), "out": str(out)}))
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_signals)
            await sched.run()
            tg.cancel_scope.cancel()
    finally:
        status = _status(sched.runs.values(), interrupted)
        with anyio.CancelScope(shield=True):
            report.write(out, m.name, started, time.time(), status, sched.runs.values())
            await remove_tree(out / ".work")
        bus.emit(Event("run-end", data={"status": status, "out": str(out)}))
        if rich:
            rich.__exit__(None, None, None)
    return {"built": EXIT_OK, "failed": EXIT_FAILED}.get(status, EXIT_INTERRUPTED)


def _status(runs: Iterable[JobRun], interrupted: bool) -> str:
    if interrupted:
        return "interrupted"
    statuses = {r.status for r in runs}
    return "built" if statuses <= {"done"} else "failed"


@app.command()
def boot(
    image: Annotated[Path, typer.Argument(help="a disk image (raw, qcow2, vhd, vmdk, vdi, ...)")],
    arch: Annotated[str, typer.Option(help="the image's architecture")] = "amd64",
    firmware: Annotated[Literal["bios", "uefi"], typer.Option(help="how to boot it")] = "bios",
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for login:")] = 300,
    log: Annotated[Path | None, typer.Option(help="keep the console output here")] = None,
) -> None:
    """Boot IMAGE in QEMU and wait for its login prompt (exit 0), or fail (exit 1)."""
    from factory.proc import logging_to
    from factory.results import StageError
    from factory.stages.boot import boot_image, detect_format

    if not image.is_file():
        raise fail_usage(f"{image}: not a file (give a disk image)")

    async def go() -> float:
        fmt = await detect_format(image)
        with (
            tempfile.TemporaryDirectory(prefix="factory-boot-") as work,
            logging_to(log or Path(work) / "console.log"),
        ):
            return await boot_image(
                image, fmt=fmt, arch=arch, firmware=firmware, timeout=timeout, work=Path(work)
            )

    try:
        seconds = anyio.run(go)
    except StageError as exc:
        print(f"boot: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED) from None
    print(f"{image}: login prompt after {seconds:.1f} s")


@cache_app.command("ls")
def cache_ls(cache: CacheOpt = DEFAULT_CACHE) -> None:
    """List cached trees, least recently used first."""
    c = Cache(cache)
    if not c.trees.is_dir():
        return
    for entry in c.entries():
        meta = entry.meta()
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.path.stat().st_mtime))
        size = meta.get("bytes", 0) / 2**20
        print(
            f"{entry.key[:16]}  {meta.get('kind', '?'):<9} {meta.get('cell', '?'):<28} "
            f"{size:8.0f} MiB  used {used}"
        )


@cache_app.command("prune")
def cache_prune(
    cache: CacheOpt = DEFAULT_CACHE,
    older_than: Annotated[float, typer.Option(help="remove trees unused for DAYS")] = 7.0,
    all_: Annotated[bool, typer.Option("--all", help="remove every tree")] = False,
) -> None:
    """Remove cached trees not used lately (or all of them)."""

    async def prune() -> int:
        c = await Cache(cache).open()
        limit = time.time() - older_than * 86400
        removed = 0
        for entry in c.entries():
            if all_ or entry.path.stat().st_mtime < limit:
                async with c.lock(entry.key):
                    if c.get(entry.key):
                        await c.remove(entry.key)
                        removed += 1
        return removed

    print(f"removed {anyio.run(prune)} trees")


def main() -> None:
    app()
