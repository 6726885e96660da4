"""Debian: the packages a bootable image needs, and apt sources for any release.

Pure functions: they choose and write text; the rootfs stage runs mmdebstrap with them.
The mirror is never named here: "host" means the build machine's own apt sources.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from factory import arches, proc
from factory.arches import BootMethod

if TYPE_CHECKING:
    from factory.distros import Family

# The kernel metapackage of each arch (factory.arches names the arches).
KERNELS = {
    "amd64": "linux-image-amd64",
    "arm64": "linux-image-arm64",
    "ppc64el": "linux-image-powerpc64le",
}

# What boots: init, device manager, initramfs, filesystem tools, network (systemd-networkd
# is part of systemd in bookworm and trixie).
BASE = ("systemd-sysv", "udev", "initramfs-tools", "e2fsprogs", "kmod", "zstd", "iproute2")


def bootloader(method: BootMethod, arch: str) -> tuple[str, ...]:
    """The packages with the boot code and modules a boot method needs on `arch`: the
    signed EFI binaries too, so the ESP gets shim and Debian's signed grub."""
    if method == "uefi":
        return (f"grub-efi-{arch}-bin", "grub2-common", "shim-signed", f"grub-efi-{arch}-signed")
    if method == "prep":
        return ("grub-ieee1275-bin", "grub2-common")
    return ("grub-pc-bin", "grub2-common")


KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HOST_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")

# Release codename → VERSION_ID (os-release), as purls and SBOMs name a distro.
VERSIONS = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13", "forky": "14"}


def version_of(release: str) -> str:
    """`12` for bookworm; a release without a number (sid) keeps its name."""
    return VERSIONS.get(release, release)


def _crc24(data: bytes) -> int:
    """OpenPGP's ASCII armor checksum (RFC 4880, 6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def embedded_key(data: bytes) -> str:
    """A keyring file (binary, as `gpg --export` writes it, or armored) as the value of
    a deb822 Signed-By field. Embedded, the key needs no file that apt's unprivileged
    fetcher must read, on this machine or a build host, and the image keeps it."""
    if data.lstrip().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
        lines = data.decode("ascii").strip().splitlines()
    else:
        b64 = base64.b64encode(data).decode()
        crc = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode()
        lines = [
            "-----BEGIN PGP PUBLIC KEY BLOCK-----",
            "",
            *(b64[i : i + 64] for i in range(0, len(b64), 64)),
            f"={crc}",
            "-----END PGP PUBLIC KEY BLOCK-----",
        ]
    return "".join(f"\n {line.rstrip() or '.'}" for line in lines)


def packages_for(
    release: str, arch: str, methods: Iterable[BootMethod], extra: Iterable[str]
) -> list[str]:
    """Everything mmdebstrap installs on top of minbase (the boot loaders of every boot
    method the tree's disks use), sorted and without repeats."""
    del release  # the same set serves every supported release today
    loaders = (pkg for method in methods for pkg in bootloader(method, arch))
    return sorted({KERNELS[arch], *BASE, *loaders, *extra})


@dataclass(frozen=True)
class Stanza:
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None
    trusted: bool = False  # a local file:// repository without a signature

    def render(self) -> str:
        lines = [
            "Types: deb",
            f"URIs: {' '.join(self.uris)}",
            f"Suites: {' '.join(self.suites)}",
            f"Components: {' '.join(self.components)}",
        ]
        if self.signed_by:
            lines.append(f"Signed-By: {self.signed_by}")
        if self.trusted:
            lines.append("Trusted: yes")
        return "\n".join(lines) + "\n"


_ONE_LINE = re.compile(
    r"^deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)(?P<comps>.*)$"
)


class SourcesError(ValueError):
    pass


def parse_sources(text: str, deb822: bool) -> list[Stanza]:
    """The `deb` entries of an apt sources file, either format."""
    out: list[Stanza] = []
    if deb822:
        for block in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            key = ""
            for line in block.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if line[0].isspace() and key:
                    # Continuation lines kept as they are: an embedded Signed-By key
                    # block must be written back line by line.
                    fields[key] += "\n" + line.rstrip()
                    continue
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            out.append(
                Stanza(
                    tuple(fields.get("uris", "").split()),
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "main").split()),
                    fields.get("signed-by"),
                )
            )
        return out
    for line in text.splitlines():
        m = _ONE_LINE.match(line.split("#", 1)[0].strip())
        if m is None:
            continue
        opts = dict(o.split("=", 1) for o in (m["opts"] or "").split() if "=" in o)
        out.append(
            Stanza(
                (m["uri"],),
                (m["suite"],),
                tuple(m["comps"].split()) or ("main",),
                opts.get("signed-by"),
            )
        )
    return out


