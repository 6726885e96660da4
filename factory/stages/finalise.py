"""finalise: diskimage-builder's finalise done once on the tree, before any disk exists.

The root filesystem's UUID comes from the plan, so the bootloader config and fstab can name
it now. The result is its own cache entry (the rootfs entry stays as mmdebstrap made it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio

from factory import arches, distros, layouts, proc, repro, sizing
from factory.arches import BootMethod
from factory.fsutil import write_if_changed
from factory.results import Output, StageError
from factory.stages import Context, Stage, StageParams, chroot, rootfs

MANIFEST_DIR = Path("etc/factory/manifests")


class Hook(StageParams):
    name: str
    digest: str  # of the folder's files: what the key covers
    path: str  # where it is: left out of the key


class Params(StageParams):
    family: str
    release: str
    arch: str
    boot: tuple[BootMethod, ...]  # of every disk the tree is for: their grub platforms
    root_uuid: str
    filesystem: str  # the root partition's
    volumes: tuple[layouts.Volume, ...] = ()  # the user's partitions: fstab names them all
    image_name: str
    hooks: tuple[Hook, ...] = ()
    manifest: str  # where the package manifest goes under OUT
    epoch: int
    datasources: tuple[str, ...] = ()  # cloud-init's datasource_list; () without cloud-init


NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n"
SSH_KEYGEN = (
    "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\n"
    "ExecStartPre=/usr/sbin/sshd -t\n"
)


DATASOURCES_CFG = Path("etc/cloud/cloud.cfg.d/91-factory-datasources.cfg")


def datasources_cfg(names: Iterable[str]) -> str:
    """cloud-init's datasource_list, in a file named after diskimage-builder's: read after
    the package's 90_dpkg.cfg (every datasource), so it wins."""
    return f"# [image] cloud_init of the factory matrix\ndatasource_list: [ {', '.join(names)} ]\n"


def _cloud_init(tree: Path, datasources: tuple[str, ...]) -> None:
    if not datasources:
        return
    if not (tree / "etc/cloud").is_dir():
        raise StageError("cloud_init is set but the tree has no /etc/cloud (no cloud-init package)")
    (tree / DATASOURCES_CFG).parent.mkdir(parents=True, exist_ok=True)
    (tree / DATASOURCES_CFG).write_text(datasources_cfg(datasources))
    (tree / DATASOURCES_CFG).chmod(0o644)


@dataclass(frozen=True)
class Kernel:
    image: str  # file name in /boot: vmlinuz-VERSION, or vmlinux-VERSION (a plain ELF)
    version: str


def _version_key(v: str) -> list[int | str]:
    return [int(x) if x.isdigit() else x for x in v.replace("-", ".").split(".")]


def newest_kernel(tree: Path) -> Kernel:
    """The newest kernel in the tree's /boot (compressed on x86, a plain ELF on POWER)."""
    prefixes = dict.fromkeys(a.kernel_prefix for a in arches.ARCHES.values())
    found = [
        Kernel(p.name, p.name.split("-", 1)[1])
        for prefix in prefixes
        for p in (tree / "boot").glob(f"{prefix}-*")
    ]
    if not found:
        raise StageError("the tree has no kernel in /boot")
    return max(found, key=lambda k: _version_key(k.version))


def grub_cfg(uuid: str, kernel: Kernel, arch: str, title: str, boot_uuid: str | None = None) -> str:
    """The menu: the kernel and initrd are read from /boot's filesystem (`boot_uuid` when
    /boot is a partition of its own, where they sit at its top), root= is the root's."""
    serial = (
        (
            "serial --unit=0 --speed=115200\nterminal_input console serial\n"
            "terminal_output console serial\n"
        )
        if arches.get(arch).grub_serial
        else ""
    )
    boot = "" if boot_uuid else "/boot"
    cmdline = " ".join((arches.get(arch).console, *arches.get(arch).kernel_args))
    return (
        f"{serial}set timeout=1\nset default=0\n"
        f"menuentry '{title}' {{\n"
        f"\tsearch --no-floppy --fs-uuid --set=root {boot_uuid or uuid}\n"
        f"\tlinux {boot}/{kernel.image} root=UUID={uuid} ro {cmdline}\n"
        f"\tinitrd {boot}/initrd.img-{kernel.version}\n"
        "}\n"
    )


