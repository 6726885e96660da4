"""The `factory` command: parse, call, print. The work is done elsewhere."""

from __future__ import annotations

import fnmatch
import functools
import gc
import importlib.metadata
import inspect
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

import anyio
import typer

from factory import archive as archives
from factory import outstate, state
from factory import plan as planning
from factory.cache import DEFAULT_CACHE, Cache
from factory.runner import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Options, RunRefused, run_plan
from factory.scheduler import default_jobs
from factory.spec import Matrix, MatrixError, load_matrix

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build a matrix of bootable Linux images: arch × distro × format.",
)
cache_app = typer.Typer(no_args_is_help=True, help="The tree cache.")
app.add_typer(cache_app, name="cache")
ci_app = typer.Typer(no_args_is_help=True, help="CI pipelines that build a matrix's cells apart.")
app.add_typer(ci_app, name="ci")

MatrixArg = Annotated[
    Path, typer.Argument(metavar="MATRIX", help="the matrix file (TOML)", show_default=False)
]
CacheOpt = Annotated[Path, typer.Option("--cache", help="tree cache folder")]


def _version(value: bool) -> None:
    if value:
        print(f"factory {importlib.metadata.version('factory')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Options of factory itself, before the command."""


def fail_usage(message: str) -> typer.Exit:
    print(message, file=sys.stderr)
    return typer.Exit(EXIT_USAGE)


def _load(path: Path) -> Matrix:
    try:
        return load_matrix(path)
    except MatrixError as exc:
        raise fail_usage(str(exc)) from None


def _archive(matrix: Matrix) -> dict[str, archives.CellArchive]:
    """Every cell's archive state, read before any work; unreadable: one line, exit 2."""
    try:
        return anyio.run(archives.read_matrix, matrix)
    except archives.ArchiveError as exc:
        raise fail_usage(f"{matrix.path}: {exc}") from None


def _describe_archive(states: dict[str, archives.CellArchive], matrix: Matrix) -> list[str]:
    lines = ["", "archive state (suite, Date:, InRelease sha256):"]
    seen: set[tuple[str, str]] = set()
    for cell, st in states.items():
        epoch = planning.cell_epoch(matrix, st)
        lines.append(f"  {cell}: epoch {epoch} ({outstate.utc(epoch)})")
        for s in st.suites:
            if (s.uri, s.suite) in seen:
                continue
            seen.add((s.uri, s.suite))
            lines.append(f"    {s.suite:<24} {s.date:<32} {s.sha256[:16]}  {s.url}")
    return lines


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
    states = _archive(m)
    p = planning.make_plan(m, states)
    if as_json:
        doc = p.to_json()
        doc["archive"] = {
            cell: {
                "epoch": planning.cell_epoch(m, st),
                "suites": [s.to_json() for s in st.suites],
            }
            for cell, st in states.items()
        }
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join([*planning.describe(p), *_describe_archive(states, m)]))