def _suite_kind(suite: str) -> str:
    if suite.endswith("/updates"):  # the security suite's name before bullseye
        return "security"
    for kind in ("security", "updates", "backports", "proposed-updates"):
        if suite.endswith(f"-{kind}") or suite.endswith(f"/{kind}"):
            return kind
    return "release"


def sources_for(release: str, stanzas: list[Stanza], updates: bool, security: bool) -> str:
    """deb822 sources for `release` made from the host's entries: suites renamed to the
    release, with -updates and -security kept or left out as the matrix says."""
    keep = {"release": True, "updates": updates, "security": security}
    seen: set[tuple[str, str]] = set()
    out: list[str] = []
    for st in stanzas:
        suites = []
        for suite in st.suites:
            kind = _suite_kind(suite)
            if not keep.get(kind, False):
                continue
            new = release if kind == "release" else f"{release}-{kind}"
            if all((uri, new) not in seen for uri in st.uris):
                suites.append(new)
                seen.update((uri, new) for uri in st.uris)
        if suites:
            out.append(
                Stanza(st.uris, tuple(suites), st.components, st.signed_by or KEYRING).render()
            )
    if not any(_suite_kind(s) == "release" for st in stanzas for s in st.suites):
        raise SourcesError("the host's apt sources have no Debian release suite")
    return "\n".join(out)


def host_sources() -> tuple[str, bool]:
    """The build machine's apt sources: (text, is deb822)."""
    for path in HOST_SOURCES:
        p = Path(path)
        if p.is_file():
            return p.read_text(), p.suffix == ".sources"
    raise SourcesError(
        f"this machine has no {' or '.join(HOST_SOURCES)} (set a mirror URL in the matrix)"
    )


def sources(release: str, mirror: str, updates: bool, security: bool) -> str:
    """deb822 sources of the Debian archive for `release`: the build machine's own
    entries renamed to it ("host"), or the mirror URL's."""
    if mirror == "host":
        text, deb822 = host_sources()
        return sources_for(release, parse_sources(text, deb822), updates, security)
    return sources_for_url(release, mirror, updates, security)


def extra_source(
    uri: str, suite: str, components: tuple[str, ...], key: bytes | None, trusted: bool
) -> str:
    """A repository of one's own beside the archive, its key embedded."""
    signed_by = embedded_key(key) if key is not None else None
    return Stanza((uri,), (suite,), components, signed_by, trusted=trusted).render()


