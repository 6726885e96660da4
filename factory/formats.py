"""The output formats: what each is made from and what its file is called."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["disk", "tree"]


@dataclass(frozen=True)
class Format:
    """One output format. `qemu` is qemu-img's name for disk formats made by conversion."""

    name: str
    source: Source
    suffix: str
    qemu: str | None = None
    doc: str = ""


_KNOWN = (
    Format("raw", "disk", "raw", "raw", "the assembled disk, sparse"),
    Format(
        "qcow2", "disk", "qcow2", "qcow2", "QEMU copy-on-write, compressed per qcow2_compression"
    ),
    Format("vhd", "disk", "vhd", "vpc", "Hyper-V/Azure VHD, virtual size kept exact"),
    Format("vmdk", "disk", "vmdk", "vmdk", "VMware, streamOptimized"),
    Format("vdi", "disk", "vdi", "vdi", "VirtualBox"),
    Format("tar", "tree", "tar", None, "the tree, numeric owners, xattrs and ACLs"),
    Format("tgz", "tree", "tar.gz", None, "the tree, gzip-compressed tar"),
    Format("squashfs", "tree", "squashfs", None, "the tree as a squashfs image"),
    Format("aci", "tree", "aci", None, "appc container image"),
    Format("docker", "tree", "docker.tar", None, "docker image archive for `docker load`"),
)

# Other formats qemu-img can write; a user may ask for them by qemu-img's name.
_QEMU_EXTRA = (
    Format("vhdx", "disk", "vhdx", "vhdx", "Hyper-V VHDX"),
    Format("qed", "disk", "qed", "qed", "QEMU enhanced disk"),
    Format("parallels", "disk", "hds", "parallels", "Parallels"),
)

FORMATS: dict[str, Format] = {f.name: f for f in (*_KNOWN, *_QEMU_EXTRA)}

DISK_FORMATS = tuple(name for name, f in FORMATS.items() if f.source == "disk")
TREE_FORMATS = tuple(name for name, f in FORMATS.items() if f.source == "tree")


def get(name: str) -> Format:
    return FORMATS[name]
