"""The output formats: what each is made from, what its file is called, how hard it is
compressed and roughly what it costs.

Compression levels are chosen for CPU cost, since compression dominates a run's CPU time
(measured on the 720 MiB bookworm amd64 tree, CPU seconds and size): mksquashfs zstd
level 3 costs 3.7 s for 236 MB where its default 15 costs about 60 s for 210 MB; pigz -3
costs 11 s for 252 MB where gzip -6 costs 29 s for 239 MB. qemu-img offers no level for
qcow2 zlib or vmdk (each about 23 s): zstd is the cheap qcow2 (3.5 s, smaller too).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Source = Literal["disk", "tree"]


@dataclass(frozen=True)
class Format:
    """One output format. `qemu` is qemu-img's name for disk formats made by conversion;
    `level` the compression level used, if the tool takes one; `cost` rough CPU seconds
    on the reference tree, so the scheduler can start the longest work first."""

    name: str
    source: Source
    suffix: str
    qemu: str | None = None
    doc: str = ""
    level: int | None = None
    cost: float = 2.0


_KNOWN = (
    Format("raw", "disk", "raw", "raw", "the assembled disk, sparse", cost=2.0),
    Format(
        "qcow2",
        "disk",
        "qcow2",
        "qcow2",
        "QEMU copy-on-write, compressed per qcow2_compression",
        cost=23.0,
    ),
    Format("vhd", "disk", "vhd", "vpc", "Hyper-V/Azure VHD, virtual size kept exact", cost=2.5),
    Format("vmdk", "disk", "vmdk", "vmdk", "VMware, streamOptimized", cost=23.0),
    Format("vdi", "disk", "vdi", "vdi", "VirtualBox", cost=2.5),
    Format("tar", "tree", "tar", None, "the tree, numeric owners, xattrs and ACLs", cost=1.5),
    Format("tgz", "tree", "tar.gz", None, "the tree, gzip-compressed tar (pigz)", 3, 11.0),
    Format("squashfs", "tree", "squashfs", None, "the tree as a zstd squashfs image", 3, 4.0),
    Format("aci", "tree", "aci", None, "appc container image", cost=2.0),
    Format(
        "docker", "tree", "docker.tar", None, "docker image archive for `docker load`", cost=5.0
    ),
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

# qcow2's cost depends on its compression far more than on anything else.
QCOW2_COST = {"zlib": 23.0, "zstd": 3.5, "none": 1.0}

_ON_OFF = ("on", "off")


def _power_of_two(low: int, high: int) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and low <= int(v) <= high and int(v) & (int(v) - 1) == 0


# What [image.qemu_img_options] may pass to `qemu-img convert -o`, per format: each name
# with its values (a tuple) or a check and how to say it. Left out: what makes several
# files (vmdk flat extents), points outside the image (backing and data files), encrypts,
# or undoes what factory relies on (vhd's force_size, preallocated qcow2s).
QemuOption = tuple[str, ...] | tuple[Callable[[str], bool], str]
QEMU_IMG_OPTIONS: dict[str, dict[str, QemuOption]] = {
    "qcow2": {
        "compat": ("0.10", "1.1", "v2", "v3"),
        "cluster_size": (_power_of_two(512, 2 * 1024 * 1024), "a power of two, 512 to 2097152"),
        "lazy_refcounts": _ON_OFF,
        "refcount_bits": ("1", "2", "4", "8", "16", "32", "64"),
        "extended_l2": _ON_OFF,
        "preallocation": ("off", "metadata"),
    },
    "vhd": {"subformat": ("dynamic", "fixed")},
    "vmdk": {
        "subformat": ("streamOptimized", "monolithicSparse"),
        "adapter_type": ("ide", "lsilogic", "buslogic", "legacyESX"),
        "hwversion": (lambda v: v.isdigit() and 4 <= int(v) <= 21, "a number, 4 to 21"),
        "toolsversion": (str.isdigit, "a number"),
        "compat6": _ON_OFF,
    },
    "vdi": {"static": _ON_OFF},
}
# Options qcow2 has only from compat 1.1 (v3) on; the default compat is 1.1.
QCOW2_V3_ONLY = {"lazy_refcounts": "on", "extended_l2": "on"}


def check_qemu_img_option(fmt: str, name: str, value: str) -> None:
    """ValueError (its message lists what is valid) unless `name=value` is an option
    factory passes to qemu-img for `fmt`."""
    known = QEMU_IMG_OPTIONS.get(fmt)
    if known is None:
        raise ValueError(
            f"format {fmt!r} takes no qemu-img options (formats with options: "
            f"{', '.join(QEMU_IMG_OPTIONS)})"
        )
    if name not in known:
        raise ValueError(
            f"{fmt} has no option {name!r} factory passes to qemu-img (valid: "
            f"{', '.join(known)})"
        )
    rule = known[name]
    if isinstance(rule[0], str):
        if value not in rule:
            raise ValueError(
                f"{fmt} option {name} = {value!r} is not valid (valid: {', '.join(map(str, rule))})"
            )
    elif not rule[0](value):
        raise ValueError(f"{fmt} option {name} = {value!r} is not valid (give {rule[1]})")


def get(name: str) -> Format:
    return FORMATS[name]


_AC_RUN = re.compile(r"[^a-z0-9]+")
AC_IDENTIFIER = re.compile(r"[a-z0-9]+([-._~/][a-z0-9]+)*")


def ac_identifier(name: str) -> str:
    """A name made valid as an appc AC Identifier (`^[a-z0-9]+([-._~/][a-z0-9]+)*$`):
    lowercase; a single '-', '.', '_', '~' or '/' between letters stays, any other run of
    characters becomes one '-', and none is left at either end."""

    def sep(m: re.Match[str]) -> str:
        return m.group() if m.group() in ("-", ".", "_", "~", "/") else "-"

    ident = _AC_RUN.sub(sep, name.lower()).strip("-._~/")
    if not AC_IDENTIFIER.fullmatch(ident):
        raise ValueError(f"{name!r} has no letter or digit to make an AC identifier from")
    return ident


def threads(budget: int | None, cores: int) -> int:
    """Threads one job's tool may use: the run's CPU budget (`--jobs`), never more than
    the cores, at least one. With `--jobs 1` every tool runs single-threaded, as asked;
    with more, a long job left alone at the end of a run can use the idle cores."""
    return max(1, min(budget or cores, cores))
