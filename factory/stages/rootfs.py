"""rootfs: the chroot stage, built once per cell with mmdebstrap and cached by its key.

The initramfs is not built here: update-initramfs is diverted while packages install
(the kernel's postinst and the initramfs-tools trigger would each build one) and restored
afterwards; finalise builds it once. A foreign arch runs its maintainer scripts through
qemu-user, so binfmt_misc is checked (and set up) before mmdebstrap starts.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
from pathlib import Path

import anyio

from factory import archive, proc, repro, sizing
from factory.proc import CommandError
from factory.results import Output, StageError
from factory.stages import Context

DIVERT = (
    'chroot "$1" dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.factory '
    "--add /usr/sbin/update-initramfs && "
    "printf '#!/bin/sh\\necho update-initramfs: deferred to finalise >&2\\n' "
    '> "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs"'
)
UNDIVERT = (
    'rm -f "$1/usr/sbin/update-initramfs" && '
    'chroot "$1" dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.factory '
    "--remove /usr/sbin/update-initramfs"
)


# Debian arch → the qemu-user binfmt entry (package qemu-user-static) that runs it.
QEMU_USER = {"amd64": "x86_64", "arm64": "aarch64", "ppc64el": "ppc64le"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRIES = Path("/usr/share/binfmts")
_binfmt_lock = anyio.Lock()


async def host_arch() -> str:
    return (await proc.run(["dpkg", "--print-architecture"], capture=True)).text.strip()


async def ensure_runnable(arch: str) -> None:
    """Make sure programs of `arch` run here (maintainer scripts, chroot commands), through
    qemu-user and binfmt_misc when foreign. binfmt_misc is mounted and the entry enabled
    for the whole machine, as systemd would, and left so: other builds may be using it."""
    if arch == await host_arch():
        return
    qemu = QEMU_USER.get(arch)
    if qemu is None or not (BINFMT_ENTRIES / f"qemu-{qemu}").is_file():
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


def sources(params: dict[str, object]) -> str:
    """The tree's apt sources: as planned (with the archive state read from them), or
    made here from the mirror settings for a plan made without it."""
    if isinstance(params.get("sources"), str):
        return str(params["sources"])
    try:
        return archive.debian_sources(
            str(params["release"]),
            str(params["mirror"]),
            bool(params["updates"]),
            bool(params["security"]),
        )
    except archive.ArchiveError as exc:
        raise StageError(str(exc)) from None


def keep_release_files(dest: Path) -> str:
    """A customize hook that copies the Release files apt used out of the tree, before
    mmdebstrap's clean-up deletes them: they say which archive state the tree is of."""
    folder = shlex.quote(str(dest))
    return (
        f'mkdir -p {folder} && for f in "$1"/var/lib/apt/lists/*Release; do '
        f'[ -e "$f" ] && cp "$f" {folder}/; done; true'
    )


def check_archive(planned: list[dict[str, object]], used: Path) -> None:
    """The tree must come from the archive state its key names: if a suite moved between
    the plan's reading and apt's, the tree would be cached under a key it does not match."""
    seen = {
        hashlib.sha256(f.read_bytes()).hexdigest() for f in used.glob("*Release") if f.is_file()
    }
    for suite in planned:
        if suite.get("sha256") not in seen:
            raise StageError(
                f"the archive moved while the tree was built: suite {suite.get('suite')} at "
                f"{suite.get('uri')} is no longer the one planned (run again)"
            )


def mmdebstrap_args(
    params: dict[str, object], target: Path, sources_file: Path, lists: Path | None = None
) -> list[str]:
    packages = ",".join(map(str, params["packages"]))  # type: ignore[call-overload]
    keep = [f"--customize-hook={keep_release_files(lists)}"] if lists is not None else []
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        f"--architectures={params['arch']}",
        f"--include={packages}",
        '--aptopt=Acquire::Retries "3"',
        "--dpkgopt=force-unsafe-io",
        f"--essential-hook={DIVERT}",
        f"--customize-hook={UNDIVERT}",
        *keep,
        str(params["release"]),
        str(target),
        str(sources_file),
    ]


_INDEX_FAIL = re.compile(
    r"(?:Failed to fetch|Hash Sum mismatch|File has unexpected size).*?"
    r"dists/(?P<suite>[\w.-]+)/"
)


def explain(exc: CommandError, arch: str) -> str:
    """Turn apt's failure on a broken mirror index into the setting that avoids it."""
    for line in exc.tail:
        m = _INDEX_FAIL.search(line)
        if m:
            suite = m["suite"]
            kind = suite.rsplit("-", 1)[-1] if "-" in suite else ""
            hint = (
                f"set [mirrors] {kind} = false to leave it out"
                if kind in ("updates", "security")
                else "check the mirror"
            )
            return f"the mirror's index for {suite} ({arch}) failed to download ({hint})"
    return str(exc)


async def run(ctx: Context) -> Output:
    p = ctx.job.params
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
        await ensure_runnable(str(p["arch"]))
        async with cache.building(ctx.job.key, meta) as root:
            ctx.emit("mmdebstrap")
            try:
                await proc.run(
                    mmdebstrap_args(p, root, sources_file, lists),
                    env=repro.source_date_env(int(str(p["epoch"]))),
                )
            except CommandError as exc:
                raise StageError(explain(exc, str(p["arch"]))) from exc
            check_archive(list(p.get("archive") or []), lists)
            meta["bytes"] = sizing.measure(root).allocated
        built = await cache.use(ctx.job.key)
        return Output(built.root, {"cached": False, "bytes": meta["bytes"]})
