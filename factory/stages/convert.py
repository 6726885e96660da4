"""convert: the raw disk into another disk format, with qemu-img (or vhd-util for vhd).

Every conversion reads the one raw disk and writes its own file in a private folder,
checks it with qemu-img (format and exact virtual size) and renames it, so conversions of
a cell run side by side without touching each other.

The same raw disk gives the same bytes in every format: qcow2 is written in order (no
-W), and what qemu-img draws at random or from the clock is patched afterwards from the
job's key and the cell's epoch (vhd's footer time and UUID, vmdk's CID, vdi's UUIDs). The
file is written under its published name, which a vmdk's descriptor records.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from factory import formats, proc, repro
from factory.fsutil import aside
from factory.results import Output
from factory.stages import Context, Stage, StageParams
from factory.stages.publish import verify_disk


class Params(StageParams):
    format: str
    qemu: str | None
    compression: str | None = None  # qcow2's
    vhd_subformat: str | None = None
    # [image.qemu_img_options] of the format: qemu-img convert -o
    options: dict[str, str] = Field(default_factory=dict)
    epoch: int
    artifact: str  # the published file name, which a vmdk records


def convert_args(
    fmt: str,
    compression: str | None,
    vhd_subformat: str | None,
    threads: int = 2,
    options: dict[str, str] | None = None,
) -> list[str]:
    """qemu-img convert options for a format (pure). The user's `options` (checked
    against formats.QEMU_IMG_OPTIONS) come last in the one -o: qemu-img keeps the last
    value given for a name."""
    qemu = formats.get(fmt).qemu or fmt
    args = ["-O", qemu]
    args += _options_args(fmt, compression, vhd_subformat, threads)
    if options:
        extra = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
        if "-o" in args:
            i = args.index("-o") + 1
            args[i] = f"{args[i]},{extra}"
        else:
            args += ["-o", extra]
    return args


def _options_args(
    fmt: str, compression: str | None, vhd_subformat: str | None, threads: int
) -> list[str]:
    qemu = formats.get(fmt).qemu or fmt
    args: list[str] = []
    if qemu == "qcow2":
        # No -W: out-of-order writes place clusters in the order they complete, so the
        # file differs from run to run (compressed or not). In order, qemu-img 7.2
        # compresses one cluster at a time: the same CPU as with -W, about twice its wall
        # on 2 cores (zlib, 2 GiB raw: ~17 s against ~10 s); -m still overlaps the reads.
        args += ["-m", "16" if threads > 1 else "1"]
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


VHD_EPOCH = 946_684_800  # VHD times count seconds from 2000-01-01 00:00 UTC
VHD_FOOTER = 512
VHD_DYNAMIC = (3, 4)  # disk types with a footer copy at offset 0: dynamic, differencing


def vhd_checksum(footer: bytes | bytearray) -> int:
    """One's complement of the byte sum, the checksum field counted as zeros."""
    b = bytearray(footer[:VHD_FOOTER])
    b[64:68] = bytes(4)
    return ~sum(b) & 0xFFFFFFFF


def patch_vhd_footer(footer: bytes, epoch: int, unique_id: uuid.UUID) -> bytes:
    """A VHD footer with the creation time from `epoch` and the unique id given, its
    checksum made again: qemu-img writes the clock and a random UUID."""
    if len(footer) != VHD_FOOTER or footer[:8] != b"conectix":
        raise ValueError("not a VHD footer")
    b = bytearray(footer)
    struct.pack_into(">I", b, 24, max(0, epoch - VHD_EPOCH))
    b[68:84] = unique_id.bytes
    struct.pack_into(">I", b, 64, vhd_checksum(b))
    return bytes(b)


def patch_vhd(path: Path, epoch: int, unique_id: uuid.UUID) -> None:
    """Both footers of a dynamic VHD (at 0 and at the end), the one of a fixed VHD."""
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END) - VHD_FOOTER
        fh.seek(end)
        footer = patch_vhd_footer(fh.read(VHD_FOOTER), epoch, unique_id)
        fh.seek(end)
        fh.write(footer)
        if struct.unpack_from(">I", footer, 60)[0] in VHD_DYNAMIC:
            fh.seek(0)
            if fh.read(8) != b"conectix":
                raise ValueError(f"{path}: a dynamic VHD without its footer copy at 0")
            fh.seek(0)
            fh.write(footer)


VDI_SIGNATURE = 0xBEDA107F
VDI_UUID_IMAGE = 0x188
VDI_UUID_MODIFY = 0x198  # uuid_last_snap: changes on every write
VDI_HEADER = 0x1C8


def patch_vdi_header(header: bytes, image: uuid.UUID, modify: uuid.UUID) -> bytes:
    """A VDI header with the image and modification UUIDs given (qemu-img draws both)."""
    if len(header) < VDI_HEADER or struct.unpack_from("<I", header, 0x40)[0] != VDI_SIGNATURE:
        raise ValueError("not a VDI header")
    b = bytearray(header)
    b[VDI_UUID_IMAGE : VDI_UUID_IMAGE + 16] = image.bytes
    b[VDI_UUID_MODIFY : VDI_UUID_MODIFY + 16] = modify.bytes
    return bytes(b)


