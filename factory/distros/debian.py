"""Debian: the packages a bootable image needs, and apt sources for any release.

Pure functions: they choose and write text; the rootfs stage runs mmdebstrap with them.
The mirror is never named here: "host" means the build machine's own apt sources.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

KERNELS = {
    "amd64": "linux-image-amd64",
    "ppc64el": "linux-image-powerpc64le",
    "arm64": "linux-image-arm64",
}

# What boots: init, device manager, initramfs, filesystem tools, network (systemd-networkd
# is part of systemd in bookworm and trixie).
BASE = ("systemd-sysv", "udev", "initramfs-tools", "e2fsprogs", "kmod", "zstd", "iproute2")

BOOTLOADER = {
    "mbr": ("grub-pc-bin", "grub2-common"),
    "gpt-efi": (
        "grub-pc-bin",
        "grub-efi-amd64-bin",
        "grub2-common",
        "shim-signed",
        "grub-efi-amd64-signed",
    ),
    "ppc-prep": ("grub-ieee1275-bin", "grub2-common"),
}

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
    release: str, arch: str, layouts: Iterable[str], extra: Iterable[str]
) -> list[str]:
    """Everything mmdebstrap installs on top of minbase (the boot loaders of every layout
    the tree's disks use), sorted and without repeats."""
    del release  # the same set serves every supported release today
    loaders = (pkg for layout in layouts for pkg in BOOTLOADER[layout])
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
