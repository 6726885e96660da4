"""rootfs: the chroot stage, built once per cell by the distro family's bootstrap
(mmdebstrap for Debian) and cached by its key.

The initramfs is not built here (the family defers it); finalise builds it once. A
foreign arch runs its maintainer scripts through qemu-user, so binfmt_misc is checked
(and set up) before the bootstrap starts.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import anyio

from factory import arches, archive, distros, proc, repro, sizing
from factory.proc import CommandError
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams

BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRIES = Path("/usr/share/binfmts")
_binfmt_lock = anyio.Lock()


class SuiteState(StageParams):
    """One suite as the plan read it (factory.archive.Suite.to_json)."""

    suite: str
    uri: str
    components: tuple[str, ...]
    date: str
    sha256: str


class Params(StageParams):
    family: str
    release: str
    arch: str
    packages: tuple[str, ...]
    mirror: str
    updates: bool
    security: bool
    epoch: int
    sources: str | None = None  # the apt sources the archive state was read from
    archive: tuple[SuiteState, ...] = ()


async def host_arch() -> str:
    return (await proc.run(["dpkg", "--print-architecture"], capture=True)).text.strip()


async def ensure_runnable(arch: str) -> None:
    """Make sure programs of `arch` run here (maintainer scripts, chroot commands), through
    qemu-user and binfmt_misc when foreign. binfmt_misc is mounted and the entry enabled
    for the whole machine, as systemd would, and left so: other builds may be using it."""
    if arch == await host_arch():
        return
    qemu = arches.get(arch).qemu_user
    if not (BINFMT_ENTRIES / f"qemu-{qemu}").is_file():
        raise StageError(
            f"cannot run {arch} programs on this machine: install qemu-user-static "
            "(and binfmt-support)"
        )
    async with _binfmt_lock:
        if not (BINFMT / "register").exists():
            await proc.run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT])
        entry = BINFMT / f"qemu-{qemu}"
        if not entry.exists() or not entry.read_text().startswith("enabled"):
            await proc.run(["update-binfmts", "--enable", f"qemu-{qemu}"])
        if shutil.which("arch-test") is None:
            raise StageError(f"cannot check that {arch} programs run here: install arch-test")
        test = await proc.run(["arch-test", arch], check=False, capture=True)
    if test.returncode != 0:
        raise StageError(
            f"{arch} programs do not run here through qemu-{qemu} "
            f"(arch-test: {test.text.strip() or 'failed'})"
        )


def sources(p: Params) -> str:
    """The tree's apt sources: as planned (with the archive state read from them), or
    made here from the mirror settings for a plan made without it."""
    if p.sources is not None:
        return p.sources
    try:
        return archive.family_sources(p.family, p.release, p.mirror, p.updates, p.security)
    except archive.ArchiveError as exc:
        raise StageError(str(exc)) from None


def check_archive(planned: tuple[SuiteState, ...], used: Path) -> None:
    """The tree must come from the archive state its key names: if a suite moved between
    the plan's reading and apt's, the tree would be cached under a key it does not match."""
    seen = {
        hashlib.sha256(f.read_bytes()).hexdigest() for f in used.glob("*Release") if f.is_file()
    }
    for suite in planned:
        if suite.sha256 not in seen:
            raise StageError(
                f"the archive moved while the tree was built: suite {suite.suite} at "
                f"{suite.uri} is no longer the one planned (run again)"
            )


def explain(exc: CommandError, family: distros.Family, arch: str) -> str:
    """The family's reading of a failed bootstrap, else the command's own error."""
    return family.explain_bootstrap(exc.tail, arch) or str(exc)


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    family = distros.get(p.family)
    cache = ctx.ws.cache
    meta: dict[str, object] = {"kind": "rootfs", "cell": ctx.job.cell}
    async with cache.lock(ctx.job.key, ctx.emit):
        entry = cache.get(ctx.job.key)
        if entry is not None and not ctx.ws.refresh:
            cache.touch(entry)
            entry = await cache.use(ctx.job.key)
            ctx.emit("from cache")
            proc.note(f"tree {ctx.job.key} from the cache")
            return Output(entry.root, {"cached": True})
        sources_file = ctx.cell_work / "apt.sources"
        lists = ctx.cell_work / "apt-lists"
        sources_file.write_text(sources(p))
        await ensure_runnable(p.arch)
        async with cache.building(ctx.job.key, meta) as root:
            args = family.bootstrap_args(
                release=p.release,
                arch=p.arch,
                packages=p.packages,
                target=root,
                sources_file=sources_file,
                lists=lists,
            )
            ctx.emit(args[0])
            try:
                await proc.run(
                    args,
                    env=repro.source_date_env(p.epoch),
                    progress=family.bootstrap_progress,
                )
            except CommandError as exc:
                raise StageError(explain(exc, family, p.arch)) from exc
            check_archive(p.archive, lists)
            meta["bytes"] = (await sizing.measure_async(root)).allocated
        built = await cache.use(ctx.job.key)
        return Output(built.root, {"cached": False, "bytes": meta["bytes"]})


STAGE = Stage(
    kind="rootfs",
    recipe=1,
    params=Params,
    run=run,
    cost=lambda p: 60.0,  # rough CPU seconds on a warm cache
    module=__name__,
)
