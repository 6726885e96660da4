"""boot: start a disk image in QEMU and wait for the guest's login prompt.

The guest's own words on the serial console decide, never a guess from timing. The
image is opened with -snapshot, so booting never changes it (unless asked: --write).
With user-data the guest gets a NoCloud seed as a second drive: a FAT volume labelled
CIDATA, made in a file by mkfs.vfat and mtools (no loop device, no mount), removed with
the boot's work folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from factory import arches, proc
from factory.arches import BootMethod
from factory.fsutil import atomic_write
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams

# The prompt ends its line; a console message (cloud-init's, with the kernel's timestamp)
# may be written right after it, before the guest prints a newline.
LOGIN = r"login:\s*(?:$|\[\s*\d+\.\d+\])"
# A guest that says this never reaches a login prompt: stop there instead of waiting
# out the timeout (minutes, for a nightly run that boots every disk). These are the
# kernel's last words, after its trace: the whole line, so the reason is in the tail.
PANIC = r"---\[ end Kernel panic - not syncing: .*\]---"
KVM_VERDICTS = "kvm.json"  # in the cache folder
FIRMWARES = arches.FIRMWARES


# cloud-init's last words on the console (its final_message), once runcmd and the other
# final modules have run: a boot test with user-data waits for them too.
CLOUD_INIT_DONE = r"Cloud-init v\. \S+ finished at"
SEED_HOSTNAME = "factory"
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class UserData(StageParams):
    path: str  # where it is: left out of the key
    digest: str  # sha256 of its bytes: what the key covers


class Params(StageParams):
    arch: str
    boot: BootMethod  # how the disk is booted: UEFI where it has an ESP
    layout: str  # the disk's folder
    timeout: int
    user_data: UserData | None = None  # cloud-init's, on a NoCloud seed


def instance_id_of(user_data: bytes) -> str:
    """The default instance-id: from the user-data's bytes, so other user-data is another
    instance (cloud-init runs its per-instance modules again) and the same is the same."""
    return f"iid-factory-{hashlib.sha256(user_data).hexdigest()[:16]}"


def check_instance_id(value: str) -> str:
    if not _INSTANCE_ID.fullmatch(value):
        raise StageError(
            f"instance-id {value!r} is not plain (letters, digits and . _ : -, at most 128)"
        )
    return value


def meta_data(instance_id: str, hostname: str = SEED_HOSTNAME) -> str:
    """NoCloud's meta-data; JSON strings are YAML strings, so nothing needs escaping."""
    return f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"