def suites_of(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(uri, suite, components) of every entry in deb822 sources, in order."""
    return [
        (uri, suite, st.components)
        for st in parse_sources(text, True)
        for uri in st.uris
        for suite in st.suites
    ]


def sources_for_url(release: str, url: str, updates: bool, security: bool) -> str:
    """deb822 sources for a mirror URL; security from the sibling `-security` archive,
    as Debian mirrors lay it out."""
    base = url.rstrip("/")
    main = [release] + ([f"{release}-updates"] if updates else [])
    out = [Stanza((base,), tuple(main), ("main",), KEYRING).render()]
    if security:
        out.append(
            Stanza((f"{base}-security",), (f"{release}-security",), ("main",), KEYRING).render()
        )
    return "\n".join(out)


# --- the tree: bootstrap, initramfs, manifest, clean-up ------------------------------------

# update-initramfs is diverted while packages install (the kernel's postinst and the
# initramfs-tools trigger would each build one) and restored afterwards; finalise builds
# it once.
DIVERT = (
    'chroot "$1" dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.factory '
    "--add /usr/sbin/update-initramfs && "
    "printf '#!/bin/sh\\necho update-initramfs: deferred to finalise >&2\\n' "
    '> "$1/usr/sbin/update-initramfs" && chmod 755 "$1/usr/sbin/update-initramfs"'
)
UNDIVERT = (
    'rm -f "$1/usr/sbin/update-initramfs" && '
    'chroot "$1" dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.factory '
    "--remove /usr/sbin/update-initramfs"
)


def keep_release_files(dest: Path) -> str:
    """A customize hook that copies the Release files apt used out of the tree, before
    mmdebstrap's clean-up deletes them: they say which archive state the tree is of."""
    folder = shlex.quote(str(dest))
    return (
        f'mkdir -p {folder} && for f in "$1"/var/lib/apt/lists/*Release; do '
        f'[ -e "$f" ] && cp "$f" {folder}/; done; true'
    )


def mmdebstrap_args(
    *,
    release: str,
    arch: str,
    packages: Iterable[str],
    target: Path,
    sources_file: Path,
    lists: Path | None = None,
) -> list[str]:
    keep = [f"--customize-hook={keep_release_files(lists)}"] if lists is not None else []
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        f"--architectures={arch}",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Retries "3"',
        "--dpkgopt=force-unsafe-io",
        f"--essential-hook={DIVERT}",
        f"--customize-hook={UNDIVERT}",
        *keep,
        release,
        str(target),
        str(sources_file),
    ]


# mmdebstrap's phases (its `I:` lines, 1.3) and the share of a build done when each
# begins. Its own bars (apt's downloads by Status-Fd, dpkg's by status-fd) are drawn only
# on a terminal and --verbose would put all of apt's and dpkg's output in the log; these
# lines come at every verbosity, in this order. The shares are rough (an amd64 tree, ~100 s:
# installing the packages in the chroot takes the longest).
MMDEBSTRAP_PHASES = (
    ("I: running apt-get update", 0.02),
    ("I: downloading packages", 0.10),
    ("I: extracting archives", 0.30),
    ("I: installing essential packages", 0.35),
    ("I: installing remaining packages", 0.50),
    ("I: running --customize-hook", 0.95),
    ("I: cleaning package lists", 0.98),
)


def mmdebstrap_progress(line: str) -> tuple[float, float] | None:
    """The share of the build done when mmdebstrap enters the phase `line` starts."""
    for start, share in MMDEBSTRAP_PHASES:
        if line.startswith(start):
            return share, 1.0
    return None


_INDEX_FAIL = re.compile(
    r"(?:Failed to fetch|Hash Sum mismatch|File has unexpected size).*?"
    r"dists/(?P<suite>[\w.-]+)/"
)


def explain(tail: Iterable[str], arch: str) -> str | None:
    """apt's failure on a broken mirror index, as the setting that avoids it."""
    for line in tail:
        m = _INDEX_FAIL.search(line)
        if m:
            suite = m["suite"]
            kind = suite.rsplit("-", 1)[-1] if "-" in suite else ""
            hint = (
                f"set [mirrors] {kind} = false to leave it out"
                if kind in ("updates", "security")
                else "check the mirror"
            )
            return f"the mirror's index for {suite} ({arch}) failed to download ({hint})"
    return None


