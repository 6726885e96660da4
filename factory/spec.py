"""The matrix.toml schema, and load_matrix() with one-line `PATH:LINE: field: problem (fix)` errors.

Pydantic does the checking; this module adds the rules pydantic cannot know (names that could
smuggle shell or path syntax, layouts that do not fit an arch, excludes that name nothing) and
turns every failure into one MatrixError whose line points at the offending key in the file.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from factory import distros as families
from factory.arches import ARCHES
from factory.formats import FORMATS, QCOW2_V3_ONLY, QEMU_IMG_OPTIONS, check_qemu_img_option
from factory.layouts import BOOT_READS, LAYOUTS, Filesystem, Layout, fitting, resolve

KiB = 1024
MiB = 1024 * KiB

# Known releases per family (factory.distros). A well-formed release that is not listed is
# accepted too (a new Debian release should not need a factory release); the list is for
# messages and docs.
FAMILIES: dict[str, tuple[str, ...]] = {n: f.releases for n, f in families.FAMILIES.items()}

Loc = tuple[str | int, ...]


class MatrixError(Exception):
    """A bad matrix file, as one line: `PATH:LINE: field: what is wrong (what would be right)`."""

    def __init__(self, path: str | Path, line: int, field: str, message: str) -> None:
        self.path = Path(path)
        self.shown = str(path)  # as the user gave it: Path() would drop a leading "./"
        self.line = line
        self.field = field
        # One line, whatever the user's values contain.
        self.message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(f"{self.shown}:{line}: {field}: {self.message}")


class _Problem(ValueError):
    """A validator's complaint, with where below the validated value it points (e.g. an index)."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc: Loc = loc


# --- sizes -----------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_UNITS = {
    **{u: 1 for u in ("", "b")},
    **{u: 1024**n for n, p in enumerate("kmgtp", 1) for u in (p, p + "ib")},
    **{p + "b": 1000**n for n, p in enumerate("kmgtp", 1)},  # KB, MB…: decimal, as in coreutils
}
_SIZE_HINT = (
    'e.g. "3GiB", "256MiB", "1.5G"; K/M/G/T and KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB decimal'
)


def parse_size(text: str) -> int:
    """Bytes in a size like "3GiB", "512M", "1.5GiB" or "1048576" (plain bytes); positive only."""
    m = _SIZE.fullmatch(text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size ({_SIZE_HINT})")
    size = int(Decimal(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size {text!r} is not positive (give a size above zero, {_SIZE_HINT})")
    return size


def _size(value: object, info: ValidationInfo) -> object:
    """TOML sizes are strings with a unit: a bare `size = 3` (bytes? GiB?) is refused there."""
    if isinstance(value, str):
        if value == "auto" and info.field_name == "size":
            return None
        return parse_size(value)
    if _from_toml(info) and isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"got the number {value!r}, which has no unit (write a string such as "
            f'"{value}GiB" or "{value}MiB"; plain bytes in quotes: "{value}")'
        )
    return value


def _from_toml(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("toml"))


# --- checks of single values -------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,63}")
_NAME_RULE = "use 1-64 of letters, digits, '.', '_', '-', not starting with '-', not '.' or '..'"
# Any family's package name, version and arch qualifiers; each family's own rule is
# checked against the matrix's distros.
_PACKAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._~:=-]*")
_RELEASE = re.compile(r"[a-z][a-z0-9-]*")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOCKER_TAG = re.compile(
    rf"(?:[A-Za-z0-9.-]+(?::\d+)?/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
)
_URL = re.compile(r"(?:https?|file)://[^\s'\"`$;|&<>\\]+")
_SHELLY = set(";$`|&'\"\\<>*?(){}[]!# \t\r\n\0")


def _one_of(valid: typing.Iterable[str]) -> str:
    return ", ".join(valid)


def _safe_name(value: str) -> str:
    if value in (".", "..") or not _NAME.fullmatch(value):
        raise ValueError(f"unsafe name {value!r} ({_NAME_RULE})")
    return value


def _package(value: str) -> str:
    if not _PACKAGE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a package name (letters, digits, '+', '.', '_', '~', '-', "
            "starting with a letter or digit; optionally ':arch' or '=version')"
        )
    return value


def _arch(value: str) -> str:
    if value not in ARCHES:
        raise ValueError(f"unknown arch {value!r} (valid: {_one_of(ARCHES)})")
    return value


def _format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"unknown format {value!r} (valid: {_one_of(FORMATS)})")
    return value


def _layout(value: str) -> str:
    if value != "auto" and value not in LAYOUTS:
        raise ValueError(f"unknown layout {value!r} (valid: auto, {_one_of(LAYOUTS)})")
    return value


def _family(value: str) -> str:
    if value not in FAMILIES:
        raise ValueError(f"unknown distro family {value!r} (valid: {_one_of(FAMILIES)})")
    return value


def _release(value: str) -> str:
    if not _RELEASE.fullmatch(value):
        raise ValueError(
            f"malformed release {value!r} (lowercase letters, digits and '-', starting with a "
            f"letter, e.g. {_one_of(FAMILIES['debian'])})"
        )
    return value


def _user(value: str) -> str:
    if not _USER.fullmatch(value):
        raise ValueError(f"unsafe user name {value!r} (letters, digits, '_', '.', '-', at most 32)")
    return value


def _address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(
                f'{value!r} is not a hostname or IP address (e.g. "192.0.2.10" or '
                '"build.example.org", no user, port or brackets)'
            ) from None
    return value


def _docker_tag(value: str) -> str:
    if len(value) > 255 or ".." in value or not _DOCKER_TAG.fullmatch(value):
        raise ValueError(
            f'{value!r} is not a docker image reference (e.g. "factory/debian:bookworm": '
            "lowercase path components, optional registry and :tag)"
        )
    return value


def _mirror(value: str) -> str:
    if value != "host" and not _URL.fullmatch(value):
        raise ValueError(
            f'{value!r} is not a mirror ("host", or an http://, https:// or file:// URL '
            "without spaces, quotes or shell characters)"
        )
    return value