def patch_vdi(path: Path, image: uuid.UUID, modify: uuid.UUID) -> None:
    with open(path, "r+b") as fh:
        header = patch_vdi_header(fh.read(VDI_HEADER), image, modify)
        fh.seek(0)
        fh.write(header)


_CID = re.compile(rb"^CID=[0-9a-fA-F]+$", re.MULTILINE)


def vmdk_cid(seed: str) -> int:
    """A content id from `seed`; never ffffffff or fffffffe, which mean "none" to VMware
    and qemu."""
    return int.from_bytes(repro.seeded_bytes(seed, "vmdk-cid", 4), "big") % 0xFFFFFFFE


def patch_vmdk_descriptor(area: bytes, cid: int) -> bytes:
    """The embedded descriptor area (text, then zeros) with its CID line set to `cid`."""
    text, _, _ = area.partition(b"\0")
    new, count = _CID.subn(f"CID={cid:08x}".encode(), text, count=1)
    if count != 1:
        raise ValueError("the vmdk descriptor has no CID line")
    if len(new) >= len(area):
        raise ValueError("the vmdk descriptor does not fit its area")
    return new + bytes(len(area) - len(new))


def patch_vmdk(path: Path, cid: int) -> None:
    """The CID of a monolithic sparse vmdk (streamOptimized): its descriptor lives in
    the sectors the header names (descriptorOffset, descriptorSize)."""
    with open(path, "r+b") as fh:
        header = fh.read(512)
        if header[:4] != b"KDMV":
            raise ValueError(f"{path}: not a sparse vmdk")
        offset, size = struct.unpack_from("<QQ", header, 28)
        if not offset or not size:
            raise ValueError(f"{path}: the vmdk has no embedded descriptor")
        fh.seek(offset * 512)
        area = patch_vmdk_descriptor(fh.read(size * 512), cid)
        fh.seek(offset * 512)
        fh.write(area)


def make_reproducible(path: Path, qemu: str, epoch: int, seed: str) -> None:
    """Replace what qemu-img wrote at random or from the clock with values from the
    job's key (`seed`) and the cell's epoch. qcow2 and raw carry none."""
    if qemu == "vpc":
        patch_vhd(path, epoch, repro.seeded_uuid(seed, "vhd-unique-id"))
    elif qemu == "vdi":
        patch_vdi(path, repro.seeded_uuid(seed, "vdi-image"), repro.seeded_uuid(seed, "vdi-modify"))
    elif qemu == "vmdk":
        patch_vmdk(path, vmdk_cid(seed))


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


_QEMU_IMG_PROGRESS = re.compile(r"\s*\((\d+(?:\.\d+)?)/100%\)\s*")


def qemu_img_progress(text: str) -> tuple[float, float] | None:
    """qemu-img convert -p's redraws, `    (12.34/100%)` each ended by \r, on stdout.
    -p changes what it prints, not what it writes."""
    m = _QEMU_IMG_PROGRESS.fullmatch(text)
    return (float(m[1]), 100.0) if m else None


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
    p = ctx.params(Params)
    fmt = formats.get(p.format)
    raw = ctx.input_path("assemble")
    virtual = ctx.input("assemble").info.get("virtual_size") or raw.stat().st_size
    dest = raw.with_suffix(f".{fmt.suffix}")  # beside its raw disk, one folder per layout
    # Written under its published name in a private folder: a vmdk records its own name.
    private = aside(dest)
    tmp = private / (p.artifact or dest.name)
    try:
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir()
        if fmt.name == "vhd" and shutil.which("vhd-util") and not p.options:
            ctx.emit("vhd-util convert to vhd")
            await _vhd_util(raw, tmp, p.vhd_subformat or "dynamic")
        else:
            ctx.emit(f"qemu-img convert to {fmt.name}")
            args = convert_args(
                fmt.name, p.compression, p.vhd_subformat, cpu_budget(ctx), p.options
            )
            await proc.run(
                ["qemu-img", "convert", "-p", "-f", "raw", *args, raw, tmp],
                progress=qemu_img_progress,
            )
            make_reproducible(tmp, fmt.qemu or fmt.name, p.epoch, ctx.job.key)
        await verify_disk(tmp, fmt.qemu or fmt.name, virtual)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return Output(dest, {"virtual_size": virtual, "format": fmt.name})


def cost(params: Mapping[str, Any]) -> float:
    fmt = formats.FORMATS.get(str(params.get("format")))
    if fmt is None:
        return 2.0
    if fmt.name == "qcow2":
        return formats.QCOW2_COST.get(str(params.get("compression")), fmt.cost)
    return fmt.cost


STAGE = Stage(kind="convert", recipe=1, params=Params, run=run, cost=cost, module=__name__)
