"""finalise: diskimage-builder's finalise done once on the tree, before any disk exists.

The root filesystem's UUID comes from the plan, so the bootloader config and fstab can name
it now. The result is its own cache entry (the rootfs entry stays as mmdebstrap made it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from factory import proc, repro, sizing
from factory.fsutil import write_if_changed
from factory.results import Output, StageError
from factory.stages import Context, chroot, rootfs

MANIFEST_DIR = Path("etc/factory/manifests")
GRUB_PLATFORMS = {
    "mbr": ("i386-pc",),
    "gpt-efi": ("i386-pc", "x86_64-efi"),
    "ppc-prep": ("powerpc-ieee1275",),
}
CONSOLES = {"amd64": "console=tty0 console=ttyS0,115200", "ppc64el": "console=hvc0"}

# The initramfs holds the drivers a VM disk image needs to reach its root filesystem,
# not MODULES=most (every storage, USB, HID, network and framebuffer driver: several
# thousand modules to resolve and compress, minutes under emulation). MODULES=dep would
# look at the build host's devices, which is wrong in a chroot. The image keeps this
# config, so its own kernel updates build the same initramfs.
INITRAMFS_MODULES = {
    "common": (
        "virtio_pci",
        "virtio_blk",
        "virtio_scsi",
        "sd_mod",
        "sr_mod",
        "nvme",
        "ahci",
    ),
    "amd64": ("ata_piix", "xen_blkfront", "hv_storvsc", "vmw_pvscsi", "mptspi", "atkbd"),
    "ppc64el": ("ibmvscsi", "ibmvfc"),
}
FS_MODULES = {"ext4": ("ext4", "crc32c_generic"), "xfs": ("xfs", "crc32c_generic")}
INITRAMFS_CONF = Path("etc/initramfs-tools/conf.d/factory.conf")
INITRAMFS_LIST = Path("etc/initramfs-tools/modules")


def initramfs_config(arch: str, filesystem: str) -> dict[Path, str]:
    """initramfs-tools settings for the image: the module list, and zstd -3 rather than
    the default -9 (a slightly larger file, made faster)."""
    modules = [
        *INITRAMFS_MODULES["common"],
        *INITRAMFS_MODULES.get(arch, ()),
        *FS_MODULES[filesystem],
    ]
    return {
        INITRAMFS_CONF: (
            "# Written by factory: the modules listed in /etc/initramfs-tools/modules,\n"
            "# enough for a VM disk image (set MODULES=most for any hardware).\n"
            "MODULES=list\nCOMPRESS=zstd\nCOMPRESSLEVEL=3\n"
        ),
        INITRAMFS_LIST: "# Added by factory: what a VM disk image needs to find its root.\n"
        + "".join(f"{m}\n" for m in modules),
    }


NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n"
SSH_KEYGEN = (
    "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\n"
    "ExecStartPre=/usr/sbin/sshd -t\n"
)


@dataclass(frozen=True)
class Kernel:
    image: str  # file name in /boot: vmlinuz-VERSION, or vmlinux-VERSION (ppc64el)
    version: str


def _version_key(v: str) -> list[int | str]:
    return [int(x) if x.isdigit() else x for x in v.replace("-", ".").split(".")]


def newest_kernel(tree: Path) -> Kernel:
    """The newest kernel in the tree's /boot (compressed on x86, a plain ELF on POWER)."""
    found = [
        Kernel(p.name, p.name.split("-", 1)[1])
        for pattern in ("vmlinuz-*", "vmlinux-*")
        for p in (tree / "boot").glob(pattern)
    ]
    if not found:
        raise StageError("the tree has no kernel in /boot")
    return max(found, key=lambda k: _version_key(k.version))


def grub_cfg(uuid: str, kernel: Kernel, arch: str, title: str) -> str:
    serial = (
        (
            "serial --unit=0 --speed=115200\nterminal_input console serial\n"
            "terminal_output console serial\n"
        )
        if arch == "amd64"
        else ""
    )
    return (
        f"{serial}set timeout=1\nset default=0\n"
        f"menuentry '{title}' {{\n"
        f"\tsearch --no-floppy --fs-uuid --set=root {uuid}\n"
        f"\tlinux /boot/{kernel.image} root=UUID={uuid} ro {CONSOLES[arch]}\n"
        f"\tinitrd /boot/initrd.img-{kernel.version}\n"
        "}\n"
    )


