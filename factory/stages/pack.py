"""pack: formats made straight from the finalised tree, no disk needed.

They run beside assemble. Owners are numeric (the build host's names mean nothing in the
image) and xattrs and ACLs are kept wherever the format can hold them. Every format is
reproducible: the same tree and the cell's epoch give the same bytes, whatever order the
tree was written in, whenever and wherever it is packed, and on how many threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from factory import arches, formats, proc
from factory.fsutil import aside, sha256_file
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams
from factory.stages.convert import cpu_budget

# Sparse files in format 0.0: its map is in the pax header and the member keeps its name;
# formats 0.1 and 1.0 rename it to GNUSparseFile.<tar's PID>/NAME, other bytes every run.
# GNU tar, libarchive, Python's tarfile and Go's archive/tar all read 0.0.
TAR = [
    "tar",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sparse",
    "--sparse-version=0.0",
]

# Debian architecture → the names the container specs use.


class Params(StageParams):
    format: str
    arch: str
    image_name: str
    docker_tag: str
    epoch: int


def tar_repro(epoch: int) -> list[str]:
    """What makes GNU tar's output depend on the tree alone: names in byte order (not the
    directory's), no mtime after the epoch, and pax headers without atime and ctime and
    with a fixed name (the default one holds tar's PID)."""
    return [
        "--format=posix",
        "--sort=name",
        f"--mtime=@{epoch}",
        "--clamp-mtime",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    ]


def tar_tree(tree: Path, dest: Path, epoch: int, *extra: str) -> list[str]:
    return [*TAR, *tar_repro(epoch), *extra, "-C", os.fspath(tree), "-cf", os.fspath(dest), "."]


TAR_RECORD = 10240  # GNU tar's default record: 20 blocks of 512 bytes
TAR_CHECKPOINT = 1024  # records between two checkpoints: 10 MiB of tar
# A checkpoint on stderr as `tar: #N`, ended by \r so the log skips it (see proc._measured).
# It only prints: the archive is the same with it.
TAR_PROGRESS = [f"--checkpoint={TAR_CHECKPOINT}", "--checkpoint-action=echo=#%u\\r"]
_TAR_CHECKPOINT = re.compile(r"tar: #(\d+)")


def tar_size(tree: Path) -> int:
    """About what tar writes for `tree` (before compression): a header per name (and one
    more for the pax records of the ones with xattrs or long names: counted for all) and
    each file's data in blocks, hard links once, sparse files by the blocks they hold."""
    total, seen = 1024, set()  # the two zero blocks at the end
    for top, dirs, names in os.walk(tree):
        for name in (*dirs, *names):
            st = os.lstat(os.path.join(top, name))
            total += 1024
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += -(-min(st.st_size, st.st_blocks * 512) // 512) * 512
    return total


def tar_progress(total: int) -> proc.Parser:
    """A parser of TAR_PROGRESS's checkpoints: tar's bytes written against `total`."""

    def parse(text: str) -> tuple[float, float] | None:
        m = _TAR_CHECKPOINT.fullmatch(text)
        if m is None:
            return None
        return float(min(int(m[1]) * TAR_CHECKPOINT * TAR_RECORD, total)), float(total)

    return parse


async def metered_tar(argv: Sequence[proc.Arg], tree: Path) -> None:
    """tar (`argv[0]`) over `tree`, its fraction from its checkpoints against the tree's
    size."""
    total = await anyio.to_thread.run_sync(tar_size, tree, abandon_on_cancel=True)
    await proc.run([argv[0], *TAR_PROGRESS, *argv[1:]], progress=tar_progress(total))


_SQUASHFS_BAR = re.compile(r".*\]\s+(\d+)/(\d+)\s+\d+%\s*")


def mksquashfs_progress(text: str) -> tuple[float, float] | None:
    """mksquashfs's bar, `[===-   ] 400/9736   4%` redrawn after \r on stdout (also
    through a pipe; -quiet keeps it, -no-progress would not): blocks done of all."""
    m = _SQUASHFS_BAR.fullmatch(text)
    return (float(m[1]), float(m[2])) if m and int(m[2]) > 0 else None


def gzip_program(threads: int, level: int | None = formats.get("tgz").level) -> str:
    """tar's compressor for tgz: pigz (gzip's format, faster per CPU second than gzip
    itself, and on every core the job may use) at a cheap level. -n: no name and no time
    in the gzip header. pigz's output is the same for any -p from 2 up, but -p 1 makes
    one plain deflate stream (other bytes): a one-thread budget still gets 2."""
    return f"pigz -n -{level} -p {max(threads, 2)}"


def mksquashfs_env(epoch: int) -> dict[str, str]:
    """mksquashfs 4.5 takes SOURCE_DATE_EPOCH as its mkfs time and clamps every file time
    to it (its -mkfs-time and -all-time cannot be combined with it, and -all-time would
    flatten the older times too). Its output does not depend on -processors."""
    return {"SOURCE_DATE_EPOCH": str(epoch)}


def mksquashfs_args(tree: Path, dest: Path, threads: int) -> list[str]:
    level = formats.get("squashfs").level
    return [
        "mksquashfs",
        os.fspath(tree),
        os.fspath(dest),
        "-noappend",
        "-quiet",  # its bar stays: mksquashfs_progress reads it
        "-comp",
        "zstd",
        "-Xcompression-level",
        str(level),
        "-processors",
        str(threads),
    ]


class _Made:
    """What a maker has to say beyond its file: warnings for the report."""

    def __init__(self) -> None:
        self.warnings: list[str] = []


Maker = Callable[[Context, Path, Path, _Made], Awaitable[None]]


def _epoch(ctx: Context) -> int:
    return ctx.params(Params).epoch


def _own_file(path: Path, mode: int) -> None:
    """A file factory writes into an archive: the same mode whatever the umask, and
    root's when we are root, like the tree's files."""
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


async def _tar(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    await metered_tar(tar_tree(tree, dest, _epoch(ctx)), tree)


async def _tgz(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    gzip = f"--use-compress-program={gzip_program(cpu_budget(ctx))}"
    await metered_tar(tar_tree(tree, dest, _epoch(ctx), gzip), tree)


async def has_acls(tree: Path) -> bool:
    """Whether any file of the tree carries a POSIX ACL (symlinks are not followed)."""
    found = await proc.run(
        ["getfattr", "-R", "-h", "-m", "^system\\.posix_acl", "--absolute-names", tree],
        capture=True,
        check=False,
    )
    return b"system.posix_acl" in found.stdout


SQUASHFS_ACL_WARNING = "the tree has POSIX ACLs, which squashfs (mksquashfs 4.5) does not keep"


async def _squashfs(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    if await has_acls(tree):
        proc.note(f"warning: {SQUASHFS_ACL_WARNING}")
        ctx.emit(f"warning: {SQUASHFS_ACL_WARNING}")
        made.warnings.append(SQUASHFS_ACL_WARNING)
    await proc.run(
        mksquashfs_args(tree, dest, cpu_budget(ctx)),
        env=mksquashfs_env(_epoch(ctx)),
        progress=mksquashfs_progress,
    )


def aci_manifest(name: str, arch: str) -> dict[str, object]:
    """The appc ImageManifest: kind, spec version, the name as an AC Identifier and the
    os/arch labels that together name the syscall ABI (appc's own arch names)."""
    return {
        "acKind": "ImageManifest",
        "acVersion": "0.8.11",
        "name": formats.ac_identifier(name),
        "labels": [
            {"name": "os", "value": "linux"},
            {"name": "arch", "value": arches.get(arch).aci},
        ],
    }


async def _aci(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    """manifest and rootfs/ are the only top-level names an ACI may have."""
    p = ctx.params(Params)
    staging = ctx.cell_work / "aci"
    staging.mkdir(exist_ok=True)
    manifest = staging / "manifest"
    manifest.write_text(json.dumps(aci_manifest(p.image_name, p.arch)))
    _own_file(manifest, 0o644)
    await metered_tar(
        [
            *TAR,
            *tar_repro(_epoch(ctx)),
            "-cf",
            dest,
            "-C",
            staging,
            "manifest",
            "-C",
            tree,
            "--transform=s,^\\.,rootfs,",
            ".",
        ],
        tree,
    )


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def docker_config(arch: str, layer_digest: str, created: str) -> dict[str, object]:
    a = arches.get(arch)
    return {
        "architecture": a.oci,
        **({"variant": a.oci_variant} if a.oci_variant else {}),
        "os": "linux",
        "created": created,
        "config": {
            "Cmd": ["/bin/bash"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": created, "created_by": "factory"}],
    }


def docker_manifest(config_name: str, tag: str, layer_digest: str) -> list[dict[str, object]]:
    """manifest.json of a `docker save` archive: what `docker load` reads first."""
    return [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer_digest}/layer.tar"]}]


def layer_members(tree: Path) -> list[str]:
    """The tree's top-level names, sorted: the layer holds `etc/passwd` as `docker save`
    writes it, with no `./` prefix and no entry for the root itself."""
    return sorted(os.listdir(tree))


async def _docker(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    """A `docker save` archive made without a daemon: manifest.json, the config named by
    the sha256 of its bytes, and one uncompressed layer whose sha256 is its diff_id. Both
    tars are reproducible and the config is created at the epoch, so both digests are
    stable."""
    p = ctx.params(Params)
    epoch = p.epoch
    staging = ctx.cell_work / "docker"
    staging.mkdir(exist_ok=True)
    members = staging / "layer.members"
    members.write_bytes(b"".join(os.fsencode(name) + b"\0" for name in layer_members(tree)))
    layer = staging / "layer.tar"
    await proc.run(
        [
            *TAR,
            *tar_repro(epoch),
            "-C",
            tree,
            "-cf",
            layer,
            "--null",
            "--verbatim-files-from",
            "-T",
            members,
        ]
    )
    layer_digest = await sha256_file(layer)
    (staging / layer_digest).mkdir(exist_ok=True)
    os.replace(layer, staging / layer_digest / "layer.tar")
    config = json.dumps(
        docker_config(p.arch, layer_digest, rfc3339(epoch)), sort_keys=True
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    (staging / config_name).write_bytes(config)
    manifest = docker_manifest(config_name, p.docker_tag, layer_digest)
    (staging / "manifest.json").write_text(json.dumps(manifest))
    for name in ("manifest.json", config_name, f"{layer_digest}/layer.tar"):
        _own_file(staging / name, 0o644)
    await proc.run(
        [
            "tar",
            *tar_repro(epoch),
            "--numeric-owner",
            "-C",
            staging,
            "-cf",
            dest,
            "manifest.json",
            config_name,
            f"{layer_digest}/layer.tar",
        ]
    )


MAKERS: dict[str, Maker] = {
    "tar": _tar,
    "tgz": _tgz,
    "squashfs": _squashfs,
    "aci": _aci,
    "docker": _docker,
}


async def run(ctx: Context) -> Output:
    fmt = ctx.params(Params).format
    maker = MAKERS.get(fmt)
    if maker is None:
        raise StageError(f"no packer for format {fmt!r}")
    tree = ctx.input_path("finalise")
    dest = ctx.cell_work / f"tree.{fmt}"
    tmp = aside(dest)
    made = _Made()
    try:
        ctx.emit(f"packing {fmt}")
        await maker(ctx, tree, tmp, made)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    info: dict[str, object] = {"format": fmt}
    if made.warnings:
        info["warnings"] = made.warnings
    return Output(dest, info)


def cost(params: Mapping[str, Any]) -> float:
    fmt = formats.FORMATS.get(str(params.get("format")))
    return fmt.cost if fmt is not None else 2.0


STAGE = Stage(kind="pack", recipe=1, params=Params, run=run, cost=cost, module=__name__)
