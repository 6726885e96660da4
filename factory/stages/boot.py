"""boot: start a disk image in QEMU (TCG) and wait for the guest's login prompt.

The guest's own words on the serial console decide, never a guess from timing. The
image is opened with -snapshot, so booting never changes it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from factory import proc
from factory.results import Output, StageError
from factory.stages import Context

LOGIN = r"login:\s*$"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


async def detect_format(image: Path) -> str:
    """The format qemu-img sees; vpc is named explicitly, since a fixed VHD reads as raw."""
    if image.suffix == ".vhd":
        return "vpc"
    info = json.loads(
        (await proc.run(["qemu-img", "info", "--output=json", image], capture=True)).text
    )
    return str(info["format"])


def qemu_args(image: Path, fmt: str, arch: str, firmware: str, vars_copy: Path | None) -> list[str]:
    drive = f"file={image},format={fmt},if=virtio"
    if arch == "ppc64el":
        return [
            "qemu-system-ppc64",
            "-M",
            "pseries",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-snapshot",
            "-drive",
            drive,
            "-nic",
            "none",
        ]
    args = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-snapshot",
        "-drive",
        drive,
        "-nic",
        "none",
    ]
    if firmware == "uefi":
        assert vars_copy is not None
        args += [
            "-machine",
            "q35",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]
    return args


async def boot_image(
    image: Path,
    *,
    fmt: str = "raw",
    arch: str = "amd64",
    firmware: str = "bios",
    timeout: float = 300,
    work: Path,
) -> float:
    """Boot until a login prompt; returns the seconds it took. Raises StageError if none."""
    vars_copy = None
    if firmware == "uefi":
        vars_copy = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
    started = time.monotonic()
    try:
        await proc.run(
            qemu_args(image, fmt, arch, firmware, vars_copy), until=LOGIN, timeout=timeout
        )
    except TimeoutError:
        raise StageError(f"{image.name}: no login prompt within {timeout:.0f} s") from None
    except proc.CommandError as exc:
        raise StageError(f"{image.name}: QEMU stopped before a login prompt: {exc}") from exc
    finally:
        if vars_copy is not None:
            vars_copy.unlink(missing_ok=True)
    return time.monotonic() - started


async def run(ctx: Context) -> Output:
    p = ctx.job.params
    firmware = "uefi" if p["layout"] == "gpt-efi" else "bios"
    ctx.emit(f"booting ({firmware})")
    seconds = await boot_image(
        ctx.input_path("assemble"),
        arch=p["arch"],
        firmware=firmware,
        timeout=p["timeout"],
        work=ctx.cell_work,
    )
    return Output(None, {"login_after": round(seconds, 1), "firmware": firmware})