@app.command()
def run(
    matrix: MatrixArg,
    out: Annotated[Path | None, typer.Option(help="output folder", show_default="out/NAME")] = None,
    jobs: Annotated[
        int | None, typer.Option(min=1, help="jobs at once", show_default="the cores")
    ] = None,
    only: Annotated[list[str] | None, typer.Option(help="only cells or jobs matching GLOB")] = None,
    fail_fast: Annotated[bool, typer.Option(help="stop everything at the first failure")] = False,
    events: Annotated[
        Literal["auto", "rich", "plain", "json"], typer.Option(help="progress display")
    ] = "auto",
    cache: CacheOpt = DEFAULT_CACHE,
    refresh: Annotated[bool, typer.Option(help="rebuild cached trees")] = False,
    boot_test: Annotated[
        bool, typer.Option("--boot-test", help="boot each cell's disk in QEMU to a login prompt")
    ] = False,
    loop: Annotated[
        bool,
        typer.Option(
            "--loop", help="fill disks through a loop device and a mount (diskimage-builder's way)"
        ),
    ] = False,
    pipeline: Annotated[
        str | None,
        typer.Option(
            metavar="VERSION/SHA256",
            help="refuse to run unless factory and MATRIX are still these (set by factory ci)",
        ),
    ] = None,
) -> None:
    """Build every image of MATRIX."""
    from factory import ci

    try:  # a stale CI pipeline stops here, before the matrix is even read
        digest = ci.matrix_digest(matrix) if matrix.is_file() else ""
        if pipeline is not None:
            ci.check_pipeline(matrix, pipeline)
    except (ci.CiError, OSError) as exc:
        raise fail_usage(str(exc)) from None
    m = _load(matrix)
    if boot_test:
        m = m.model_copy(update={"image": m.image.model_copy(update={"boot_test": True})})
    p = _select(m, planning.make_plan(m, _archive(m)), only or [])
    out_dir = (out or Path("out") / m.name).absolute()
    mode = events if events != "auto" else ("rich" if sys.stderr.isatty() else "plain")
    opts = Options(
        out=out_dir,
        cache=cache.absolute(),
        jobs=jobs or default_jobs(),
        fail_fast=fail_fast,
        refresh=refresh,
        loop=loop,
        events=mode,
        matrix_sha256=digest,
    )
    # The matrix, the plan and the imports live as long as the run: frozen out of the
    # collector, its full collections need not walk them again (a farm's controller
    # spent about 5 % of its CPU there: tests/farm.py). Garbage is collected first, so
    # only what is alive is frozen.
    gc.collect()
    gc.freeze()
    try:
        code = anyio.run(run_plan, m, p, opts)
    except RunRefused as exc:
        raise fail_usage(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def clean(cache: CacheOpt = DEFAULT_CACHE) -> None:
    """Undo what killed runs left behind: their processes, mounts, loop devices and
    half-built trees."""
    for line in state.clean_leftovers():
        print(line)

    async def tidy() -> None:
        await Cache(cache).open()

    anyio.run(tidy)


@app.command()
def boot(
    image: Annotated[
        Path,
        typer.Argument(metavar="IMAGE", help="a disk image (raw, qcow2, vhd, vmdk, vdi, ...)"),
    ],
    arch: Annotated[
        str | None,
        typer.Option(help="the image's architecture", show_default="read from the image"),
    ] = None,
    firmware: Annotated[
        Literal["bios", "uefi", "uefi-secureboot"] | None,
        typer.Option(help="how to boot it", show_default="uefi if BIOS cannot, else bios"),
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for login:")] = 300,
    log: Annotated[Path | None, typer.Option(help="keep the console output here")] = None,
    cloud_init: Annotated[
        Path | None,
        typer.Option(
            "--cloud-init",
            metavar="USER_DATA",
            help="give cloud-init this user-data on a NoCloud seed (a second drive) and "
            "wait for cloud-init to finish too",
        ),
    ] = None,
    instance_id: Annotated[
        str | None,
        typer.Option(
            help="the NoCloud seed's instance-id", show_default="from the user-data's sha256"
        ),
    ] = None,
    wait_for: Annotated[
        list[str] | None,
        typer.Option(
            "--wait-for",
            metavar="TEXT",
            help="also wait for a console line holding TEXT (may be given more than once)",
        ),
    ] = None,
    write: Annotated[
        bool,
        typer.Option(
            "--write",
            help="boot IMAGE itself, not a snapshot: what the guest writes stays, as on a "
            "cloud's instance disk (boot an overlay, qemu-img create -b, to keep IMAGE)",
        ),
    ] = False,
    cache: CacheOpt = DEFAULT_CACHE,
) -> None:
    """Boot IMAGE in QEMU and wait for its login prompt (exit 0), or fail with the
    console's last lines (exit 1). KVM is used where a guest really runs under it.

    Without --arch the arch is read from the image (its EFI loader, PReP partition or
    root filesystem), without mounting it."""
    from factory import probe
    from factory.proc import JobLog, logging_to
    from factory.results import StageError
    from factory.stages.boot import KVM_VERDICTS, boot_image, check_instance_id, detect_format

    if not image.is_file():
        raise fail_usage(f"{image}: not a file (give a disk image)")
    user_data = None
    if cloud_init is not None:
        try:
            user_data = cloud_init.read_bytes()
        except OSError as exc:
            raise fail_usage(f"--cloud-init {cloud_init}: {exc.strerror or exc}") from None
    elif instance_id is not None:
        raise fail_usage("--instance-id is the NoCloud seed's: give --cloud-init USER_DATA too")
    if instance_id is not None:
        try:
            check_instance_id(instance_id)
        except StageError as exc:
            raise fail_usage(f"--instance-id: {exc}") from None
    waits = tuple(re.escape(t) for t in wait_for or ())

    def say(text: str) -> None:
        print(f"boot: {text}", file=sys.stderr)

    async def go(console: Path, work: Path) -> float:
        fmt = await detect_format(image)
        with logging_to(console):
            if arch is None:
                found = await probe.detect(image, fmt, work)
                say(f"{image.name}: {found.arch}, from {found.why}")
            else:  # what boots a disk of that arch, the image unread
                found = probe.Found(arch, probe.firmware_for(arch, "", []), "--arch")
            return await boot_image(
                image,
                fmt=fmt,
                arch=found.arch,
                firmware=firmware or found.firmware,
                timeout=timeout,
                work=work,
                verdicts=cache / KVM_VERDICTS,
                say=say,
                user_data=user_data,
                instance_id=instance_id,
                wait_for=waits,
                write=write,
            )

    with tempfile.TemporaryDirectory(prefix="factory-boot-") as work:
        console = log or Path(work) / "console.log"
        try:
            seconds = anyio.run(go, console, Path(work))
        except probe.ProbeError as exc:
            raise fail_usage(f"boot: {exc}") from None
        except StageError as exc:
            print(f"boot: {exc}", file=sys.stderr)
            for line in JobLog(console).tail(15):
                print(f"  | {line}", file=sys.stderr)
            raise typer.Exit(EXIT_FAILED) from None
    what = " and ".join(
        ["login prompt", *(["cloud-init done"] if user_data is not None else []),
         *(repr(t) for t in wait_for or ())]
    )  # fmt: skip
    print(f"{image}: {what} after {seconds:.1f} s")


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
            f"{size:8.0f} MiB  used {used}{'  in use' if c.in_use(entry.key) else ''}"
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
                    if not c.get(entry.key):
                        continue
                    if await c.remove(entry.key):
                        removed += 1
                    else:
                        print(f"kept {entry.key[:12]}: a running build is using it")
        return removed

    print(f"removed {anyio.run(prune)} trees")


@app.command()
def diff(
    old: Annotated[
        Path, typer.Argument(metavar="OLD", help="an earlier output folder", show_default=False)
    ],
    new: Annotated[
        Path, typer.Argument(metavar="NEW", help="a later output folder", show_default=False)
    ],
) -> None:
    """Print which packages were added, removed and changed from OLD to NEW, per cell."""
    from factory import changes

    try:
        print(changes.render_diff(old, new), end="")
    except ValueError as exc:
        raise fail_usage(str(exc)) from None


@app.command("report")
def report_cmd(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="a factory output folder", show_default=False)
    ],
) -> None:
    """Write OUT/report.html again from OUT/report.json: the matrix with each artifact's
    size, sha256 and boot result, the failures, a timeline of the jobs and the changes."""
    from factory import report_html

    try:
        page = report_html.rebuild(out)
    except report_html.ReportError as exc:
        raise fail_usage(str(exc)) from None
    print(f"wrote {page}", file=sys.stderr)


TagOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--tag",
        metavar="ARCH=TAG[,TAG]",
        help="runner tags (GitLab) or runs-on labels (GitHub) of ARCH's cells (else: ARCH)",
    ),
]
SetupOpt = Annotated[
    str | None,
    typer.Option(
        help="the shell command that installs factory on each runner and puts it on PATH "
        "(default: scripts/setup, then .venv/bin on PATH)",
        show_default=False,
    ),
]
RunArgOpt = Annotated[
    list[str] | None,
    typer.Option("--run-arg", metavar="ARG", help="an argument added to each cell's `factory run`"),
]
MergeTagOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--merge-tag",
        metavar="TAG",
        help="runner tag or label of the merge job (else: the first cell's)",
    ),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", help="write it to FILE", show_default="stdout")
]


def _pipeline(
    flavour: Literal["gitlab", "github"],
    matrix: Path,
    tag: list[str] | None,
    setup: str | None,
    run_arg: list[str] | None,
    merge_tag: list[str] | None,
    output: Path | None,
) -> None:
    from factory import ci
    from factory.fsutil import atomic_write

    m = _load(matrix)
    try:
        p = ci.Pipeline.of(
            m,
            matrix,
            tags=ci.parse_tags(tag or []),
            setup=setup if setup is not None else ci.DEFAULT_SETUP[flavour],
            run_args=run_arg or [],
            merge_tags=merge_tag or [],
        )
    except ci.CiError as exc:
        raise fail_usage(f"{matrix}: {exc}") from None
    text = ci.gitlab(p) if flavour == "gitlab" else ci.github(p)
    if output is None:
        print(text, end="")
        return
    try:
        atomic_write(output, text)
    except OSError as exc:
        raise fail_usage(f"{output}: --output: cannot write ({exc.strerror})") from None