def _hook(value: object, info: ValidationInfo) -> object:
    """Hook folders are relative to the matrix file's folder, and must exist when it loads."""
    if not isinstance(value, str | Path):
        return value  # pydantic reports the type
    text = str(value)
    bad = sorted(set(text) & _SHELLY)
    if bad:
        raise ValueError(
            f"hook path {text!r} contains {''.join(bad)!r} (use a plain path: no spaces, quotes "
            "or shell characters)"
        )
    path = _local_path(text, info)
    try:
        path = path.resolve()
        if path.is_dir():
            return path
        what = "is not a folder" if path.exists() else "does not exist"
    except (OSError, RuntimeError) as e:  # name too long, symlink loop…
        what = f"cannot be used: {getattr(e, 'strerror', None) or e}"
    raise ValueError(f"hook folder {path} {what} (give a folder with finalise.d/ or cleanup.d/)")


# cloud-init's datasource names (its sources/DataSource*.py, as its datasource_list takes
# them): "None" is the fallback factory puts last in every list.
CLOUD_INIT_DATASOURCES = (
    "NoCloud", "ConfigDrive", "OpenStack", "Ec2", "Azure", "GCE", "OpenNebula",
    "DigitalOcean", "AltCloud", "OVF", "MAAS", "CloudSigma", "SmartOS", "Bigstep",
    "Scaleway", "AliYun", "CloudStack", "Hetzner", "IBMCloud", "Oracle", "Exoscale",
    "RbxCloud", "UpCloud", "VMware", "Vultr", "LXD", "NWCS", "Akamai", "WSL", "None",
)  # fmt: skip


def _datasource(value: str) -> str:
    if value in CLOUD_INIT_DATASOURCES:
        return value
    close = difflib.get_close_matches(value, CLOUD_INIT_DATASOURCES, n=1, cutoff=0.6)
    if not close:
        close = [n for n in CLOUD_INIT_DATASOURCES if n.lower() == value.lower()]
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"{value!r} is not a cloud-init datasource ({hint}valid: "
        f"{_one_of(CLOUD_INIT_DATASOURCES)})"
    )


def _datasources(items: tuple[str, ...]) -> tuple[str, ...]:
    _unique("datasource")(items)
    if "None" in items[:-1]:
        raise _Problem(
            '"None" is the fallback and ends the list (put it last, or leave it out: '
            "factory adds it)",
            items.index("None"),
        )
    return items


def _user_data(value: object, info: ValidationInfo) -> object:
    """A boot test's cloud-init user-data: relative to the matrix file, there when it loads."""
    if not isinstance(value, str | Path):
        return value  # pydantic reports the type
    path = _local_path(str(value), info)
    try:
        path = path.resolve()
        if path.is_file():
            return path
        what = "is not a file" if path.exists() else "does not exist"
    except (OSError, RuntimeError) as e:
        what = f"cannot be used: {getattr(e, 'strerror', None) or e}"
    raise ValueError(f"user-data {path} {what} (give a #cloud-config file)")


def _local_path(value: str, info: ValidationInfo) -> Path:
    """`~` is the user's home; a relative path is relative to the matrix file's folder."""
    if "\0" in value or "\n" in value:
        raise ValueError(f"{value!r} is not a usable path (no NUL or newline)")
    try:
        expanded = Path(value).expanduser()
    except RuntimeError:  # "~nosuchuser", or no home
        raise ValueError(
            f"cannot expand {value!r} (no such user or home; give a full path)"
        ) from None
    base = info.context.get("base") if isinstance(info.context, dict) else None
    return (Path(base) if base else Path.cwd()) / expanded


_COMMAND = re.compile(r"[A-Za-z0-9_./+][A-Za-z0-9_./+-]{0,254}")
_REMOTE_PATH = re.compile(r"/[A-Za-z0-9_./+-]{0,4095}")


def _command(value: str) -> str:
    """The program that starts factory on a host: it is the one word of the remote command line
    a matrix sets, so it may hold no shell syntax at all."""
    if not _COMMAND.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a command (factory on the PATH, or a full path such as "
            "/opt/factory/.venv/bin/factory: letters, digits and _ . / + -, no spaces or arguments)"
        )
    return value


def _remote_path(value: str) -> str:
    """A folder on a build host: sent as JSON data, never parsed by a shell, but kept plain."""
    if not _REMOTE_PATH.fullmatch(value) or ".." in value.split("/"):
        raise ValueError(
            f"{value!r} is not a plain absolute path on the host (e.g. /var/tmp/factory: "
            "letters, digits and _ . / + -, no '..')"
        )
    return value


def _default_known_hosts() -> Path:
    try:
        return Path("~/.ssh/known_hosts").expanduser()
    except RuntimeError:  # no home: ssh will say the file is missing when it is needed
        return Path("~/.ssh/known_hosts")


def _key_path(value: object, info: ValidationInfo) -> object:
    return _local_path(str(value), info) if isinstance(value, str | Path) else value