def _seed_tool(tool: str, package: str) -> str:
    """Where a seed's tool is: on PATH, or in /usr/sbin (mkfs.vfat, for a user's PATH)."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin")
    if found is None:
        raise StageError(f"{tool} not found (a NoCloud seed needs it): install {package}")
    return found


@contextlib.asynccontextmanager
async def nocloud_seed(
    work: Path, user_data: bytes, instance_id: str | None = None
) -> AsyncIterator[Path]:
    """A NoCloud seed (vfat labelled CIDATA holding user-data and meta-data) in a file of
    its own under `work`, removed on the way out however the boot ends."""
    mkfs, mcopy = (_seed_tool(t, p) for t, p in (("mkfs.vfat", "dosfstools"), ("mcopy", "mtools")))
    iid = check_instance_id(instance_id or instance_id_of(user_data))
    folder = Path(tempfile.mkdtemp(prefix="nocloud.", dir=work))
    try:
        (folder / "user-data").write_bytes(user_data)
        (folder / "meta-data").write_text(meta_data(iid))
        seed = folder / "seed.img"
        kib = max(2048, 2 * (len(user_data) // 1024) + 1024)  # room for FAT and both files
        await proc.run([mkfs, "-n", "CIDATA", "-C", seed, str(kib)])
        await proc.run(
            [mcopy, "-i", seed, folder / "user-data", folder / "meta-data", "::"],
            env={"MTOOLS_SKIP_CHECK": "1"},
        )
        yield seed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    image: Path,
    fmt: str,
    arch: str,
    firmware: str,
    vars_copy: Path | None,
    accel: str = "tcg",
    seed: Path | None = None,
    snapshot: bool = True,
) -> list[str]:
    """The whole QEMU command: the console on stdout, the image read-only (-snapshot;
    without it, what the guest writes stays, as on a cloud's instance disk), no network
    (nothing leaves the machine). With a NoCloud seed (a second virtio disk)
    the guest gets a NIC on QEMU's user network with restrict=on: DHCP from QEMU itself
    and nothing beyond, as a cloud VM has a NIC; without any, cloud-init's units wait for
    network-online.target, and systemd-networkd-wait-online gives up only after 2 min."""
    a = arches.get(arch)
    nic = ["user,restrict=on,model=virtio-net-pci"] if seed is not None else ["none"]
    common = ["-smp", "2", "-monitor", "none", "-serial", "stdio",
              *(["-snapshot"] if snapshot else []), "-nic", *nic,
              "-drive", f"file={image},format={fmt},if=virtio"]  # fmt: skip
    if seed is not None:
        common += ["-drive", f"file={seed},format=raw,if=virtio"]
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
    user_data: bytes | None = None,
    instance_id: str | None = None,
    wait_for: tuple[str, ...] = (),
    write: bool = False,
) -> float:
    """Boot until a login prompt and a console line matching each of `wait_for` (regexes,
    in any order); returns the seconds it took. Raises StageError if one does not come.
    `verdicts` keeps whether KVM works on this host (see choose_accel). `user_data` goes
    to cloud-init on a NoCloud seed with `instance_id` (default: from the user-data), and
    the boot waits for cloud-init's last words too.
    `write` boots the image itself, not a snapshot: QEMU, stopped by SIGTERM, flushes
    what the guest wrote (its own page cache is the guest's to sync)."""
    check_tools(arch, firmware)
    if user_data is not None:
        wait_for = (*wait_for, CLOUD_INIT_DONE)
    seeding = (
        nocloud_seed(work, user_data, instance_id)
        if user_data is not None
        else contextlib.nullcontext()
    )
    async with seeding as seed:
        vars_copy = None
        if firmware != "bios":
            # The firmware writes its variables: each boot gets its own copy.
            fd, name = tempfile.mkstemp(prefix="UEFI_VARS.", suffix=".fd", dir=work)
            os.close(fd)
            vars_copy = Path(name)
            shutil.copyfile(arches.get(arch).uefi[firmware][1], vars_copy)  # type: ignore[index]
        what = " and ".join(["a login prompt", *(repr(w) for w in wait_for)])
        try:
            args = qemu_args(image, fmt, arch, firmware, vars_copy, seed=seed)
            accel = await choose_accel(args, arch, verdicts, say)
            started = time.monotonic()
            # A panic line matches every pattern at once: the wait ends there.
            booted = await proc.run(
                qemu_args(image, fmt, arch, firmware, vars_copy, accel, seed, snapshot=not write),
                until=tuple(f"(?:{u})|{PANIC}" for u in (LOGIN, *wait_for)),
                timeout=timeout,
            )
            if booted.stderr_tail and re.search(PANIC, booted.stderr_tail[-1]):
                after = time.monotonic() - started
                raise StageError(
                    f"{image.name}: the kernel panicked after {after:.0f} s, no login"
                )
        except TimeoutError:
            raise StageError(f"{image.name}: not {what} within {timeout:.0f} s") from None
        except proc.CommandError as exc:
            raise StageError(f"{image.name}: QEMU stopped before {what}: {exc}") from exc
        finally:
            if vars_copy is not None:
                vars_copy.unlink(missing_ok=True)
        return time.monotonic() - started


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    firmware = arches.get(p.arch).firmware(p.boot)
    user_data = None
    if p.user_data is not None:
        user_data = Path(p.user_data.path).read_bytes()
        if hashlib.sha256(user_data).hexdigest() != p.user_data.digest:
            raise StageError(f"{p.user_data.path} changed since the plan was made (run again)")
    ctx.emit(f"booting ({firmware}{', cloud-init user-data' if user_data else ''})")
    seconds = await boot_image(
        ctx.input_path("assemble"),
        arch=p.arch,
        firmware=firmware,
        timeout=p.timeout,
        work=ctx.layout_work(p.layout),
        verdicts=ctx.ws.cache.root / KVM_VERDICTS,
        say=ctx.emit,
        user_data=user_data,
    )
    info: dict[str, object] = {"login_after": round(seconds, 1), "firmware": firmware}
    if user_data is not None:
        info["cloud_init_done"] = True  # login_after then counts to cloud-init's last words
    return Output(None, info)


STAGE = Stage(
    kind="boot",
    recipe=1,
    params=Params,
    run=run,
    cost=lambda p: 40.0,  # rough CPU seconds on a warm cache
    module=__name__,
)