def fstab(uuid: str, filesystem: str) -> str:
    return f"UUID={uuid} / {filesystem} errors=remount-ro 0 1\n"


MANIFEST_FIELDS = {
    "package": "${Package}",
    "version": "${Version}",
    "arch": "${Architecture}",
    "status": "${db:Status-Status}",
    "source": "${source:Package}",
    "source_version": "${source:Version}",
    "maintainer": "${Maintainer}",
}


def manifest_rows(text: str) -> list[dict[str, str]]:
    """dpkg-query's tab-separated lines as rows, sorted by package then arch (dpkg's own
    order is its database's, which an SBOM diff must not depend on)."""
    keys = list(MANIFEST_FIELDS)
    rows = [dict(zip(keys, line.split("\t"), strict=True)) for line in text.splitlines() if line]
    return sorted(rows, key=lambda r: (r["package"], r["arch"]))


async def dpkg_manifest(tree: Path) -> list[dict[str, str]]:
    """Every package dpkg knows in the tree, with its source package and maintainer (what
    an SBOM needs), read from its database without a chroot."""
    fmt = "\\t".join(MANIFEST_FIELDS.values()) + "\\n"
    out = await proc.run(
        ["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f", fmt], capture=True
    )
    return manifest_rows(out.text)


def hook_scripts(hooks: list[dict[str, Any]], phase: str) -> list[Path]:
    """Executables of a phase across all hook folders, in name order (as diskimage-builder)."""
    found = [
        p
        for h in hooks
        for p in (Path(h["path"]) / phase).glob("*")
        if p.is_file() and os.access(p, os.X_OK)
    ]
    return sorted(found, key=lambda p: (p.name, str(p)))