def _listing(kind: str, example: str) -> typing.Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A check that a list is not empty and has no element twice (reported at the second one)."""

    def check(items: tuple[Any, ...]) -> tuple[Any, ...]:
        if not items:
            raise ValueError(f"the list is empty (give at least one {kind}, e.g. {example})")
        seen: set[Any] = set()
        for i, item in enumerate(items):
            if item in seen:
                raise _Problem(f"{str(item)!r} is listed twice (list each {kind} once)", i)
            seen.add(item)
        return items

    return check


def _unique(kind: str) -> typing.Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """Like _listing, for lists that may be empty."""

    def check(items: tuple[Any, ...]) -> tuple[Any, ...]:
        return _listing(kind, "")(items) if items else items

    return check


def _option_values(value: object) -> object:
    """qemu-img options as strings: TOML numbers and booleans as qemu-img writes them."""
    if not isinstance(value, dict):
        return value
    out: dict[object, object] = {}
    for fmt, opts in value.items():
        if isinstance(opts, dict):
            opts = {
                k: ("on" if v else "off") if isinstance(v, bool)
                else str(v) if isinstance(v, int | float) else v
                for k, v in opts.items()
            }  # fmt: skip
        out[fmt] = opts
    return out


def _qemu_img_options(value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    for fmt, opts in value.items():
        if fmt not in QEMU_IMG_OPTIONS:
            what = "takes no qemu-img options" if fmt in FORMATS else "is not a format"
            raise _Problem(
                f"{fmt!r} {what} (formats with options: {_one_of(QEMU_IMG_OPTIONS)})", fmt
            )
        for name, val in opts.items():
            try:
                check_qemu_img_option(fmt, name, val)
            except ValueError as exc:
                raise _Problem(str(exc), fmt, name) from None
    return value


Arch = Annotated[str, AfterValidator(_arch)]
Size = Annotated[StrictInt, Field(gt=0)]

# --- the models ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Distro(_Model):
    """A family and release, written "family/release" in the file."""

    family: Annotated[str, AfterValidator(_family)]
    release: Annotated[str, AfterValidator(_release)]

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        family, slash, release = value.partition("/")
        if not slash:
            families = ", ".join(f"{f}/{FAMILIES[f][1]}" for f in FAMILIES)
            raise ValueError(f"malformed distro {value!r} (write family/release, e.g. {families})")
        return {"family": _family(family), "release": _release(release)}

    @property
    def id(self) -> str:
        return f"{self.family}-{self.release}"

    def __str__(self) -> str:
        return f"{self.family}/{self.release}"


@dataclass(frozen=True)
class Cell:
    """One (distro, arch) pair of the matrix: everything built from one root tree."""

    distro: Distro
    arch: str

    @property
    def id(self) -> str:
        return f"{self.distro.family}-{self.distro.release}-{self.arch}"


def _distro_text(value: str) -> str:
    return str(Distro.model_validate(value))


class Exclude(_Model):
    """Removes the cells that match every given field (an arch, a distro, or both)."""

    arch: Arch | None = None
    distro: Annotated[str, AfterValidator(_distro_text)] | None = None

    @model_validator(mode="after")
    def _some(self) -> Exclude:
        if self.arch is None and self.distro is None:
            raise ValueError(
                'excludes nothing (give arch, distro or both, e.g. { arch = "ppc64el", '
                'distro = "debian/trixie" })'
            )
        return self

    def matches(self, cell: Cell) -> bool:
        return (self.arch in (None, cell.arch)) and (self.distro in (None, str(cell.distro)))


_MOUNTPOINT = re.compile(r"/|(?:/[A-Za-z0-9._+-]+)+")
# The smallest filesystem each mkfs here makes (ext4: room for a 4 MiB journal; xfsprogs
# 5.19+ refuses below 300 MiB; mkfs.btrfs needs room for its chunks; FAT32 with
# one-sector clusters needs 65525 of them).
MIN_MIB = {"ext4": 32, "xfs": 300, "btrfs": 128, "vfat": 33, "swap": 1}


def _mountpoint(value: str) -> str:
    if not _MOUNTPOINT.fullmatch(value) or any(p in (".", "..") for p in value.split("/")):
        raise ValueError(
            f'{value!r} is not a mount point (an absolute path such as "/var" or '
            '"/srv/data": letters, digits and . _ + -, no trailing "/", no "." or "..")'
        )
    return value


def _under(child: str, parent: str) -> bool:
    return parent == "/" or child.startswith(parent + "/")


class UserPartition(_Model):
    """One [[image.partitions]] entry: where it is mounted, how big, which filesystem."""

    mountpoint: Annotated[str, AfterValidator(_mountpoint)] | None = None
    size: Annotated[Size | None, BeforeValidator(_size)]  # None: "auto"
    filesystem: Filesystem
    empty: StrictBool = False

    @model_validator(mode="after")
    def _alone(self) -> UserPartition:
        if self.filesystem == "swap":
            if self.mountpoint is not None:
                raise _Problem(
                    "swap has no mount point (remove mountpoint, or pick a filesystem)",
                    "mountpoint",
                )
            if self.size is None:
                raise _Problem('swap needs a size (e.g. size = "256MiB", not "auto")', "size")
        elif self.mountpoint is None:
            raise _Problem(
                f'a {self.filesystem} partition needs a mount point (e.g. mountpoint = "/var")',
                "mountpoint",
            )
        least = MIN_MIB[self.filesystem]
        if self.size is not None and self.size < least * MiB:
            raise _Problem(
                f"{self.filesystem} needs at least {least} MiB (set size to "
                f'"{least}MiB" or more, or "auto")',
                "size",
            )
        if self.mountpoint == "/" and self.filesystem not in ("ext4", "xfs", "btrfs"):
            raise _Problem(
                f"a root on {self.filesystem} cannot hold a Linux system (no owners or "
                'symlinks; use filesystem = "ext4", "xfs" or "btrfs")',
                "filesystem",
            )
        if self.empty and self.mountpoint == "/":
            raise _Problem("the root partition holds the tree (remove empty = true)", "empty")
        return self


def _partitions(parts: tuple[UserPartition, ...]) -> tuple[UserPartition, ...]:
    """The checks across partitions: one per mount point, a root, parents before children."""
    if not parts:
        return parts
    points = [p.mountpoint for p in parts]
    for i, point in enumerate(points):
        if point is not None and point in points[:i]:
            raise _Problem(
                f"mount point {point} is taken by partition {points.index(point) + 1} "
                "(give each partition its own mountpoint)",
                i,
                "mountpoint",
            )
    if "/" not in points:
        raise _Problem(
            'no partition is the root (give one mountpoint = "/", size = "auto")', 0, "mountpoint"
        )
    for i, point in enumerate(points):
        for j in range(i + 1, len(points)):
            later = points[j]
            if point and later and later != "/" and _under(point, later):
                raise _Problem(
                    f"{point} is inside {later}, which comes later (list {later} before {point}:"
                    " a partition is mounted before those under it)",
                    i,
                    "mountpoint",
                )
    return parts


class Image(_Model):
    """What goes into every image and how the disk is made."""

    packages: Annotated[
        tuple[Annotated[str, AfterValidator(_package)], ...], AfterValidator(_unique("package"))
    ] = ()
    size: Annotated[Size | None, BeforeValidator(_size)] = None  # None: from the tree + extra_size
    extra_size: Annotated[Size, BeforeValidator(_size)] = 256 * MiB
    filesystem: Literal["ext4"] = "ext4"
    # Partitions of one's own: the layout then adds only its boot method's partitions.
    partitions: Annotated[tuple[UserPartition, ...], AfterValidator(_partitions)] = ()
    # One layout, or several: each cell gets a disk per layout that fits its arch.
    layout: Annotated[
        tuple[Annotated[str, AfterValidator(_layout)], ...],
        BeforeValidator(lambda v: (_layout(v),) if isinstance(v, str) else v),
        AfterValidator(_listing("layout", '["mbr", "gpt-efi"]')),
    ] = ("auto",)
    hooks: Annotated[
        tuple[Annotated[Path, BeforeValidator(_hook)], ...], AfterValidator(_unique("hook folder"))
    ] = ()
    qcow2_compression: Literal["zlib", "zstd", "none"] = "zlib"
    vhd_subformat: Literal["dynamic", "fixed"] = "dynamic"
    # `qemu-img convert -o` per format, as diskimage-builder's QEMU_IMG_OPTIONS, e.g.
    # qcow2 = { compat = "0.10" } for old hypervisors.
    qemu_img_options: Annotated[
        dict[str, dict[str, str]],
        BeforeValidator(_option_values),
        AfterValidator(_qemu_img_options),
    ] = {}
    docker_tag: Annotated[str, AfterValidator(_docker_tag)] | None = None
    boot_test: StrictBool = False
    # The boot test's cloud-init user-data (a NoCloud seed beside the disk): needs cloud_init.
    boot_test_user_data: Annotated[Path, BeforeValidator(_user_data)] | None = None
    # cloud-init's datasources, as diskimage-builder's DIB_CLOUD_INIT_DATASOURCES: the
    # package goes into the tree and its datasource_list is these and "None".
    cloud_init: Annotated[
        tuple[Annotated[str, AfterValidator(_datasource)], ...], AfterValidator(_datasources)
    ] = ()
    boot_timeout: Annotated[StrictInt, Field(ge=1)] = 300
    # SOURCE_DATE_EPOCH of every cell: None takes the newest Date: of its suites' Release.
    epoch: Annotated[StrictInt, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _fits_size(self) -> Image:
        """Fixed partitions larger than the disk's size: said now, not by sfdisk."""
        if self.size is None:
            return self
        total = 0
        for i, part in enumerate(self.partitions):
            total += part.size or MIN_MIB[part.filesystem] * MiB
            if total > self.size:
                raise _Problem(
                    f"the partitions up to this one need {-(-total // MiB)} MiB, more than "
                    f"image.size {self.size // MiB} MiB (make them smaller, or image.size "
                    'larger, or "auto")',
                    "partitions", i, "size",
                )  # fmt: skip
        return self

    @model_validator(mode="after")
    def _user_data_needs_cloud_init(self) -> Image:
        if self.boot_test_user_data is not None and "NoCloud" not in self.cloud_init:
            raise _Problem(
                "the boot test hands user-data over on a NoCloud seed, which this image's "
                'cloud-init does not read (add "NoCloud" to cloud_init, or remove '
                "boot_test_user_data)",
                "boot_test_user_data",
            )
        return self

    def datasource_list(self) -> tuple[str, ...]:
        """cloud-init's datasource_list: the given ones, then "None" (none: no cloud-init)."""
        if not self.cloud_init:
            return ()
        return tuple(dict.fromkeys((*self.cloud_init, "None")))

    def root_filesystem(self) -> str:
        """The root partition's filesystem: its own with [[image.partitions]]."""
        root = next((p for p in self.partitions if p.mountpoint == "/"), None)
        return root.filesystem if root is not None else self.filesystem

    @model_validator(mode="after")
    def _qcow2_compat(self) -> Image:
        """qcow2 v2 (compat 0.10) lacks what some other settings need: said here, not by
        qemu-img in the middle of a run."""
        qcow2 = self.qemu_img_options.get("qcow2", {})
        if qcow2.get("compat") not in ("0.10", "v2"):
            return self
        if self.qcow2_compression == "zstd":
            raise _Problem(
                'compat 0.10 has no zstd compression (set qcow2_compression = "zlib", or '
                'compat = "1.1")',
                "qemu_img_options", "qcow2", "compat",
            )  # fmt: skip
        for name, value in QCOW2_V3_ONLY.items():
            if qcow2.get(name) == value:
                raise _Problem(
                    f'{name} = "{value}" needs compat 1.1 (remove it, or set compat = "1.1")',
                    "qemu_img_options", "qcow2", name,
                )  # fmt: skip
        if qcow2.get("refcount_bits", "16") != "16":
            raise _Problem(
                'compat 0.10 has only refcount_bits = "16" (remove it, or set compat = "1.1")',
                "qemu_img_options", "qcow2", "refcount_bits",
            )  # fmt: skip
        return self


_SUITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,99}")
_APT_COMPONENT = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
_GPG_KEY = re.compile(r"(?:0x)?[0-9A-Fa-f]{8,40}|[A-Za-z0-9._+][A-Za-z0-9@._+-]{0,127}")


def _suite(value: str) -> str:
    if not _SUITE.fullmatch(value) or ".." in value.split("/"):
        raise ValueError(
            f"{value!r} is not a suite (a name under the repository's dists/, e.g. "
            '"bookworm" or "stable": letters, digits and . _ / + -)'
        )
    return value


def _apt_component(value: str) -> str:
    if not _APT_COMPONENT.fullmatch(value):
        raise ValueError(f'{value!r} is not a component (e.g. "main": lowercase, digits, . _ + -)')
    return value


def _key_file(value: object, info: ValidationInfo) -> object:
    """A keyring file apt checks a repository's signature with: it must exist now."""
    if not isinstance(value, str | Path):
        return value
    path = _local_path(str(value), info)
    if set(str(path)) & _SHELLY:
        raise ValueError(
            f"key file {str(path)!r} has spaces or shell characters (give a plain path)"
        )
    if not path.is_file():
        raise ValueError(
            f"key file {path} does not exist (give the repository's public keyring, e.g. made "
            "with gpg --export KEY > repo.gpg)"
        )
    return path.resolve()


def _gpg_key(value: str) -> str:
    if not _GPG_KEY.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a gpg key (give its fingerprint from gpg --list-secret-keys, "
            'e.g. "0123456789ABCDEF0123456789ABCDEF01234567")'
        )
    return value


