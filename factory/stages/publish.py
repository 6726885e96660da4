"""publish: check an artifact, checksum it and put it under its final name atomically.

The file is checksummed, then linked (raw: the disk is still read by conversions) or moved
to a hidden name beside its final one and renamed, so OUT never holds part of an artifact
under a real name; its `.sha256` is written first, so every artifact in OUT has one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from factory import formats, proc
from factory.fsutil import aside, atomic_write_async, sha256_file
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams


class Params(StageParams):
    format: str
    source: Literal["disk", "tree"]
    name: str  # under OUT
    qemu: str | None  # qemu-img's name of a disk format
    layout: str = ""  # of a cell with several disks


# qemu-img check knows these; raw and vpc have nothing to check.
CHECKABLE = frozenset({"qcow2", "vmdk", "vdi", "vhdx", "qed", "parallels"})


async def verify_disk(path: os.PathLike[str], qemu: str, virtual_size: int | None) -> None:
    """qemu-img's own reading of the file: the format it claims and the exact size."""
    info = json.loads(
        (await proc.run(["qemu-img", "info", "--output=json", "-f", qemu, path], capture=True)).text
    )
    if virtual_size is not None and info.get("virtual-size") != virtual_size:
        raise StageError(
            f"{os.fspath(path)}: virtual size {info.get('virtual-size')} is not the "
            f"disk's {virtual_size}"
        )
    if qemu in CHECKABLE:
        await proc.run(["qemu-img", "check", "-q", "-f", qemu, path])


async def place(tmp: Path, dest: Path, digest: str, cell: str, fmt: str, name: str) -> Output:
    """The last step of publishing a checked file written aside: its `.sha256` first,
    then the rename, so every artifact under a final name has its checksum beside it.
    The fsync goes to a worker thread: a controller placing a farm's artifacts spent
    ~10 ms of its event loop on each under load."""
    await atomic_write_async(dest.with_name(dest.name + ".sha256"), f"{digest}  {dest.name}\n")
    os.replace(tmp, dest)
    artifact = {"cell": cell, "format": fmt, "path": name, "size": dest.stat().st_size,
                "sha256": digest}  # fmt: skip
    return Output(dest, {"artifact": artifact})


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    (dep,) = ctx.job.deps
    src_out = ctx.inputs[dep]
    src = src_out.path
    if src is None or not src.exists():
        raise StageError(f"{ctx.job.id}: nothing to publish from {dep}")
    dest = ctx.ws.out / p.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if p.source == "disk":
        ctx.emit("checking")
        await verify_disk(src, p.qemu or p.format, src_out.info.get("virtual_size"))
    # A file fetched from a build host arrives checksummed (its copy checked against the
    # worker's sha256 by executors/placement.py): hashing it again would only cost time.
    digest = src_out.info.get("sha256")
    if digest is None:
        ctx.emit("checksumming")
        digest = await sha256_file(src, proc.current_meter.get())
    tmp = aside(dest)
    try:
        # The same inode under a new name: its bytes cannot change, so hashing it once is
        # enough (the raw disk is linked because conversions still read it, never write).
        if src_out.info.get("shared"):
            os.link(src, tmp)
        else:
            os.rename(src, tmp)
        return await place(tmp, dest, digest, ctx.job.cell, p.format, p.name)
    finally:
        tmp.unlink(missing_ok=True)


def cost(params: Mapping[str, Any]) -> float:
    """Hashing; a raw disk is read whole (the others are small by then)."""
    fmt = formats.FORMATS.get(str(params.get("format")))
    return fmt.cost if fmt is not None and fmt.name == "raw" else 1.0


STAGE = Stage(kind="publish", recipe=1, params=Params, run=run, cost=cost, module=__name__)
