"""boot: start a disk image in QEMU and wait for the guest's login prompt.

The guest's own words on the serial console decide, never a guess from timing. The
image is opened with -snapshot, so booting never changes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from factory import proc
from factory.fsutil import atomic_write
from factory.results import Output, StageError
from factory.stages import Context

LOGIN = r"login:\s*$"
KVM_VERDICTS = "kvm.json"  # in the cache folder
OVMF = Path("/usr/share/OVMF")
# UEFI firmware (package ovmf): code, and the variable store each boot gets a copy of.
# The .ms vars have Microsoft's keys enrolled and Secure Boot on: shim (signed by
# Microsoft) → grub and kernel (signed by Debian) must verify or nothing boots.
UEFI = {
    "uefi": (OVMF / "OVMF_CODE_4M.fd", OVMF / "OVMF_VARS_4M.fd"),
    "uefi-secureboot": (OVMF / "OVMF_CODE_4M.ms.fd", OVMF / "OVMF_VARS_4M.ms.fd"),
}
OVMF_CODE, OVMF_VARS = UEFI["uefi"]
FIRMWARES = ("bios", *UEFI)
# The QEMU binary of each arch, and the Debian package that has it.
QEMU = {
    "amd64": ("qemu-system-x86_64", "qemu-system-x86"),
    "ppc64el": ("qemu-system-ppc64", "qemu-system-ppc"),
}


def check_tools(arch: str, firmware: str) -> None:
    """One line naming the package to install, before QEMU fails less clearly."""
    if arch not in QEMU:
        raise StageError(f"cannot boot {arch} images (can: {', '.join(QEMU)})")
    binary, package = QEMU[arch]
    if shutil.which(binary) is None:
        raise StageError(f"{binary} not found: install {package}")
    if firmware not in FIRMWARES:
        raise StageError(f"unknown firmware {firmware!r} (valid: {', '.join(FIRMWARES)})")
    if firmware in UEFI:
        if arch != "amd64":
            raise StageError(f"UEFI boot is for amd64 images, not {arch}")
        for f in UEFI[firmware]:
            if not f.is_file():
                raise StageError(f"{f} not found: install ovmf")


async def detect_format(image: Path) -> str:
    """The format qemu-img sees; vpc is named explicitly, since a fixed VHD reads as raw."""
    if image.suffix == ".vhd":
        return "vpc"
    info = json.loads(
        (await proc.run(["qemu-img", "info", "--output=json", image], capture=True)).text
    )
    return str(info["format"])


def qemu_args(
    image: Path, fmt: str, arch: str, firmware: str, vars_copy: Path | None, accel: str = "tcg"
) -> list[str]:
    """The whole QEMU command: the console on stdout, the image read-only (-snapshot),
    no network (nothing leaves the machine)."""
    common = ["-smp", "2", "-monitor", "none", "-serial", "stdio", "-snapshot", "-nic", "none",
              "-drive", f"file={image},format={fmt},if=virtio"]  # fmt: skip
    if arch == "ppc64el":
        return ["qemu-system-ppc64", "-M", "pseries", "-m", "2048", "-nographic", *common]
    args = ["qemu-system-x86_64", "-accel", accel, "-m", "1024", "-display", "none", *common]
    if firmware in UEFI:
        assert vars_copy is not None
        code, _ = UEFI[firmware]
        args += ["-machine", "q35",
                 "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]  # fmt: skip
    return args


# The first lines a Linux kernel prints on the serial console (printk timestamps):
# under a KVM that really works they come within seconds of grub handing over.
KERNEL_TALKS = r"\[\s*\d+\.\d+\]|login:"
KVM_PROBE = 25.0


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _verdicts(path: Path | None) -> dict[str, bool]:
    try:
        data = json.loads(path.read_text()) if path else {}
        return {str(k): bool(v) for k, v in data.items()}
    except (OSError, ValueError):
        return {}


async def choose_accel(
    args: list[str], arch: str, verdicts: Path | None, say: Callable[[str], None]
) -> str:
    """KVM where it really works, else TCG. Some hosts have /dev/kvm whose guests hang
    (this kind of machine: a Debian kernel never prints under it), so the first boot on a
    host tries KVM briefly and watches for the kernel's first words; the verdict is kept
    per host kernel in `verdicts` so later boots do not pay for the probe."""
    if arch != "amd64" or not kvm_usable():
        return "tcg"
    host = platform.release()
    known = _verdicts(verdicts)
    if host not in known:
        probe = list(args)
        probe[probe.index("-accel") + 1] = "kvm"
        try:
            await proc.run(probe, until=KERNEL_TALKS, timeout=KVM_PROBE)
            known[host] = True
        except (TimeoutError, proc.CommandError):
            known[host] = False
        if verdicts is not None:
            with contextlib.suppress(OSError):
                atomic_write(verdicts, json.dumps(known, indent=1, sort_keys=True))
    if known[host]:
        return "kvm"
    say(f"/dev/kvm is there but a guest kernel does not run under it on {host}: using TCG")
    return "tcg"


async def boot_image(
    image: Path,
    *,
    fmt: str = "raw",
    arch: str = "amd64",
    firmware: str = "bios",
    timeout: float = 300,
    work: Path,
    verdicts: Path | None = None,
    say: Callable[[str], None] = proc.note,
) -> float:
    """Boot until a login prompt; returns the seconds it took. Raises StageError if none.
    `verdicts` keeps whether KVM works on this host (see choose_accel)."""
    check_tools(arch, firmware)
    vars_copy = None
    if firmware in UEFI:
        # The firmware writes its variables: each boot gets its own copy.
        fd, name = tempfile.mkstemp(prefix="OVMF_VARS.", suffix=".fd", dir=work)
        os.close(fd)
        vars_copy = Path(name)
        shutil.copyfile(UEFI[firmware][1], vars_copy)
    try:
        args = qemu_args(image, fmt, arch, firmware, vars_copy)
        accel = await choose_accel(args, arch, verdicts, say)
        started = time.monotonic()
        await proc.run(
            qemu_args(image, fmt, arch, firmware, vars_copy, accel), until=LOGIN, timeout=timeout
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
        work=ctx.layout_work(p["layout"]),
        verdicts=ctx.ws.cache.root / KVM_VERDICTS,
        say=ctx.emit,
    )
    return Output(None, {"login_after": round(seconds, 1), "firmware": firmware})