class Extra(_Model):
    """A repository of one's own packages beside the Debian archive: its state counts in
    the tree's key like the archive's."""

    uri: Annotated[str, AfterValidator(_mirror)]
    suite: Annotated[str, AfterValidator(_suite)]
    components: Annotated[
        tuple[Annotated[str, AfterValidator(_apt_component)], ...],
        AfterValidator(_listing("component", '["main"]')),
    ] = ("main",)
    signed_by: Annotated[Path, BeforeValidator(_key_file)] | None = None
    trusted: StrictBool = False

    @model_validator(mode="after")
    def _trust(self) -> Extra:
        if self.uri == "host":
            raise _Problem('"host" is only for mirrors.debian (give the repository\'s URL)', "uri")
        if self.trusted and self.signed_by is not None:
            raise _Problem(
                "a signed repository cannot also be trusted (remove trusted = true, or "
                "signed_by for an unsigned local one)",
                "trusted",
            )
        if self.trusted and not self.uri.startswith("file://"):
            raise _Problem(
                "trusted = true is only for a file:// repository (give signed_by = a keyring "
                "file for a remote one)",
                "trusted",
            )
        if not self.trusted and self.signed_by is None:
            raise _Problem(
                "the repository has no key (give signed_by = its keyring file, or trusted = "
                "true for a local file:// repository)",
                "signed_by",
            )
        return self


class Mirrors(_Model):
    """Where apt gets packages: "host" copies the building machine's apt sources."""

    debian: Annotated[str, AfterValidator(_mirror)] = "host"
    updates: StrictBool = True
    security: StrictBool = True
    extra: tuple[Extra, ...] = ()


class Sign(_Model):
    """Sign SHA256SUMS with a key of the building user's gpg keyring."""

    gpg_key: Annotated[str, AfterValidator(_gpg_key)]


class Host(_Model):
    """A remote build host that takes the jobs of cells of its arches."""

    name: Annotated[str, AfterValidator(_safe_name)]
    address: Annotated[str, AfterValidator(_address)]
    port: Annotated[StrictInt, Field(ge=1, le=65535)] = 22
    user: Annotated[str, AfterValidator(_user)] = "root"
    key: Annotated[Path, BeforeValidator(_key_path)] | None = None
    known_hosts: Annotated[Path, BeforeValidator(_key_path)] = Field(
        default_factory=_default_known_hosts
    )
    arches: Annotated[tuple[Arch, ...], AfterValidator(_listing("arch", '["ppc64el"]'))]
    jobs: Annotated[StrictInt, Field(ge=1)] = 1
    trust_unknown_hosts: StrictBool = False
    # How to start factory there: the remote command line is this + " worker", nothing else.
    command: Annotated[str, AfterValidator(_command)] = "factory"
    # Where the worker keeps its temporary folders and its tree cache, on the host.
    workdir: Annotated[str, AfterValidator(_remote_path)] = "/var/tmp/factory"
    cache: Annotated[str, AfterValidator(_remote_path)] = "/var/cache/factory"


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_REGISTRY = re.compile(rf"(?:{_HOSTNAME.pattern})(?::[0-9]{{1,5}})?")
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
# What an OCI target pushes: the docker archive as an image, a qcow2 as a KubeVirt
# containerDisk (factory.publish.oci).
OCI_FORMATS = ("docker", "qcow2")
# Which keys belong to which kind of [[publish]] target (name, kind, retries, formats: all).
PUBLISH_KEYS = {
    "sftp": frozenset(
        {"address", "port", "user", "path", "key", "known_hosts", "trust_unknown_hosts",
         "password_env"}
    ),
    "oci": frozenset(
        {"registry", "repository", "tls_verify", "username_env", "password_env", "authfile"}
    ),
}  # fmt: skip


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an environment variable name (letters, digits and '_', not "
            'starting with a digit, e.g. "FACTORY_SFTP_PASSWORD"; the secret itself never goes '
            "in the matrix)"
        )
    return value


def _registry(value: str) -> str:
    if "/" in value or not _REGISTRY.fullmatch(value):
        raise ValueError(
            f'{value!r} is not a registry (host[:port], e.g. "127.0.0.1:5000": no scheme, '
            "no path; the path goes in repository)"
        )
    return value


def _repository(value: str) -> str:
    if len(value) > 200 or not _REPOSITORY.fullmatch(value):
        raise ValueError(
            f'{value!r} is not a repository (lowercase path components such as "factory" '
            'or "images/nightly")'
        )
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]


class Publish(_Model):
    """A place a run sends its artifacts to after publishing them in OUT (factory.publish):
    a download server over SFTP, or an OCI registry. Credentials are files or the names of
    environment variables, never secrets; they are checked before any work
    (`check_credentials`), not at load, so `factory plan` works without them."""

    name: Annotated[str, AfterValidator(_safe_name)]
    kind: Literal["sftp", "oci"]
    retries: Annotated[StrictInt, Field(ge=0, le=20)] = 3
    formats: (
        Annotated[
            tuple[Annotated[str, AfterValidator(_format)], ...],
            AfterValidator(_listing("format", '["qcow2", "tar"]')),
        ]
        | None
    ) = None
    password_env: EnvName | None = None
    # sftp: as [[hosts]]
    address: Annotated[str, AfterValidator(_address)] | None = None
    port: Annotated[StrictInt, Field(ge=1, le=65535)] = 22
    user: Annotated[str, AfterValidator(_user)] = "root"
    path: Annotated[str, AfterValidator(_remote_path)] | None = None
    key: Annotated[Path, BeforeValidator(_key_path)] | None = None
    known_hosts: Annotated[Path, BeforeValidator(_key_path)] = Field(
        default_factory=_default_known_hosts
    )
    trust_unknown_hosts: StrictBool = False
    # oci
    registry: Annotated[str, AfterValidator(_registry)] | None = None
    repository: Annotated[str, AfterValidator(_repository)] | None = None
    tls_verify: StrictBool = True
    username_env: EnvName | None = None
    authfile: Annotated[Path, BeforeValidator(_key_path)] | None = None

    @model_validator(mode="after")
    def _kind_keys(self) -> Publish:
        other = "oci" if self.kind == "sftp" else "sftp"
        for key in sorted(PUBLISH_KEYS[other] - PUBLISH_KEYS[self.kind]):
            if key in self.model_fields_set:
                raise _Problem(
                    f"{key} is for {other} targets, this one is kind = {self.kind!r} (remove "
                    f"it; {self.kind} takes: {_one_of(sorted(PUBLISH_KEYS[self.kind]))})",
                    key,
                )
        needed = ("address", "path") if self.kind == "sftp" else ("registry", "repository")
        for key in needed:
            if getattr(self, key) is None:
                raise _Problem(f"a {self.kind} target needs {key} (add {key} = …)", key)
        if self.kind == "sftp" and self.key is not None and self.password_env is not None:
            raise _Problem(
                "give key or password_env, not both (a key is preferred)", "password_env"
            )
        if self.kind == "oci":
            if (self.username_env is None) != (self.password_env is None):
                field = "password_env" if self.password_env is None else "username_env"
                raise _Problem(
                    f"username_env and password_env go together (add {field} = …, or use "
                    "authfile)",
                    field,
                )
            if self.authfile is not None and self.username_env is not None:
                raise _Problem(
                    "authfile and username_env/password_env are two ways to log in (give one, "
                    "not both)",
                    "authfile",
                )
            for i, fmt in enumerate(self.formats or ()):
                if fmt not in OCI_FORMATS:
                    raise _Problem(
                        f"an oci target pushes {_one_of(OCI_FORMATS)}, not {fmt} (docker: the "
                        "image; qcow2: a KubeVirt containerDisk)",
                        "formats",
                        i,
                    )
        return self

    def wanted(self, built: typing.Iterable[str]) -> tuple[str, ...]:
        """The formats this target sends of those the matrix builds."""
        built = tuple(built)
        if self.formats is not None:
            return tuple(f for f in self.formats if f in built)
        return tuple(f for f in built if self.kind == "sftp" or f in OCI_FORMATS)


