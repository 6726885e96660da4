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

from factory import proc
from factory.fsutil import aside, sha256_file
from factory.results import Output, StageError
from factory.stages import Context

TAR = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse"]

# Debian architecture → the names the container specs use.
OCI_ARCH = {"amd64": "amd64", "ppc64el": "ppc64le", "arm64": "arm64"}
APPC_ARCH = {"amd64": "amd64", "ppc64el": "ppc64le", "arm64": "aarch64"}


def tar_tree(tree: Path, dest: Path, *extra: str) -> list[str]:
    return [*TAR, *extra, "-C", os.fspath(tree), "-cf", os.fspath(dest), "."]


async def _tar(ctx: Context, tree: Path, dest: Path) -> None:
    await proc.run(tar_tree(tree, dest))


async def _tgz(ctx: Context, tree: Path, dest: Path) -> None:
    await proc.run(tar_tree(tree, dest, "--use-compress-program=gzip -6"))


async def _has_acls(tree: Path) -> bool:
    found = await proc.run(
        ["getfattr", "-R", "-h", "-m", "^system\\.posix_acl", "--absolute-names", tree],
        capture=True,
        check=False,
    )
    return b"system.posix_acl" in found.stdout


async def _squashfs(ctx: Context, tree: Path, dest: Path) -> None:
    if await _has_acls(tree):
        proc.note("warning: the tree has POSIX ACLs, which mksquashfs does not keep")
        ctx.emit("warning: POSIX ACLs are dropped by squashfs")
    await proc.run(
        [
            "mksquashfs",
            tree,
            dest,
            "-noappend",
            "-quiet",
            "-comp",
            "zstd",
            "-processors",
            str(max(1, len(os.sched_getaffinity(0)))),
        ]
    )


def aci_manifest(name: str, arch: str) -> dict[str, object]:
    """The appc ImageManifest: kind, version, an AC identifier and os/arch labels."""
    return {
        "acKind": "ImageManifest",
        "acVersion": "0.8.11",
        "name": name,
        "labels": [
            {"name": "os", "value": "linux"},
            {"name": "arch", "value": APPC_ARCH.get(arch, arch)},
        ],
    }


async def _aci(ctx: Context, tree: Path, dest: Path) -> None:
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


async def _docker(ctx: Context, tree: Path, dest: Path) -> None:
    """A `docker save` archive: manifest.json, the image config and one layer."""
    p = ctx.job.params
    staging = ctx.cell_work / "docker"
    staging.mkdir(exist_ok=True)
    layer = staging / "layer.tar"
    await proc.run(tar_tree(tree, layer))
    layer_digest = await sha256_file(layer)
    (staging / layer_digest).mkdir(exist_ok=True)
    os.replace(layer, staging / layer_digest / "layer.tar")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = json.dumps(docker_config(p["arch"], layer_digest, created), sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    (staging / config_name).write_bytes(config)
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [p["docker_tag"]],
            "Layers": [f"{layer_digest}/layer.tar"],
        }
    ]
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


MAKERS: dict[str, Callable[[Context, Path, Path], Awaitable[None]]] = {
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
    try:
        ctx.emit(f"packing {fmt}")
        await maker(ctx, tree, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Output(dest, {"format": fmt})