@ci_app.command("gitlab")
def ci_gitlab(
    matrix: MatrixArg,
    tag: TagOpt = None,
    setup: SetupOpt = None,
    run_arg: RunArgOpt = None,
    merge_tag: MergeTagOpt = None,
    output: OutputOpt = None,
) -> None:
    """Print a GitLab CI pipeline for MATRIX: a job per cell on runners tagged with its
    arch, each uploading its output folder, then a merge job (factory merge).

    Run it from the repository's root, with MATRIX as the jobs will name it. The
    pipeline names factory's version and the matrix's sha256: its jobs refuse to run
    when either changed, until the pipeline is made again."""
    _pipeline("gitlab", matrix, tag, setup, run_arg, merge_tag, output)


@ci_app.command("github")
def ci_github(
    matrix: MatrixArg,
    tag: TagOpt = None,
    setup: SetupOpt = None,
    run_arg: RunArgOpt = None,
    merge_tag: MergeTagOpt = None,
    output: OutputOpt = None,
) -> None:
    """Print a GitHub Actions workflow for MATRIX: a matrix strategy with a job per cell
    on runners labelled with its arch, each uploading its output folder as an artifact,
    then a merge job that downloads them all and runs factory merge.

    As for gitlab, the workflow names factory's version and the matrix's sha256."""
    _pipeline("github", matrix, tag, setup, run_arg, merge_tag, output)


@app.command()
def merge(
    shards: Annotated[
        list[Path],
        typer.Argument(
            metavar="SHARD...", help="the cell jobs' output folders", show_default=False
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="the merged output folder (new or empty)")
    ] = None,
    matrix: Annotated[
        Path | None,
        typer.Option(help="the shards' matrix: they must come from it, and have all its cells"),
    ] = None,
) -> None:
    """Merge the output folders of a pipeline's cell jobs into one: one report.json, one
    SHA256SUMS (signed when the matrix asks for it), the SBOMs, logs and CHANGES.md.

    Every listed file's sha256 is checked as it is taken; a corrupt or missing file, a
    shard from another matrix digest or factory version, or a cell two shards built is
    refused with one line, exit 2, and nothing is written. Exit 1 when a shard failed
    (it is merged all the same)."""
    from factory import merge as merging
    from factory.ci import matrix_digest

    if out is None:
        raise fail_usage("merge: give --out FOLDER (new or empty) for the merged output")
    expected = None
    if matrix is not None:
        m = _load(matrix)
        expected = (matrix, matrix_digest(matrix), [c.id for c in m.cells()])
    try:
        report = anyio.run(
            functools.partial(merging.merge, shards, out.absolute(), matrix=expected)
        )
    except merging.MergeRefused as exc:
        raise fail_usage(str(exc)) from None
    for cell in report.get("missing", []):
        print(f"merge: {cell}: no shard holds this cell of {matrix}", file=sys.stderr)
    status = report["status"]
    print(
        f"merged {len(shards)} shards ({len(report['cells'])} cells, "
        f"{len(report['artifacts'])} artifacts) into {out}: {status}",
        file=sys.stderr,
    )
    raise typer.Exit(EXIT_OK if status == "built" else EXIT_FAILED)


@app.command()
def worker() -> None:
    """Run a sub-plan sent by a controller as JSON on stdin (over SSH); events on stdout."""
    from factory import worker as remote_worker

    raise typer.Exit(remote_worker.main())


def reflow(doc: str) -> str:
    """A docstring as help: each paragraph on one line, for the terminal to wrap."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _whole_sentences(*groups: typer.Typer) -> None:
    """Typer's rich help shows a docstring's line breaks as they are (in the command list
    and after the first paragraph), so a sentence broke where its source line ended."""
    for group in groups:
        for info in group.registered_commands:
            if info.help is None and info.callback is not None and info.callback.__doc__:
                info.help = reflow(info.callback.__doc__)


_whole_sentences(app, cache_app, ci_app)


def main() -> None:
    app()