def hook_env(ctx: Context, target_root: str) -> dict[str, str]:
    p = ctx.job.params
    return {
        "TARGET_ROOT": target_root,
        "ARCH": p["arch"],
        "DIB_RELEASE": p["release"],
        "DISTRO_NAME": p["family"],
        "IMAGE_NAME": p["image_name"],
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


def _write_initramfs_config(tree: Path, arch: str, filesystem: str) -> None:
    """Our settings; the module list is added to what the packages put there."""
    for conf, text in initramfs_config(arch, filesystem).items():
        path = tree / conf
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text() if conf == INITRAMFS_LIST and path.exists() else ""
        path.write_text(old + text)


async def _in_chroot(ctx: Context, tree: Path, hooks: list[dict[str, Any]]) -> None:
    """Everything runs with the cell's SOURCE_DATE_EPOCH: initramfs-tools then sorts the
    initrd's cpio and clamps its mtimes, so the same packages give the same initrd."""
    clock = repro.source_date_env(int(ctx.job.params["epoch"]))
    async with chroot.bound(tree):
        ctx.emit("initramfs")
        _write_initramfs_config(tree, ctx.job.params["arch"], ctx.job.params["filesystem"])
        await chroot.run_in(tree, ["update-initramfs", "-c", "-k", "all"], clock)
        (tree / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
        (tree / "etc/systemd/network/20-wired.network").write_text(NETWORK)
        await chroot.run_in(tree, ["systemctl", "enable", "systemd-networkd.service"], clock)
        scripts = hook_scripts(hooks, "finalise.d")
        if scripts:
            inside = tree / "tmp/factory-hooks"
            for h in hooks:
                src = Path(h["path"]) / "finalise.d"
                if src.is_dir():
                    shutil.copytree(src, inside / h["name"], symlinks=True, dirs_exist_ok=True)
            try:
                for script in scripts:
                    rel = f"/tmp/factory-hooks/{script.parent.parent.name}/{script.name}"
                    await _run_hook(ctx, script, [rel], {**hook_env(ctx, "/"), **clock}, tree)
            finally:
                shutil.rmtree(inside, ignore_errors=True)
        ctx.emit("apt-get clean")
        await chroot.run_in(tree, ["apt-get", "clean"], clock)


def _identity(tree: Path) -> None:
    """Things each VM must make its own, and what the build host left."""
    (tree / "etc/machine-id").write_text("")
    (tree / "etc/hostname").write_text("debian\n")
    (tree / "etc/hosts").write_text(HOSTS)
    for path in [
        tree / "var/lib/dbus/machine-id",
        tree / "etc/resolv.conf",
        *tree.glob("etc/ssh/ssh_host_*"),
        *tree.glob("etc/udev/rules.d/70-persistent-*.rules"),
    ]:
        path.unlink(missing_ok=True)
    if (tree / "usr/sbin/sshd").exists():
        dropin = tree / "etc/systemd/system/ssh.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "factory-hostkeys.conf").write_text(SSH_KEYGEN)
    dev = tree / "dev"
    for node in dev.iterdir():
        if node.is_dir() and not node.is_symlink():
            shutil.rmtree(node)
        else:
            node.unlink()


# What a build leaves that differs from one build to the next and that the image does not
# need: caches rebuilt on demand, logs of the build itself, a seed each VM must make its own.
LEFTOVERS = (
    "var/cache/ldconfig/aux-cache",  # inode numbers and ctimes of the build's libraries
    "var/cache/apt/*.bin",
    "var/cache/man/*",  # man-db's index: rebuilt by its cron job or timer
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/lib/systemd/random-seed",
    "var/log/**/*.gz",
    "var/log/**/*.xz",
    "var/log/**/*.[0-9]",
    "var/log/bootstrap.log",
    "tmp/*",
    "var/tmp/*",
    "run/blkid",  # blkid's cache of the build host's devices
)


def _remove_leftovers(tree: Path) -> None:
    """Drop LEFTOVERS and empty the remaining logs (emptied, not removed: the files keep
    the owners and modes the services that append to them expect)."""
    for pattern in LEFTOVERS:
        for path in sorted(tree.glob(pattern), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
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


def _bootloader(tree: Path, p: dict[str, Any]) -> None:
    platforms = (pf for layout in p["layouts"] for pf in GRUB_PLATFORMS[layout])
    for platform in dict.fromkeys(platforms):
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
    title = f"{p['family'].capitalize()} {p['release']} ({p['arch']})"
    (tree / "boot/grub/grub.cfg").write_text(grub_cfg(p["root_uuid"], kernel, p["arch"], title))
    (tree / "etc/fstab").write_text(fstab(p["root_uuid"], p["filesystem"]))


async def run(ctx: Context) -> Output:
    p = ctx.job.params
    cache = ctx.ws.cache
    source = ctx.input_path("rootfs")
    manifest_out = ctx.ws.out / p["manifest"]
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
                await rootfs.ensure_runnable(p["arch"])  # the chroot runs the tree's programs
                ctx.emit("copying tree")
                await proc.run(["cp", "-a", "--reflink=auto", f"{source}/.", tree])
                _bootloader(tree, p)
                await _in_chroot(ctx, tree, p["hooks"])
                _identity(tree)
                manifest = await dpkg_manifest(tree)
                (tree / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
                (tree / MANIFEST_DIR / f"{p['image_name']}.json").write_text(
                    json.dumps(manifest, indent=1) + "\n"
                )
                clock = repro.source_date_env(int(p["epoch"]))
                for script in hook_scripts(p["hooks"], "cleanup.d"):
                    env = {**hook_env(ctx, str(tree)), **clock}
                    await _run_hook(ctx, script, [str(script)], env, None)
                _remove_leftovers(tree)
                ctx.emit("clamping mtimes")
                await anyio.to_thread.run_sync(normalise_tree, tree, int(p["epoch"]))
                meta["bytes"] = sizing.measure(tree).allocated
            tree = (await cache.use(ctx.job.key)).root
    write_if_changed(manifest_out, (tree / MANIFEST_DIR / f"{p['image_name']}.json").read_bytes())
    return Output(tree, {"manifest": p["manifest"], "cached": cached})