class Matrix(_Model):
    """A validated matrix file: which images to build, how, and where."""

    path: Path = Path("<inline>")  # set by load_matrix; never from the file
    name: Annotated[str, AfterValidator(_safe_name)]
    arches: Annotated[tuple[Arch, ...], AfterValidator(_listing("arch", '["amd64"]'))]
    distros: Annotated[
        tuple[Distro, ...], AfterValidator(_listing("distro", '["debian/bookworm"]'))
    ]
    formats: Annotated[
        tuple[Annotated[str, AfterValidator(_format)], ...],
        AfterValidator(_listing("format", '["raw", "qcow2"]')),
    ]
    exclude: tuple[Exclude, ...] = ()
    image: Image = Image()
    mirrors: Mirrors = Mirrors()
    sign: Sign | None = None
    hosts: tuple[Host, ...] = ()
    fallback: Literal["none", "local"] = "none"
    publish: tuple[Publish, ...] = ()

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts: tuple[Host, ...]) -> tuple[Host, ...]:
        names = [h.name for h in hosts]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _Problem(
                    f"two hosts are named {name!r} (give each host its own name)", i, "name"
                )
        return hosts

    @model_validator(mode="after")
    def _consistent(self) -> Matrix:
        """The checks that need the whole matrix: excludes and layout against arches and distros."""
        distros = [str(d) for d in self.distros]
        for i, ex in enumerate(self.exclude):
            if ex.arch is not None and ex.arch not in self.arches:
                raise _Problem(
                    f"arch {ex.arch!r} is not in the matrix, so this excludes nothing "
                    f"(matrix arches: {_one_of(self.arches)})",
                    "exclude",
                    i,
                    "arch",
                )
            if ex.distro is not None and ex.distro not in distros:
                raise _Problem(
                    f"distro {ex.distro!r} is not in the matrix, so this excludes nothing "
                    f"(matrix distros: {_one_of(distros)})",
                    "exclude",
                    i,
                    "distro",
                )
        for family in dict.fromkeys(d.family for d in self.distros):
            for i, package in enumerate(self.image.packages):
                problem = families.get(family).package_problem(package)
                if problem is not None:
                    raise _Problem(problem, "image", "packages", i)
        cells = self.cells()
        if not cells:
            raise _Problem(
                "the excludes remove every cell (remove an exclude, or add arches or distros)",
                "exclude",
            )
        arches = list(dict.fromkeys(c.arch for c in cells))
        layouts = self.image.layout
        for i, layout in enumerate(layouts):
            fits = [a for a in ARCHES if layout in fitting(a)]
            unfit = [a for a in arches if layout != "auto" and a not in fits]
            # One layout must fit every arch; of several, each must fit one arch at least.
            if unfit and (len(layouts) == 1 or len(unfit) == len(arches)):
                arch = unfit[0]
                raise _Problem(
                    f"layout {layout!r} does not fit arch {arch} ({layout} is for: "
                    f"{_one_of(fits) or 'no arch'}; {arch} takes: {_one_of(fitting(arch))}; "
                    'or use "auto")',
                    "image",
                    "layout",
                    *([i] if len(layouts) > 1 else []),
                )
        self._partitions_fit(arches)
        self._publish_fits()
        for arch in arches:
            if not self.layouts_for(arch):
                raise _Problem(
                    f"no layout of {_one_of(layouts)} fits arch {arch} (it takes: "
                    f'{_one_of(fitting(arch))}; or add "auto")',
                    "image",
                    "layout",
                )
        return self

    def _partitions_fit(self, arches: list[str]) -> None:
        """The user's partitions against each layout: a dos label's four primary slots, and
        a /boot (or root, without one) that every boot method of the disk can read."""
        parts = self.image.partitions
        if not parts:
            return
        boot_i, boot = next(
            ((i, p) for i, p in enumerate(parts) if p.mountpoint == "/boot"),
            next((i, p) for i, p in enumerate(parts) if p.mountpoint == "/"),
        )
        for arch in arches:
            for layout in self.layouts_for(arch):
                total = len(layout.partitions) - 1 + len(parts)
                if layout.label == "dos" and total > 4:
                    raise _Problem(
                        f"layout {layout.name} is a dos label: 4 partitions at most, these make "
                        f"{total} (use fewer partitions, or the gpt-efi layout)",
                        "image", "partitions",
                    )  # fmt: skip
                for method in layout.boot_methods(arch):
                    if boot.filesystem not in BOOT_READS[method]:
                        readable = ", ".join(sorted(BOOT_READS[method]))
                        raise _Problem(
                            f"{boot.mountpoint} holds the kernel, and the {method} boot of "
                            f"{arch} ({layout.name}) cannot read {boot.filesystem} (use one "
                            f"of {readable} for {boot.mountpoint})",
                            "image", "partitions", boot_i, "filesystem",
                        )  # fmt: skip

    def _publish_fits(self) -> None:
        """[[publish]] against the matrix: names unique, formats that the matrix builds."""
        seen: set[str] = set()
        for i, target in enumerate(self.publish):
            if target.name in seen:
                raise _Problem(
                    f"two publish targets are named {target.name!r} (give each its own name)",
                    "publish", i, "name",
                )  # fmt: skip
            seen.add(target.name)
            for j, fmt in enumerate(target.formats or ()):
                if fmt not in self.formats:
                    raise _Problem(
                        f"the matrix does not build {fmt} (add it to formats, or remove it "
                        f"here; the matrix builds: {_one_of(self.formats)})",
                        "publish", i, "formats", j,
                    )  # fmt: skip
            if not target.wanted(self.formats):
                raise _Problem(
                    f"the matrix builds none of the formats an {target.kind} target takes "
                    f"({_one_of(OCI_FORMATS)}; add one to formats)",
                    "publish", i, "kind",
                )  # fmt: skip

    def cells(self) -> tuple[Cell, ...]:
        """Every (distro, arch) to build, distro-major in file order, minus the excludes."""
        every = (Cell(d, a) for d in self.distros for a in self.arches)
        return tuple(c for c in every if not any(ex.matches(c) for ex in self.exclude))

    def layouts_for(self, arch: str) -> tuple[Layout, ...]:
        """The disks a cell of `arch` gets: each listed layout that fits it ("auto": the
        arch's default), once each, in the order given."""
        fits = (n for n in self.image.layout if n == "auto" or n in fitting(arch))
        return tuple(dict.fromkeys(resolve(n, arch) for n in fits))


