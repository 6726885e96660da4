"""boot: start a disk image in QEMU and wait for the guest's login prompt.

The guest's own words on the serial console decide, never a guess from timing. The
image is opened with -snapshot, so booting never changes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from factory import arches, proc
from factory.arches import BootMethod
from factory.fsutil import atomic_write
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams

LOGIN = r"login:\s*$"
# A guest that says this never reaches a login prompt: stop there instead of waiting
# out the timeout (minutes, for a nightly run that boots every disk). These are the
# kernel's last words, after its trace: the whole line, so the reason is in the tail.
PANIC = r"---\[ end Kernel panic - not syncing: .*\]---"
KVM_VERDICTS = "kvm.json"  # in the cache folder
FIRMWARES = arches.FIRMWARES


class Params(StageParams):
    arch: str
    boot: BootMethod  # how the disk is booted: UEFI where it has an ESP
    layout: str  # the disk's folder
    timeout: int


def check_tools(arch: str, firmware: str) -> None:
    """One line naming the package to install, before QEMU fails less clearly."""
    if arch not in arches.ARCHES:
        raise StageError(f"cannot boot {arch} images (can: {', '.join(arches.ARCHES)})")
    a = arches.get(arch)
    if shutil.which(a.qemu_system) is None:
        raise StageError(f"{a.qemu_system} not found: install {a.qemu_package}")
    if firmware not in FIRMWARES:
        raise StageError(f"unknown firmware {firmware!r} (valid: {', '.join(FIRMWARES)})")
    if firmware == "bios" and a.boot_methods == ("uefi",):
        raise StageError(f"cannot boot {arch} by bios: its firmware is UEFI (--firmware uefi)")
    if firmware != "bios":
        if firmware not in a.uefi:
            can = ", ".join(n for n, x in arches.ARCHES.items() if x.uefi) or "none"
            raise StageError(f"UEFI boot is for {can} images, not {arch}")
        for f in a.uefi[firmware]:
            if not f.is_file():
                raise StageError(f"{f} not found: install {a.uefi_package}")


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
    a = arches.get(arch)
    common = ["-smp", "2", "-monitor", "none", "-serial", "stdio", "-snapshot", "-nic", "none",
              "-drive", f"file={image},format={fmt},if=virtio"]  # fmt: skip
    args = [a.qemu_system, *(["-accel", accel] if a.kvm else []), *a.machine, *common]
    if firmware != "bios":
        assert vars_copy is not None
        code, _ = a.uefi[firmware]  # type: ignore[index]
        args += [*a.uefi_machine,
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
    if not arches.get(arch).kvm or not kvm_usable():
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
    if firmware != "bios":
        # The firmware writes its variables: each boot gets its own copy.
        fd, name = tempfile.mkstemp(prefix="UEFI_VARS.", suffix=".fd", dir=work)
        os.close(fd)
        vars_copy = Path(name)
        shutil.copyfile(arches.get(arch).uefi[firmware][1], vars_copy)  # type: ignore[index]
    try:
        args = qemu_args(image, fmt, arch, firmware, vars_copy)
        accel = await choose_accel(args, arch, verdicts, say)
        started = time.monotonic()
        booted = await proc.run(
            qemu_args(image, fmt, arch, firmware, vars_copy, accel),
            until=f"{LOGIN}|{PANIC}",
            timeout=timeout,
        )
        if booted.stderr_tail and re.search(PANIC, booted.stderr_tail[-1]):
            after = time.monotonic() - started
            raise StageError(f"{image.name}: the kernel panicked after {after:.0f} s, no login")
    except TimeoutError:
        raise StageError(f"{image.name}: no login prompt within {timeout:.0f} s") from None
    except proc.CommandError as exc:
        raise StageError(f"{image.name}: QEMU stopped before a login prompt: {exc}") from exc
    finally:
        if vars_copy is not None:
            vars_copy.unlink(missing_ok=True)
    return time.monotonic() - started


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    firmware = arches.get(p.arch).firmware(p.boot)
    ctx.emit(f"booting ({firmware})")
    seconds = await boot_image(
        ctx.input_path("assemble"),
        arch=p.arch,
        firmware=firmware,
        timeout=p.timeout,
        work=ctx.layout_work(p.layout),
        verdicts=ctx.ws.cache.root / KVM_VERDICTS,
        say=ctx.emit,
    )
    return Output(None, {"login_after": round(seconds, 1), "firmware": firmware})


STAGE = Stage(
    kind="boot",
    recipe=1,
    params=Params,
    run=run,
    cost=lambda p: 40.0,  # rough CPU seconds on a warm cache
    module=__name__,
)
