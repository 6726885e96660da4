"""convert: the raw disk into another disk format, with qemu-img (or vhd-util for vhd).

Every conversion reads the one raw disk and writes its own file aside, checks it with
qemu-img (format and exact virtual size) and renames it, so conversions of a cell run
side by side without touching each other.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from factory import formats, proc
from factory.fsutil import aside
from factory.results import Output
from factory.stages import Context
from factory.stages.publish import verify_disk


def convert_args(
    fmt: str, compression: str | None, vhd_subformat: str | None, threads: int = 2
) -> list[str]:
    """qemu-img convert options for a format (pure)."""
    qemu = formats.get(fmt).qemu or fmt
    args = ["-O", qemu]
    if qemu == "qcow2":
        # -W: out-of-order writes; -m: coroutines in flight. Compressed clusters are
        # deflated in qemu's thread pool, so -m is how many cores qcow2 -c may use.
        args += ["-W", "-m", "16" if threads > 1 else "1"]
        if compression == "zlib":
            args += ["-c"]
        elif compression == "zstd":
            args += ["-c", "-o", "compression_type=zstd"]
    elif qemu == "vpc":
        # Without force_size qemu-img rounds the size up to a CHS geometry.
        args += ["-o", f"subformat={vhd_subformat or 'dynamic'},force_size=on"]
    elif qemu == "vmdk":
        # streamOptimized is written in order and deflated in one thread: -W cannot help.
        args += ["-o", "subformat=streamOptimized"]
    return args


def vhd_util_steps(work: Path, dest: Path, subformat: str) -> list[list[str]]:
    """diskimage-builder's way with vhd-util (pure): the raw copy becomes a fixed VHD in
    place (`-s 0 -t 1` appends the footer); unless fixed was asked for, that is then
    written out as a dynamic one (`-s 1 -t 2`). A fixed one is renamed by the caller."""
    steps = [["vhd-util", "convert", "-s", "0", "-t", "1", "-i", str(work), "-o", str(work)]]
    if subformat != "fixed":
        steps.append(
            ["vhd-util", "convert", "-s", "1", "-t", "2", "-i", str(work), "-o", str(dest)]
        )
    return steps


def cpu_budget(ctx: Context) -> int:
    """Threads this job's tool may use: the run's --jobs, at most the cores."""
    return formats.threads(ctx.ws.cpus, _cores())


def _cores() -> int:
    return len(os.sched_getaffinity(0))


async def _vhd_util(raw: Path, tmp: Path, subformat: str) -> None:
    """vhd-util converts in place, so it works on a sparse copy of the shared raw disk."""
    work = tmp.with_name(tmp.name + ".raw")
    try:
        await proc.run(["cp", "--sparse=always", raw, work])
        for argv in vhd_util_steps(work, tmp, subformat):
            await proc.run(argv)
        if subformat == "fixed":
            os.replace(work, tmp)
    finally:
        for leftover in (work, work.with_name(work.name + ".bak")):
            leftover.unlink(missing_ok=True)


async def run(ctx: Context) -> Output:
    p = ctx.job.params
    fmt = formats.get(p["format"])
    raw = ctx.input_path("assemble")
    virtual = ctx.input("assemble").info.get("virtual_size") or raw.stat().st_size
    dest = raw.with_suffix(f".{fmt.suffix}")  # beside its raw disk, one folder per layout
    tmp = aside(dest)
    try:
        if fmt.name == "vhd" and shutil.which("vhd-util"):
            ctx.emit("vhd-util convert to vhd")
            await _vhd_util(raw, tmp, p.get("vhd_subformat") or "dynamic")
        else:
            ctx.emit(f"qemu-img convert to {fmt.name}")
            args = convert_args(
                fmt.name, p.get("compression"), p.get("vhd_subformat"), cpu_budget(ctx)
            )
            await proc.run(["qemu-img", "convert", "-q", "-f", "raw", *args, raw, tmp])
        await verify_disk(tmp, fmt.qemu or fmt.name, virtual)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Output(dest, {"virtual_size": virtual, "format": fmt.name})