# The initramfs holds the drivers a VM disk image needs to reach its root filesystem,
# not MODULES=most (every storage, USB, HID, network and framebuffer driver: several
# thousand modules to resolve and compress, minutes under emulation). MODULES=dep would
# look at the build host's devices, which is wrong in a chroot. The image keeps this
# config, so its own kernel updates build the same initramfs.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "sr_mod", "nvme", "ahci")
FS_MODULES = {
    "ext4": ("ext4", "crc32c_generic"),
    "xfs": ("xfs", "crc32c_generic"),
    "btrfs": ("btrfs", "crc32c_generic"),  # a btrfs root ([[image.partitions]])
}
INITRAMFS_CONF = Path("etc/initramfs-tools/conf.d/factory.conf")
INITRAMFS_LIST = Path("etc/initramfs-tools/modules")


def initramfs_config(arch: str, filesystem: str) -> dict[Path, str]:
    """initramfs-tools settings for the image: the module list, and zstd -3 rather than
    the default -9 (a slightly larger file, made faster)."""
    modules = [*INITRAMFS_MODULES, *arches.get(arch).initramfs_modules, *FS_MODULES[filesystem]]
    return {
        INITRAMFS_CONF: (
            "# Written by factory: the modules listed in /etc/initramfs-tools/modules,\n"
            "# enough for a VM disk image (set MODULES=most for any hardware).\n"
            "MODULES=list\nCOMPRESS=zstd\nCOMPRESSLEVEL=3\n"
        ),
        INITRAMFS_LIST: "# Added by factory: what a VM disk image needs to find its root.\n"
        + "".join(f"{m}\n" for m in modules),
    }


def write_initramfs_config(tree: Path, arch: str, filesystem: str) -> None:
    """Our settings; the module list is added to what the packages put there."""
    for conf, text in initramfs_config(arch, filesystem).items():
        path = tree / conf
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text() if conf == INITRAMFS_LIST and path.exists() else ""
        path.write_text(old + text)


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

_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?::[a-z0-9][a-z0-9-]*)?(?:=[A-Za-z0-9.+~:-]+)?")


def package_problem(name: str) -> str | None:
    """Why `name` cannot be a Debian package (Debian policy 5.6.1), or None."""
    if _PACKAGE.fullmatch(name):
        return None
    return (
        f"{name!r} is not a Debian package name (lowercase letters, digits, '+', '.', '-', "
        "starting with a letter or digit; optionally ':arch' or '=version')"
    )


class Debian:
    """The Debian family (and its derivatives' archives): mmdebstrap, initramfs-tools,
    dpkg, apt."""

    name: str = "debian"
    # Known releases. A well-formed release that is not listed is accepted too (a new
    # Debian release should not need a factory release); the list is for messages and docs.
    releases: tuple[str, ...] = ("bullseye", "bookworm", "trixie", "forky", "sid")
    efi_vendor: str = "debian"  # /EFI/debian on the ESP, where Debian's signed grub reads
    leftovers: tuple[str, ...] = LEFTOVERS
    # NoCloud's cidata volume (vfat or iso9660) is found by blkid and mounted by mount,
    # both in every tree; the filesystems are the kernel's modules.
    cloud_init_packages: tuple[str, ...] = ("cloud-init",)
    initramfs_command: tuple[str, ...] = ("update-initramfs", "-c", "-k", "all")
    clean_command: tuple[str, ...] = ("apt-get", "clean")
    manifest_format: str = "dpkg"
    purl_type: str = "deb"

    # The protocol's methods are this module's functions.
    version_of = staticmethod(version_of)
    sources = staticmethod(sources)
    extra_source = staticmethod(extra_source)
    suites_of = staticmethod(suites_of)
    package_problem = staticmethod(package_problem)
    packages = staticmethod(packages_for)
    bootstrap_args = staticmethod(mmdebstrap_args)
    bootstrap_progress = staticmethod(mmdebstrap_progress)
    explain_bootstrap = staticmethod(explain)
    configure_initramfs = staticmethod(write_initramfs_config)
    manifest = staticmethod(dpkg_manifest)


FAMILY: Family = Debian()  # mypy checks it against the protocol
