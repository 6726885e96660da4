"""convert: the raw disk into another disk format with qemu-img."""

from __future__ import annotations

import os

from factory import formats, proc
from factory.fsutil import aside
from factory.results import Output
from factory.stages import Context
from factory.stages.publish import verify_disk


def convert_args(fmt: str, compression: str | None, vhd_subformat: str | None) -> list[str]:
    """qemu-img convert options for a format (pure)."""
    qemu = formats.get(fmt).qemu or fmt
    args = ["-O", qemu]
    if qemu == "qcow2":
        # -W: out-of-order writes; -m: parallel coroutines — both help compression most.
        args += ["-W", "-m", "16"]
        if compression == "zlib":
            args += ["-c"]
        elif compression == "zstd":
            args += ["-c", "-o", "compression_type=zstd"]
    elif qemu == "vpc":
        args += ["-o", f"subformat={vhd_subformat or 'dynamic'},force_size=on"]
    elif qemu == "vmdk":
        args += ["-o", "subformat=streamOptimized"]
    return args


async def run(ctx: Context) -> Output:
    p = ctx.job.params
    fmt = formats.get(p["format"])
    raw = ctx.input_path("assemble")
    virtual = ctx.input("assemble").info.get("virtual_size") or raw.stat().st_size
    dest = ctx.cell_work / f"disk.{fmt.suffix}"
    tmp = aside(dest)
    try:
        ctx.emit(f"qemu-img convert to {fmt.name}")
        await proc.run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-f",
                "raw",
                *convert_args(fmt.name, p.get("compression"), p.get("vhd_subformat")),
                raw,
                tmp,
            ]
        )
        await verify_disk(tmp, fmt.qemu or fmt.name, virtual)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Output(dest, {"virtual_size": virtual, "format": fmt.name})