# --- loading ---------------------------------------------------------------------------------


_FILE_HINT = "give a matrix .toml file, e.g. matrix/default.toml"


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file; every problem with it is a MatrixError, nothing else."""
    file = Path(path)

    def fail(line: int, field: str, message: str) -> MatrixError:
        return MatrixError(path, line, field, message)

    try:
        raw = file.read_bytes()
        absolute = file.absolute()
    except IsADirectoryError:
        raise fail(1, "file", f"is a folder ({_FILE_HINT})") from None
    except FileNotFoundError:
        raise fail(1, "file", f"no such file ({_FILE_HINT})") from None
    except (OSError, ValueError) as e:  # permissions, name too long, NUL in the name…
        what = getattr(e, "strerror", None) or e
        raise fail(1, "file", f"cannot read it: {what} ({_FILE_HINT}, readable)") from None
    try:
        if b"\0" in raw:
            raise UnicodeError
        text = raw.decode("utf-8")
    except UnicodeError:
        raise fail(1, "file", "not a text file (a matrix is UTF-8 TOML text)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        line = int(m.group(1)) if m else text.count("\n") + 1
        what = re.sub(r"\s*\(at .*?\)$", "", str(e))
        raise fail(line, "toml", f"{what} (see https://toml.io for the syntax)") from None
    except RecursionError:
        raise fail(1, "toml", "nested too deeply (a matrix nests tables two deep)") from None

    if "path" in data:
        raise fail(_line_of(text, ("path",)), "path", _unknown_key(Matrix, "path"))
    try:
        return Matrix.model_validate(
            {**data, "path": absolute}, context={"toml": True, "base": absolute.parent}
        )
    except ValidationError as e:
        line, loc, message = _first_problem(e, text)
        raise fail(line, _dotted(loc), message) from None


_NOT_IN_FILE = {"path"}

# What to say instead of pydantic's words for the type errors a TOML author can make.
_EXPECTED = {
    "string_type": "a string in quotes",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "tuple_type": 'an array, e.g. ["…"]',
    "list_type": 'an array, e.g. ["…"]',
    "model_type": "a table, e.g. [section] with key = value lines",
    "model_attributes_type": "a table, e.g. [section] with key = value lines",
    "dict_type": "a table",
    "path_type": "a path in quotes",
}
_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _first_problem(error: ValidationError, text: str) -> tuple[int, Loc, str]:
    """The one error to report: the earliest in the file, but unknown keys first (they explain
    the rest: `arch` is why `arches` is missing) and missing keys last."""
    rank = {"extra_forbidden": 0, "missing": 2}
    errors = error.errors()
    best = min(rank.get(e["type"], 1) for e in errors)
    found = []
    for details in [e for e in errors if rank.get(e["type"], 1) == best][:50]:  # bound the work
        loc, message = _explain(details)
        found.append((_line_of(text, loc), loc, message))
    return min(found, key=lambda f: f[0])


def _explain(details: ErrorDetails) -> tuple[Loc, str]:
    """Pydantic's error as (where, "what is wrong (what would be right)") in TOML words."""
    loc: Loc = tuple(details["loc"])
    kind, ctx, value = details["type"], details.get("ctx") or {}, details.get("input")
    problem = ctx.get("error")
    if isinstance(problem, ValueError):
        return loc + getattr(problem, "loc", ()), str(problem)
    if kind == "extra_forbidden":
        return loc, _unknown_key(_model_at(loc[:-1]), str(loc[-1]))
    if kind == "missing":
        return loc, f"required key is missing (add {loc[-1]} = …)"
    if kind == "literal_error":
        return loc, f"unknown value {_short(value)} (valid: {ctx.get('expected')})"
    if kind in _EXPECTED:
        return loc, f"got {_describe(value)} (expected {_EXPECTED[kind]})"
    if kind in _BOUNDS:
        words, limit = _BOUNDS[kind]
        return loc, f"got {_describe(value)} (expected {words} {ctx.get(limit)})"
    wanted = re.sub(r"^Input ", "", details["msg"])
    return loc, f"got {_describe(value)} ({wanted})"


def _model_at(loc: Loc) -> type[BaseModel]:
    """The model class that validates the table at `loc` (to list its keys)."""
    model: type[BaseModel] = Matrix
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = _submodel(field.annotation) or model
    return model


