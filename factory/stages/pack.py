"""pack: formats made straight from the finalised tree, no disk needed.

They run beside assemble. Owners are numeric (the build host's names mean nothing in the
image) and xattrs and ACLs are kept wherever the format can hold them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from factory import formats, proc
from factory.fsutil import aside, sha256_file
from factory.results import Output, StageError
from factory.stages import Context
from factory.stages.convert import cpu_budget

TAR = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse"]

# Debian architecture → the names the container specs use.
OCI_ARCH = {"amd64": "amd64", "ppc64el": "ppc64le", "arm64": "arm64"}
APPC_ARCH = {"amd64": "amd64", "ppc64el": "ppc64le", "arm64": "aarch64"}


def tar_tree(tree: Path, dest: Path, *extra: str) -> list[str]:
    return [*TAR, *extra, "-C", os.fspath(tree), "-cf", os.fspath(dest), "."]


def gzip_program(threads: int, level: int | None = formats.get("tgz").level) -> str:
    """tar's compressor for tgz: pigz (gzip's format, faster per CPU second than gzip
    itself, and on every core the job may use) at a cheap level."""
    return f"pigz -{level} -p {threads}"


def mksquashfs_args(tree: Path, dest: Path, threads: int) -> list[str]:
    level = formats.get("squashfs").level
    return [
        "mksquashfs",
        os.fspath(tree),
        os.fspath(dest),
        "-noappend",
        "-quiet",
        "-no-progress",
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


async def _tar(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    await proc.run(tar_tree(tree, dest))


async def _tgz(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    await proc.run(tar_tree(tree, dest, f"--use-compress-program={gzip_program(cpu_budget(ctx))}"))


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
    await proc.run(mksquashfs_args(tree, dest, cpu_budget(ctx)))


def aci_manifest(name: str, arch: str) -> dict[str, object]:
    """The appc ImageManifest: kind, spec version, the name as an AC Identifier and the
    os/arch labels that together name the syscall ABI (appc's own arch names)."""
    return {
        "acKind": "ImageManifest",
        "acVersion": "0.8.11",
        "name": formats.ac_identifier(name),
        "labels": [
            {"name": "os", "value": "linux"},
            {"name": "arch", "value": APPC_ARCH.get(arch, arch)},
        ],
    }


async def _aci(ctx: Context, tree: Path, dest: Path, made: _Made) -> None:
    """manifest and rootfs/ are the only top-level names an ACI may have."""
    p = ctx.job.params
    staging = ctx.cell_work / "aci"
    staging.mkdir(exist_ok=True)
    (staging / "manifest").write_text(json.dumps(aci_manifest(p["image_name"], p["arch"])))
    await proc.run(
        [
            *TAR,
            "-cf",
            dest,
            "-C",
            staging,
            "manifest",
            "-C",
            tree,
            "--transform=s,^\\.,rootfs,",
            ".",
        ]
    )


def docker_config(arch: str, layer_digest: str, created: str) -> dict[str, object]:
    return {
        "architecture": OCI_ARCH.get(arch, arch),
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
    the sha256 of its bytes, and one uncompressed layer whose sha256 is its diff_id."""
    p = ctx.job.params
    staging = ctx.cell_work / "docker"
    staging.mkdir(exist_ok=True)
    members = staging / "layer.members"
    members.write_bytes(b"".join(os.fsencode(name) + b"\0" for name in layer_members(tree)))
    layer = staging / "layer.tar"
    await proc.run(
        [*TAR, "-C", tree, "-cf", layer, "--null", "--verbatim-files-from", "-T", members]
    )
    layer_digest = await sha256_file(layer)
    (staging / layer_digest).mkdir(exist_ok=True)
    os.replace(layer, staging / layer_digest / "layer.tar")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = json.dumps(docker_config(p["arch"], layer_digest, created), sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    (staging / config_name).write_bytes(config)
    manifest = docker_manifest(config_name, p["docker_tag"], layer_digest)
    (staging / "manifest.json").write_text(json.dumps(manifest))
    await proc.run(
        [
            "tar",
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
    fmt = ctx.job.params["format"]
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