def fstab(uuid: str, filesystem: str) -> str:
    return f"UUID={uuid} / {filesystem} errors=remount-ro 0 1\n"


def _fstab_line(v: layouts.Volume) -> str:
    """One partition's line, with what a user would expect: ext4 checked at boot (root
    first, pass 1; others pass 2) and remounted read-only on errors; XFS and btrfs never
    checked by fsck at boot (their fsck.* do nothing: pass 0); the FAT checked, private
    to root; swap as swap; an empty (data) partition `nofail`, so a lost disk does not
    stop the boot."""
    if v.filesystem == "swap":
        return f"UUID={v.uuid} none swap sw 0 0\n"
    root = v.mountpoint == "/"
    options = {
        "ext4": "errors=remount-ro",
        "xfs": "defaults",
        "btrfs": "defaults",
        "vfat": "umask=0077",
    }[v.filesystem]
    if v.empty:
        options += ",nofail"
    passno = (1 if root else 2) if v.filesystem in ("ext4", "vfat") else 0
    return f"UUID={v.uuid} {v.mountpoint} {v.filesystem} {options} 0 {passno}\n"


def fstab_of(volumes: Iterable[layouts.Volume]) -> str:
    """fstab for the user's partitions, by UUID, parents before children; swap last."""
    order = sorted(
        volumes,
        key=lambda v: (
            v.mountpoint is None,
            (v.mountpoint or "").count("/") if v.mountpoint != "/" else 0,
            v.mountpoint or "",
        ),
    )
    return "".join(_fstab_line(v) for v in order)


def hook_scripts(hooks: Iterable[Hook], phase: str) -> list[Path]:
    """Executables of a phase across all hook folders, in name order (as diskimage-builder)."""
    found = [
        p
        for h in hooks
        for p in (Path(h.path) / phase).glob("*")
        if p.is_file() and os.access(p, os.X_OK)
    ]
    return sorted(found, key=lambda p: (p.name, str(p)))


def hook_env(p: Params, target_root: str) -> dict[str, str]:
    return {
        "TARGET_ROOT": target_root,
        "ARCH": p.arch,
        "DIB_RELEASE": p.release,
        "DISTRO_NAME": p.family,
        "IMAGE_NAME": p.image_name,
    }


async def _run_hook(
    ctx: Context, script: Path, argv: list[str], env: dict[str, str], tree: Path | None
) -> None:
    ctx.emit(f"hook {script.parent.name}/{script.name}")
    try:
        if tree is None:
            await proc.run(argv, env=env)
        else:
            await chroot.run_in(tree, argv, env)
    except proc.CommandError as exc:
        tail = exc.tail[-1] if exc.tail else "no output"
        raise StageError(
            f"hook {script.parent.parent.name}/{script.parent.name}/{script.name} "
            f"exited {exc.returncode}: {tail}"
        ) from exc