def _submodel(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _submodel(arg):
            return found
    return None


def _unknown_key(model: type[BaseModel], key: str) -> str:
    valid = [k for k in model.model_fields if k not in _NOT_IN_FILE]
    close = difflib.get_close_matches(key, valid, n=1)
    close = close or [k for k in valid if len(key) >= 3 and k.startswith(key)][:1]
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {_one_of(valid)}"
    return f"unknown key {key!r} ({hint})"


def _dotted(loc: Loc) -> str:
    """("hosts", 1, "jobs") -> "hosts[1].jobs", the way a user would point at it."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            out += f".{key}" if out else key
    return out or "matrix"


def _describe(value: object) -> str:
    kinds = {str: "the string", bool: "", int: "the integer", float: "the number"}
    kinds |= {list: "the array", dict: "the table"}
    for kind, words in kinds.items():
        if isinstance(value, kind):
            return f"{words} {_short(value)}".strip() if kind is not bool else str(value).lower()
    return f"a {type(value).__name__} value"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- where in the file ------------------------------------------------------------------------

_BARE_OR_QUOTED = r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'"""
_KEY_PATH = rf"(?:{_BARE_OR_QUOTED})(?:\s*\.\s*(?:{_BARE_OR_QUOTED}))*"
_HEADER_LINE = re.compile(rf"\s*(\[\[?)\s*({_KEY_PATH})\s*\]\]?\s*(?:#.*)?")
_KEY_LINE = re.compile(rf"\s*({_KEY_PATH})\s*=")


def _parts(key_path: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in re.findall(_BARE_OR_QUOTED, key_path))


def _line_of(text: str, loc: Loc) -> int:
    """The 1-based line of the value at `loc`, found again in the raw text.

    tomllib keeps no positions, so this re-reads the lines: each `[table]` header names a section
    and each `[[array]]` header its next element (the n-th `[[hosts]]` is hosts[n-1]); each
    `key =` line (dotted keys too) names a value in the current section. The longest of these
    names that starts `loc` wins; the rest of `loc` (an index into an array, a key of an inline
    table) is found by stepping through the value's characters. Whatever cannot be found falls
    back to the nearest thing that was: the key, the section header, else line 1.
    """
    section: Loc = ()
    counts: dict[Loc, int] = {}
    places: dict[Loc, tuple[int, bool]] = {}  # name -> (offset of header or value, is a value)
    offset = 0
    for line in text.split("\n"):
        if header := _HEADER_LINE.fullmatch(line):
            section = _parts(header.group(2))
            if header.group(1) == "[[":
                counts[section] = counts.get(section, -1) + 1
                section += (counts[section],)
            places.setdefault(section, (offset, False))
        elif key := _KEY_LINE.match(line):
            places.setdefault(section + _parts(key.group(1)), (offset + key.end(), True))
        offset += len(line) + 1
    for n in range(len(loc), 0, -1):
        if loc[:n] in places:
            pos, is_value = places[loc[:n]]
            pos = _step_into(text, pos, loc[n:]) if is_value else pos
            return text.count("\n", 0, pos) + 1
    return 1


def _step_into(text: str, pos: int, rest: Loc) -> int:
    """From a value at `pos`, follow indexes into arrays and keys into inline tables."""
    for part in rest:
        pos = _skip_blank(text, pos)
        opener = text[pos : pos + 1]
        if isinstance(part, int) and opener == "[":
            found = _array_item(text, pos + 1, part)
        elif isinstance(part, str) and opener == "{":
            found = _inline_value(text, pos + 1, part)
        else:
            found = None
        if found is None:
            break
        pos = found
    return pos


def _array_item(text: str, pos: int, index: int) -> int | None:
    for _ in range(index):
        pos = _skip_blank(text, _skip_value(text, _skip_blank(text, pos)))
        if text[pos : pos + 1] != ",":
            return None
        pos += 1
    pos = _skip_blank(text, pos)
    return pos if text[pos : pos + 1] not in ("]", "") else None


def _inline_value(text: str, pos: int, key: str) -> int | None:
    while m := _KEY_LINE.match(text, pos):
        if _parts(m.group(1)) == (key,):
            return m.end()
        pos = _skip_blank(text, _skip_value(text, _skip_blank(text, m.end())))
        if text[pos : pos + 1] != ",":
            return None
        pos += 1
    return None


_BLANK = re.compile(r"(?:\s+|#[^\n]*)*")


def _skip_blank(text: str, pos: int) -> int:
    """Past whitespace, newlines and comments."""
    m = _BLANK.match(text, pos)
    return m.end() if m else pos


def _skip_value(text: str, pos: int) -> int:
    """Past one value: a string, a (nested) array or inline table, or a bare scalar."""
    depth = 0
    while pos < len(text):
        c = text[pos]
        if c in "\"'":
            quote = text[pos : pos + 3] if text[pos : pos + 3] in ('"""', "'''") else c
            pos += len(quote)
            while pos < len(text) and not text.startswith(quote, pos):
                pos += 2 if text[pos] == "\\" and quote[0] == '"' else 1
            pos += len(quote)
        elif c == "#":
            end = text.find("\n", pos)
            pos = len(text) if end < 0 else end
        elif c in "[{":
            depth, pos = depth + 1, pos + 1
        elif c in "]}":
            if depth == 0:
                return pos
            depth, pos = depth - 1, pos + 1
            if depth == 0:
                return pos
        elif depth == 0 and c in ",\n":
            return pos
        else:
            pos += 1
    return pos


def check_credentials(
    matrix: Matrix, targets: typing.Iterable[str] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> None:
    """Before any work: every credential a target of `targets` (default: all) names is
    there: its environment variables set, its key or auth file readable. A MatrixError
    (one line, FILE:LINE: publish[i].field: problem (fix)) for the first that is not."""
    env = os.environ if environ is None else environ
    names = None if targets is None else set(targets)
    try:
        text = matrix.path.read_text(encoding="utf-8")
    except (OSError, UnicodeError):
        text = ""
    for i, target in enumerate(matrix.publish):
        if names is not None and target.name not in names:
            continue
        for field in ("username_env", "password_env"):
            var = getattr(target, field)
            if var is not None and not env.get(var):
                raise MatrixError(
                    matrix.path, _line_of(text, ("publish", i, field)), f"publish[{i}].{field}",
                    f"the environment variable {var} is not set (export {var}=… before the "
                    f"run, e.g. from your CI's secret store)",
                )  # fmt: skip
        for field in ("key", "authfile"):
            path = getattr(target, field)
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise MatrixError(
                    matrix.path, _line_of(text, ("publish", i, field)), f"publish[{i}].{field}",
                    f"{path}: {exc.strerror.lower() if exc.strerror else exc} (give a "
                    f"readable {'private key' if field == 'key' else 'containers auth.json'} "
                    "file)",
                ) from None  # fmt: skip


__all__ = [
    "FAMILIES",
    "Cell",
    "Distro",
    "Exclude",
    "Host",
    "Image",
    "Matrix",
    "MatrixError",
    "Mirrors",
    "Publish",
    "UserPartition",
    "check_credentials",
    "load_matrix",
    "parse_size",
]