async def _in_chroot(ctx: Context, p: Params, family: distros.Family, tree: Path) -> None:
    """Everything runs with the cell's SOURCE_DATE_EPOCH: initramfs-tools then sorts the
    initrd's cpio and clamps its mtimes, so the same packages give the same initrd."""
    clock = repro.source_date_env(p.epoch)
    hooks = p.hooks
    async with chroot.bound(tree):
        ctx.emit("initramfs")
        family.configure_initramfs(tree, p.arch, p.filesystem)
        await chroot.run_in(tree, list(family.initramfs_command), clock)
        (tree / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
        (tree / "etc/systemd/network/20-wired.network").write_text(NETWORK)
        await chroot.run_in(tree, ["systemctl", "enable", "systemd-networkd.service"], clock)
        scripts = hook_scripts(hooks, "finalise.d")
        if scripts:
            inside = tree / "tmp/factory-hooks"
            for h in hooks:
                src = Path(h.path) / "finalise.d"
                if src.is_dir():
                    shutil.copytree(src, inside / h.name, symlinks=True, dirs_exist_ok=True)
            try:
                for script in scripts:
                    rel = f"/tmp/factory-hooks/{script.parent.parent.name}/{script.name}"
                    await _run_hook(ctx, script, [rel], {**hook_env(p, "/"), **clock}, tree)
            finally:
                shutil.rmtree(inside, ignore_errors=True)
        ctx.emit(" ".join(family.clean_command))
        await chroot.run_in(tree, list(family.clean_command), clock)


def _identity(tree: Path) -> None:
    """Things each VM must make its own, and what the build host left."""
    # mmdebstrap copies these from the build host, mode and all (0755 on some hosts):
    # set the mode too, so one input gives the same bytes on every build host.
    for name, text in (("etc/machine-id", ""), ("etc/hostname", "debian\n"), ("etc/hosts", HOSTS)):
        (tree / name).write_text(text)
        (tree / name).chmod(0o644 if name != "etc/machine-id" else 0o444)
    for path in [
        tree / "var/lib/dbus/machine-id",
        tree / "etc/resolv.conf",
        *tree.glob("etc/ssh/ssh_host_*"),
        *tree.glob("etc/udev/rules.d/70-persistent-*.rules"),
    ]:
        path.unlink(missing_ok=True)
    # cloud-init's instance state (what the build's chroot left, if anything): a VM that
    # finds none runs its first boot with its own instance-id.
    cloud = tree / "var/lib/cloud"
    if cloud.is_dir() and not cloud.is_symlink():
        for path in cloud.iterdir():
            _remove(path)
    if (tree / "usr/sbin/sshd").exists():
        dropin = tree / "etc/systemd/system/ssh.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "factory-hostkeys.conf").write_text(SSH_KEYGEN)
    for node in (tree / "dev").iterdir():
        _remove(node)


def _remove(path: Path) -> None:
    """A folder with what it holds, or anything else (a symlink to a folder is a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_leftovers(tree: Path, leftovers: Iterable[str]) -> None:
    """Drop the family's leftovers (globs) and empty the remaining logs (emptied, not
    removed: the files keep the owners and modes the services that append to them expect)."""
    for pattern in leftovers:
        for path in sorted(tree.glob(pattern), reverse=True):
            _remove(path)
    for path in (tree / "var/log").rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size:
            os.truncate(path, 0)


def sort_xattrs(path: str) -> bool:
    """Rewrite a file's xattrs in name order when they are not: tar stores them in the
    order the filesystem lists them, which is the order they were set in. False when the
    filesystem would not let them be rewritten (they are then left as they were)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem without xattrs: nothing to order
        return False
    if names == sorted(names):
        return True
    values = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    try:
        for name in names:
            os.removexattr(path, name, follow_symlinks=False)
        for name in sorted(names):
            os.setxattr(path, name, values[name], follow_symlinks=False)
    except OSError:
        for name in names:
            with contextlib.suppress(OSError):
                os.setxattr(path, name, values[name], follow_symlinks=False)
        return False
    return True


def normalise_tree(tree: Path, epoch: int) -> int:
    """Set every mtime newer than `epoch` to `epoch`, symlinks themselves included, so the
    tree holds no trace of when it was built, and put every file's xattrs in name order.
    The atime is set too, but reading the tree moves atimes again: tar and squashfs keep
    none, a disk must set its own. Returns how many entries changed time. Blocking: run
    it in a thread."""
    limit = epoch * 1_000_000_000
    changed = 0
    for top, dirs, files in os.walk(tree):
        for name in [None, *dirs, *files] if top == os.fspath(tree) else [*dirs, *files]:
            path = top if name is None else os.path.join(top, name)
            sort_xattrs(path)
            st = os.lstat(path)
            if st.st_mtime_ns > limit:
                mtime = min(st.st_mtime_ns, limit)
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
                changed += 1
    return changed


def _bootloader(tree: Path, p: Params) -> None:
    for platform in arches.get(p.arch).grub_platforms(p.boot):
        src = tree / "usr/lib/grub" / platform
        if not src.is_dir():
            raise StageError(
                f"the tree has no grub modules for {platform} (/usr/lib/grub/{platform})"
            )
        dest = tree / "boot/grub" / platform
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix in (".mod", ".lst", ".o") or f.name == "modinfo.sh":
                shutil.copy2(f, dest / f.name)
    kernel = newest_kernel(tree)
    title = f"{p.family.capitalize()} {p.release} ({p.arch})"
    boot = next((v for v in p.volumes if v.mountpoint == "/boot"), None)
    (tree / "boot/grub/grub.cfg").write_text(
        grub_cfg(p.root_uuid, kernel, p.arch, title, boot.uuid if boot else None)
    )
    if not p.volumes:
        (tree / "etc/fstab").write_text(fstab(p.root_uuid, p.filesystem))
        return
    (tree / "etc/fstab").write_text(fstab_of(p.volumes))
    for v in p.volumes:  # each mount point is a folder of the filesystem above it
        if v.mountpoint is not None:
            (tree / v.mountpoint.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)


async def run(ctx: Context) -> Output:
    p = ctx.params(Params)
    family = distros.get(p.family)
    cache = ctx.ws.cache
    source = ctx.input_path("rootfs")
    manifest_out = ctx.ws.out / p.manifest
    manifest_in = MANIFEST_DIR / f"{p.image_name}.json"
    async with cache.lock(ctx.job.key, ctx.emit):
        entry = cache.get(ctx.job.key)
        if entry is not None and not ctx.ws.refresh:
            cache.touch(entry)
            tree, cached = (await cache.use(ctx.job.key)).root, True
            ctx.emit("from cache")
        else:
            cached = False
            meta: dict[str, object] = {"kind": "finalise", "cell": ctx.job.cell}
            async with cache.building(ctx.job.key, meta) as tree:
                await rootfs.ensure_runnable(p.arch)  # the chroot runs the tree's programs
                ctx.emit("copying tree")
                await proc.run(["cp", "-a", "--reflink=auto", f"{source}/.", tree])
                _bootloader(tree, p)
                await _in_chroot(ctx, p, family, tree)
                _cloud_init(tree, p.datasources)
                _identity(tree)
                manifest = await family.manifest(tree)
                (tree / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
                (tree / manifest_in).write_text(json.dumps(manifest, indent=1) + "\n")
                clock = repro.source_date_env(p.epoch)
                for script in hook_scripts(p.hooks, "cleanup.d"):
                    env = {**hook_env(p, str(tree)), **clock}
                    await _run_hook(ctx, script, [str(script)], env, None)
                await anyio.to_thread.run_sync(_remove_leftovers, tree, family.leftovers)
                ctx.emit("clamping mtimes")
                await anyio.to_thread.run_sync(normalise_tree, tree, p.epoch)
                meta["bytes"] = (await sizing.measure_async(tree)).allocated
            tree = (await cache.use(ctx.job.key)).root
    write_if_changed(manifest_out, (tree / manifest_in).read_bytes())
    return Output(tree, {"manifest": p.manifest, "cached": cached})


STAGE = Stage(
    kind="finalise",
    recipe=2,
    params=Params,
    run=run,
    cost=lambda p: 20.0,  # rough CPU seconds on a warm cache
    module=__name__,
)
