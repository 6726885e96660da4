"""matrix.toml: the valid examples load, and every bad input is one `PATH:LINE: field: …` error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory.layouts import LAYOUTS
from factory.spec import (
    Distro,
    Exclude,
    Image,
    Matrix,
    MatrixError,
    _line_of,
    load_matrix,
    parse_size,
)

GiB = 1024**3
MiB = 1024**2
REPO = Path(__file__).resolve().parents[2]

FULL = """\
name = "nightly"                                  # names the output folder; [A-Za-z0-9._-] only
arches = ["amd64", "ppc64el"]                     # Debian architecture names
distros = ["debian/bookworm", "debian/trixie"]    # family/release
formats = ["raw", "qcow2", "vhd", "vmdk", "vdi", "tar", "tgz", "squashfs", "aci", "docker"]
exclude = [{ arch = "ppc64el", distro = "debian/trixie" }]

[image]
packages = ["openssh-server"]   # on top of what a bootable image needs
size = "auto"                   # or "3GiB"
extra_size = "256MiB"           # headroom when size is auto
filesystem = "ext4"
layout = "auto"                 # auto: mbr on amd64, ppc-prep on ppc64el; or gpt-efi
hooks = []                      # element folders with finalise.d/ and cleanup.d/
qcow2_compression = "zlib"      # zlib | zstd | none

[mirrors]
debian = "host"                 # "host": the apt sources of the machine that builds; or a URL

[[hosts]]                       # optional remote build hosts
name = "power9-a"
address = "192.0.2.10"
port = 22
user = "build"
key = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"
arches = ["ppc64el"]
jobs = 2
"""

# Lines 1-4 of most bad examples below: a valid matrix to spoil.
HEAD = [
    'name = "t"',
    'arches = ["amd64"]',
    'distros = ["debian/bookworm"]',
    'formats = ["raw"]',
]
HOST = ["[[hosts]]", 'name = "h"', 'address = "192.0.2.1"', 'arches = ["amd64"]']


def write(tmp_path: Path, text: str | bytes, name: str = "m.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(path: Path | str) -> MatrixError:
    """Load a bad matrix; check the one-line `PATH:LINE: field: wrong (right)` shape."""
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    err = caught.value
    text = str(err)
    assert "\n" not in text
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+: {re.escape(err.field)}: .+\(.+\)", text)
    return err


# --- valid input ------------------------------------------------------------------------------


def test_full_example_loads(tmp_path: Path) -> None:
    m = load_matrix(write(tmp_path, FULL))
    assert m.path == tmp_path / "m.toml"
    assert m.name == "nightly"
    assert m.arches == ("amd64", "ppc64el")
    assert m.distros == (
        Distro(family="debian", release="bookworm"),
        Distro.model_validate("debian/trixie"),
    )
    assert len(m.formats) == 10
    assert m.exclude == (Exclude(arch="ppc64el", distro="debian/trixie"),)
    assert [c.id for c in m.cells()] == [
        "debian-bookworm-amd64",
        "debian-bookworm-ppc64el",
        "debian-trixie-amd64",
    ]
    assert m.image.packages == ("openssh-server",)
    assert m.image.size is None
    assert m.image.extra_size == 256 * MiB
    assert m.mirrors.debian == "host"
    (host,) = m.hosts
    assert (host.name, host.address, host.port, host.user, host.jobs) == (
        "power9-a",
        "192.0.2.10",
        22,
        "build",
        2,
    )
    assert host.key == Path.home() / ".ssh/id_ed25519"
    assert host.known_hosts == Path.home() / ".ssh/known_hosts"
    assert host.arches == ("ppc64el",)
    assert m.layouts_for("amd64") == (LAYOUTS["mbr"],)
    assert m.layouts_for("ppc64el") == (LAYOUTS["ppc-prep"],)


def test_distro_names() -> None:
    d = Distro.model_validate("debian/bookworm")
    assert (d.id, str(d)) == ("debian-bookworm", "debian/bookworm")
    assert Distro.model_validate("debian/excalibur").release == "excalibur"  # future releases


def test_cells_order_and_excludes(tmp_path: Path) -> None:
    text = "\n".join(
        [
            'name = "t"',
            'arches = ["ppc64el", "amd64"]',
            'distros = ["debian/trixie", "debian/bookworm", "debian/sid"]',
            'formats = ["tar"]',
            'exclude = [{ distro = "debian/sid" }, { arch = "amd64", distro = "debian/trixie" }]',
        ]
    )
    m = load_matrix(write(tmp_path, text))
    assert [c.id for c in m.cells()] == [
        "debian-trixie-ppc64el",
        "debian-bookworm-ppc64el",
        "debian-bookworm-amd64",
    ]
    only_arch = m.model_copy(update={"exclude": (Exclude(arch="ppc64el"),)})
    assert [c.arch for c in only_arch.cells()] == ["amd64"] * 3


def test_sizes_hooks_and_paths_resolve(tmp_path: Path) -> None:
    (tmp_path / "hooks" / "a").mkdir(parents=True)
    text = "\n".join(
        [
            *HEAD,
            "[image]",
            'size = "1.5GiB"',
            'extra_size = "64M"',
            'hooks = ["hooks/a", "./hooks"]',
            'layout = "gpt-efi"',
            *HOST,
            'key = "keys/id"',
        ]
    )
    m = load_matrix(write(tmp_path, text))
    assert (m.image.size, m.image.extra_size) == (3 * GiB // 2, 64 * MiB)
    assert m.image.hooks == (tmp_path / "hooks/a", tmp_path / "hooks")
    assert m.hosts[0].key == tmp_path / "keys/id"
    assert m.layouts_for("amd64") == (LAYOUTS["gpt-efi"],)


def test_models_build_in_code() -> None:
    """Other modules and tests build matrices directly: bytes are fine there."""
    m = Matrix(
        name="x",
        arches=("amd64",),
        distros=(Distro(family="debian", release="bookworm"),),
        formats=("raw",),
        image=Image(size=2 * GiB),
    )
    assert m.image.size == 2 * GiB
    assert [c.id for c in m.cells()] == ["debian-bookworm-amd64"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "matrix").glob("*.toml")))
def test_shipped_matrices_load(name: str) -> None:
    m = load_matrix(REPO / "matrix" / name)
    assert m.name == name.removesuffix(".toml")
    assert m.cells()


def test_shipped_matrices_say_what_they_should() -> None:
    default = load_matrix(REPO / "matrix/default.toml")
    assert default.formats == ("raw", "qcow2", "vhd", "tar")
    assert [c.id for c in default.cells()] == ["debian-bookworm-amd64"]
    nightly = load_matrix(REPO / "matrix/nightly.toml")
    assert len(nightly.formats) == 10
    assert "debian-trixie-ppc64el" not in [c.id for c in nightly.cells()]
    farm = load_matrix(REPO / "matrix/ppc-farm.toml")
    assert farm.fallback == "local"
    assert (farm.hosts[0].address, farm.hosts[0].port, farm.hosts[0].jobs) == ("127.0.0.1", 2222, 2)
    layouts = load_matrix(REPO / "matrix/layouts.toml")
    assert [lay.name for lay in layouts.layouts_for("amd64")] == ["mbr", "gpt-efi"]
    assert [lay.name for lay in layouts.layouts_for("ppc64el")] == ["ppc-prep"]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("3GiB", 3 * GiB),
        ("256MiB", 256 * MiB),
        ("2G", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("512M", 512 * MiB),
        ("1048576", 1048576),
        ("4k", 4096),
        ("1GB", 10**9),
        (" 2 TiB ", 2 * 1024**4),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "auto", "3 gigs", "1e3", "-1G", "0", "0.1B", "G", "1.G", "nan"]
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"\(.+\)"):
        parse_size(text)


# --- bad input: (TOML lines, field, line, part of the message) --------------------------------

BAD: dict[str, tuple[list[str], str, int, str]] = {
    # TOML itself
    "syntax": ([*HEAD, "", "[image", 'size = "1G"'], "toml", 6, "toml.io"),
    "syntax-end": ([*HEAD, 'name = "x'], "toml", 5, "toml.io"),
    "duplicate-key": ([*HEAD, 'name = "u"'], "toml", 5, "overwrite"),
    # unknown keys
    "unknown-top": (
        ['name = "t"', 'arch = ["amd64"]', *HEAD[2:]],
        "arch",
        2,
        "did you mean 'arches'?",
    ),
    "unknown-top-far": ([*HEAD, "colour = 3"], "colour", 5, "valid keys: name, arches"),
    "unknown-path": ([*HEAD, 'path = "/x"'], "path", 5, "unknown key 'path'"),
    "unknown-image": (
        [*HEAD, "[image]", "packages = []", 'sise = "3G"'],
        "image.sise",
        7,
        "did you mean 'size'?",
    ),
    "unknown-image-dotted": (
        [*HEAD, 'image.qcow2 = "zstd"'],
        "image.qcow2",
        5,
        "did you mean 'qcow2_compression'?",
    ),
    "unknown-table": ([*HEAD, "[imag]", "size = 1"], "imag", 5, "did you mean 'image'?"),
    "unknown-mirrors": (
        [*HEAD, "[mirrors]", "securty = false"],
        "mirrors.securty",
        6,
        "did you mean 'security'?",
    ),
    "unknown-host": (
        [*HEAD, *HOST, "[[hosts]]", 'name = "i"', 'adress = "x"'],
        "hosts[1].adress",
        11,
        "did you mean 'address'?",
    ),
    "unknown-exclude": (
        [*HEAD, "exclude = [", '  { arch = "amd64" },', '  { dstro = "debian/bookworm" },', "]"],
        "exclude[1].dstro",
        7,
        "did you mean 'distro'?",
    ),
    # unknown values
    "arch": (
        ['name = "t"', 'arches = ["amd64", "riscv64"]', *HEAD[2:]],
        "arches[1]",
        2,
        "valid: amd64, arm64, ppc64el",
    ),
    "family": (
        [*HEAD[:2], 'distros = ["ubuntu/noble"]', HEAD[3]],
        "distros[0]",
        3,
        "valid: debian",
    ),
    "format": (
        [*HEAD[:3], "formats = [", '  "raw",', '  "qcw2",', "]"],
        "formats[1]",
        6,
        "valid: raw, qcow2, vhd",
    ),
    "layout": (
        [*HEAD, "[image]", 'layout = "msdos"'],
        "image.layout",
        6,
        "valid: auto, mbr, ppc-prep, gpt-efi",
    ),
    "qcow2-compression": (
        [*HEAD, "[image]", 'qcow2_compression = "lz4"'],
        "image.qcow2_compression",
        6,
        "'zlib', 'zstd' or 'none'",
    ),
    "filesystem": (
        [*HEAD, "[image]", 'filesystem = "xfs"'],
        "image.filesystem",
        6,
        "valid: 'ext4'",
    ),
    "fallback": (['fallback = "remote"', *HEAD], "fallback", 1, "'none' or 'local'"),
    # malformed distros
    "distro-no-slash": (
        [*HEAD[:2], 'distros = ["debian-bookworm"]', HEAD[3]],
        "distros[0]",
        3,
        "family/release",
    ),
    "distro-release": (
        [*HEAD[:2], 'distros = ["debian/Bookworm!"]', HEAD[3]],
        "distros[0]",
        3,
        "malformed release",
    ),
    "distro-empty-release": (
        [*HEAD[:2], 'distros = ["debian/"]', HEAD[3]],
        "distros[0]",
        3,
        "malformed release",
    ),
    # empty lists, duplicates
    "empty-arches": (['name = "t"', "arches = []", *HEAD[2:]], "arches", 2, "empty"),
    "empty-distros": ([*HEAD[:2], "distros = []", HEAD[3]], "distros", 3, "empty"),
    "empty-formats": ([*HEAD[:3], "formats = []"], "formats", 4, "empty"),
    "duplicate-format": (
        [*HEAD[:3], 'formats = ["raw", "tar", "raw"]'],
        "formats[2]",
        4,
        "'raw' is listed twice",
    ),
    "duplicate-distro": (
        [*HEAD[:2], 'distros = ["debian/sid", "debian/sid"]', HEAD[3]],
        "distros[1]",
        3,
        "listed twice",
    ),
    "duplicate-package": (
        [*HEAD, "[image]", 'packages = ["vim", "vim"]'],
        "image.packages[1]",
        6,
        "listed twice",
    ),
    # sizes
    "size-unparsable": (
        [*HEAD, "[image]", 'size = "3 gigs"'],
        "image.size",
        6,
        "cannot read '3 gigs'",
    ),
    "size-zero": ([*HEAD, "[image]", 'size = "0GiB"'], "image.size", 6, "not positive"),
    "size-negative": (
        [*HEAD, "[image]", 'extra_size = "-1M"'],
        "image.extra_size",
        6,
        "not positive",
    ),
    "size-number": (
        [*HEAD, "[image]", "size = 3"],
        "image.size",
        6,
        'no unit (write a string such as "3GiB"',
    ),
    "size-float": ([*HEAD, "[image]", "extra_size = 0.5"], "image.extra_size", 6, "no unit"),
    "extra-size-auto": (
        [*HEAD, "[image]", 'extra_size = "auto"'],
        "image.extra_size",
        6,
        "cannot read 'auto'",
    ),
    "size-inline-table": (
        [*HEAD, 'image = { layout = "auto", size = "big" }'],
        "image.size",
        5,
        "cannot read 'big'",
    ),
    "boot-timeout": (
        [*HEAD, "[image]", "boot_timeout = 0"],
        "image.boot_timeout",
        6,
        "at least 1",
    ),
    # layout against arches
    "layout-misfit": (
        [
            'name = "t"',
            'arches = ["amd64", "ppc64el"]',
            *HEAD[2:],
            "[image]",
            'layout = "ppc-prep"',
        ],
        "image.layout",
        6,
        "ppc-prep is for: ppc64el",
    ),
    "layouts-one-fits-no-arch": (
        [
            'name = "t"',
            'arches = ["amd64"]',
            *HEAD[2:],
            "[image]",
            'layout = ["mbr", "ppc-prep"]',
        ],
        "image.layout[1]",
        6,
        "ppc-prep is for: ppc64el",
    ),
    "layouts-none-for-an-arch": (
        [
            'name = "t"',
            'arches = ["amd64", "ppc64el"]',
            *HEAD[2:],
            "[image]",
            'layout = ["mbr", "gpt-efi"]',
        ],
        "image.layout",
        6,
        "no layout of mbr, gpt-efi fits arch ppc64el",
    ),
    "layouts-twice": (
        [*HEAD, "[image]", 'layout = ["mbr", "mbr"]'],
        "image.layout[1]",
        6,
        "listed twice",
    ),
    "layouts-empty": (
        [*HEAD, "[image]", "layout = []"],
        "image.layout",
        6,
        "the list is empty",
    ),
    # excludes
    "exclude-arch-absent": (
        [
            'name = "t"',
            'arches = ["amd64", "ppc64el"]',
            *HEAD[2:],
            'exclude = [{ arch = "ppc64el" }, { arch = "amd64", distro = "debian/bookworm" }]',
        ],
        "exclude",
        5,
        "remove every cell",
    ),
    "exclude-names-nothing": (
        [*HEAD, "exclude = [", '  { arch = "ppc64el" },', "]"],
        "exclude[0].arch",
        6,
        "not in the matrix",
    ),
    "exclude-distro-absent": (
        [*HEAD, 'exclude = [{ distro = "debian/trixie" }]'],
        "exclude[0].distro",
        5,
        "matrix distros: debian/bookworm",
    ),
    "exclude-unknown-arch": (
        [*HEAD, 'exclude = [{ arch = "s390x" }]'],
        "exclude[0].arch",
        5,
        "unknown arch 's390x'",
    ),
    "exclude-empty": (
        [*HEAD, "[[exclude]]", "[[exclude]]", 'arch = "amd64"'],
        "exclude[0]",
        5,
        "excludes nothing",
    ),
    "exclude-everything": (
        [*HEAD, 'exclude = [{ arch = "amd64" }]'],
        "exclude",
        5,
        "remove every cell",
    ),
    # hooks
    "hook-missing": (
        [*HEAD, "[image]", 'hooks = ["hooks", "nope"]'],
        "image.hooks[1]",
        6,
        "does not exist",
    ),
    "hook-file": (
        [*HEAD, "[image]", 'hooks = ["afile"]'],
        "image.hooks[0]",
        6,
        "is not a folder",
    ),
    "hook-shell": (
        [*HEAD, "[image]", 'hooks = ["hooks;reboot"]'],
        "image.hooks[0]",
        6,
        "contains ';'",
    ),
    "hook-space": (
        [*HEAD, "[image]", 'hooks = ["my hooks"]'],
        "image.hooks[0]",
        6,
        "contains ' '",
    ),
    "hook-loop": (
        [*HEAD, "[image]", 'hooks = ["loop"]'],
        "image.hooks[0]",
        6,
        "cannot be used",
    ),
    "hook-name-too-long": (
        [*HEAD, "[image]", f'hooks = ["{"h" * 300}"]'],
        "image.hooks[0]",
        6,
        "cannot be used",
    ),
    # hosts
    "host-key-tilde": (
        [*HEAD, *HOST, 'key = "~nosuchuser-x/id"'],
        "hosts[0].key",
        9,
        "cannot expand",
    ),
    "host-no-address": (
        [*HEAD, "[[hosts]]", 'name = "h"', 'arches = ["amd64"]'],
        "hosts[0].address",
        5,
        "required key is missing",
    ),
    "host-jobs": ([*HEAD, *HOST, "jobs = 0"], "hosts[0].jobs", 9, "at least 1"),
    "host-port": ([*HEAD, *HOST, "port = 65536"], "hosts[0].port", 9, "at most 65535"),
    "host-port-string": (
        [*HEAD, *HOST, 'port = "22"'],
        "hosts[0].port",
        9,
        "expected an integer",
    ),
    "host-arches-empty": ([*HEAD, *HOST[:3], "arches = []"], "hosts[0].arches", 8, "empty"),
    "host-arches-unknown": (
        [*HEAD, *HOST[:3], 'arches = ["sparc"]'],
        "hosts[0].arches[0]",
        8,
        "unknown arch 'sparc'",
    ),
    "host-same-name": ([*HEAD, *HOST, *HOST], "hosts[1].name", 10, "two hosts are named 'h'"),
    "host-address-shell": (
        [*HEAD, *HOST[:2], 'address = "h; rm -rf /"', HOST[3]],
        "hosts[0].address",
        7,
        "not a hostname or IP",
    ),
    "host-address-user": (
        [*HEAD, *HOST[:2], 'address = "root@h"', HOST[3]],
        "hosts[0].address",
        7,
        "not a hostname or IP",
    ),
    "host-user": ([*HEAD, *HOST, 'user = "$(id)"'], "hosts[0].user", 9, "unsafe user name"),
    "host-name": (
        [*HEAD, "[[hosts]]", 'name = "../x"', *HOST[2:]],
        "hosts[0].name",
        6,
        "unsafe name",
    ),
    # names and values that could smuggle shell or path syntax
    "name-shell": (['name = "a;b"', *HEAD[1:]], "name", 1, "unsafe name 'a;b'"),
    "name-dotdot": (['name = ".."', *HEAD[1:]], "name", 1, "not '.' or '..'"),
    "name-slash": (['name = "a/b"', *HEAD[1:]], "name", 1, "unsafe name"),
    "name-space": (['name = "a b"', *HEAD[1:]], "name", 1, "unsafe name"),
    "name-newline": (['name = "a\\nb"', *HEAD[1:]], "name", 1, "unsafe name"),
    "name-dash": (['name = "-rf"', *HEAD[1:]], "name", 1, "not starting with '-'"),
    "name-long": ([f'name = "{"n" * 65}"', *HEAD[1:]], "name", 1, "1-64"),
    "package-option": (
        [*HEAD, "[image]", 'packages = ["vim", "-oAPT::Get=x"]'],
        "image.packages[1]",
        6,
        "is not a package name",
    ),
    "package-shell": (
        [*HEAD, "[image]", 'packages = ["vim;reboot"]'],
        "image.packages[0]",
        6,
        "is not a package name",
    ),
    "package-quote": (
        [*HEAD, "[image]", 'packages = ["vim\'"]'],
        "image.packages[0]",
        6,
        "is not a package name",
    ),
    "package-not-debian": (
        [*HEAD, "[image]", 'packages = ["vim", "NetworkManager"]'],
        "image.packages[1]",
        6,
        "'NetworkManager' is not a Debian package name",
    ),
    "qemu-img-option-name": (
        [*HEAD, "[image.qemu_img_options]", 'qcow2 = { compt = "0.10" }'],
        "image.qemu_img_options.qcow2.compt",
        6,
        "valid: compat, cluster_size",
    ),
    "qemu-img-option-value": (
        [*HEAD, "[image.qemu_img_options]", 'vdi = { static = "yes" }'],
        "image.qemu_img_options.vdi.static",
        6,
        "(valid: on, off)",
    ),
    "qemu-img-option-format": (
        [*HEAD, "[image.qemu_img_options]", 'tar = { x = "1" }'],
        "image.qemu_img_options.tar",
        6,
        "takes no qemu-img options",
    ),
    "qemu-img-compat-zstd": (
        [*HEAD, "[image]", 'qcow2_compression = "zstd"', "[image.qemu_img_options]",
         'qcow2 = { compat = "0.10" }'],
        "image.qemu_img_options.qcow2.compat",
        8,
        "compat 0.10 has no zstd compression",
    ),
    "docker-tag": (
        [*HEAD, "[image]", 'docker_tag = "x`id`"'],
        "image.docker_tag",
        6,
        "not a docker image reference",
    ),
    "mirror-scheme": (
        [*HEAD, "[mirrors]", 'debian = "ftp://x/debian"'],
        "mirrors.debian",
        6,
        "http://, https:// or file://",
    ),
    "mirror-quote": (
        [*HEAD, "[mirrors]", "debian = \"http://x/'$(id)'\""],
        "mirrors.debian",
        6,
        "not a mirror",
    ),
    # wrong types
    "type-arches-string": (
        ['name = "t"', 'arches = "amd64"', *HEAD[2:]],
        "arches",
        2,
        "got the string 'amd64' (expected an array",
    ),
    "type-name-number": (
        ["name = 3", *HEAD[1:]],
        "name",
        1,
        "got the integer 3 (expected a string",
    ),
    "type-arch-number": (
        ['name = "t"', "arches = [64]", *HEAD[2:]],
        "arches[0]",
        2,
        "expected a string",
    ),
    "type-image-number": ([*HEAD, "image = 3"], "image", 5, "expected a table"),
    "type-bool": (
        [*HEAD, "[mirrors]", 'updates = "yes"'],
        "mirrors.updates",
        6,
        "expected true or false",
    ),
    "type-hosts-table": ([*HEAD, "[hosts]", 'name = "h"'], "hosts", 5, "expected an array"),
    "type-date": (
        [*HEAD, "[image]", "docker_tag = 2024-01-01"],
        "image.docker_tag",
        6,
        "a date value",
    ),
    "missing-formats": (HEAD[:3], "formats", 1, "required key is missing (add formats = "),
    "extra-no-key": (
        [*HEAD, "[[mirrors.extra]]", 'uri = "https://repo.example/x"', 'suite = "s"'],
        "mirrors.extra[0].signed_by",
        5,
        "has no key",
    ),
    "extra-key-missing": (
        [
            *HEAD,
            "[[mirrors.extra]]",
            'uri = "https://repo.example/x"',
            'suite = "s"',
            'signed_by = "nokey.gpg"',
        ],
        "mirrors.extra[0].signed_by",
        8,
        "does not exist",
    ),
    "extra-trusted-remote": (
        [
            *HEAD,
            "[[mirrors.extra]]",
            'uri = "https://repo.example/x"',
            'suite = "s"',
            "trusted = true",
        ],
        "mirrors.extra[0].trusted",
        8,
        "only for a file:// repository",
    ),
    "extra-both": (
        [
            *HEAD,
            "[[mirrors.extra]]",
            'uri = "file:///srv/repo"',
            'suite = "s"',
            'signed_by = "afile"',
            "trusted = true",
        ],
        "mirrors.extra[0].trusted",
        9,
        "cannot also be trusted",
    ),
    "extra-suite": (
        [
            *HEAD,
            "[[mirrors.extra]]",
            'uri = "file:///srv/repo"',
            'suite = "../etc"',
            "trusted = true",
        ],
        "mirrors.extra[0].suite",
        7,
        "is not a suite",
    ),
    "extra-uri": (
        [*HEAD, "[[mirrors.extra]]", 'uri = "ftp://x"', 'suite = "s"', "trusted = true"],
        "mirrors.extra[0].uri",
        6,
        "is not a mirror",
    ),
    "extra-unknown": (
        [*HEAD, "[[mirrors.extra]]", 'url = "file:///r"', 'suite = "s"', "trusted = true"],
        "mirrors.extra[0].url",
        6,
        "did you mean 'uri'",
    ),
    "sign-key": ([*HEAD, "[sign]", 'gpg_key = "a b"'], "sign.gpg_key", 6, "is not a gpg key"),
    "epoch-negative": ([*HEAD, "[image]", "epoch = -1"], "image.epoch", 6, "expected at least 0"),
}


@pytest.mark.parametrize(("lines", "field", "line", "fragment"), BAD.values(), ids=BAD.keys())
def test_bad_input(tmp_path: Path, lines: list[str], field: str, line: int, fragment: str) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "afile").write_text("")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = write(tmp_path, "\n".join(lines) + "\n")
    err = error_of(path)
    assert (err.field, err.line) == (field, line), str(err)
    assert fragment in err.message
    assert (err.path, str(err)) == (path, f"{path}:{line}: {field}: {err.message}")


def test_the_first_problem_in_the_file_wins(tmp_path: Path) -> None:
    # An unknown key comes first: it explains more than what it hides (here: missing arches).
    path = write(tmp_path, "\n".join(['name = "a;b"', 'arch = ["amd64"]', *HEAD[2:]]))
    assert error_of(path).field == "arch"
    # Otherwise the earliest line, whatever order pydantic checks the fields in.
    text = "\n".join(['formats = ["bad"]', 'name = "a;b"', *HEAD[1:3], "fallback = 1"])
    err = error_of(write(tmp_path, text))
    assert (err.field, err.line) == ("formats[0]", 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", "not a text file"),
        (b'name = "caf\xe9"\n', "not a text file"),
        (b'name = "t"\0\n', "not a text file"),
    ],
    ids=["missing", "binary", "latin1", "nul"],
)
def test_bad_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.toml" if content is None else write(tmp_path, content)
    err = error_of(path)
    assert (err.field, err.line) == ("file", 1)
    assert message in err.message


@pytest.mark.parametrize("name", ["m\0.toml", "m" * 300 + ".toml"], ids=["nul", "too-long"])
def test_unreadable_name(tmp_path: Path, name: str) -> None:
    err = error_of(f"{tmp_path}/{name}")
    assert (err.field, err.line) == ("file", 1)
    assert "cannot read it" in err.message


def test_folder(tmp_path: Path) -> None:
    err = error_of(tmp_path)
    assert (err.field, err.line) == ("file", 1)
    assert "is a folder" in err.message


def test_path_is_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'name = "t"\n')
    assert str(error_of("./m.toml")).startswith("./m.toml:1: arches: ")


LOCATOR_TEXT = """\
name = "t"  # [image] in a comment is no header
formats = [
    "raw",  # a comment, with a comma
    # "qcow2",
    'vh"d',
    { odd = "but, [still] one value" },
]
exclude = [{ arch = "amd64" }, { distro = "x", arch = "y" }]
image.size = "1G"

[ image ]   # spaces and a comment
"layout" = "mbr"

[[hosts]]
name = "a"
[[hosts]]
name = "b"
[[ hosts ]]
jobs = 0
"""


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        (("name",), 1),
        (("formats",), 2),
        (("formats", 0), 3),
        (("formats", 1), 5),
        (("formats", 2), 6),
        (("formats", 2, "odd"), 6),
        (("formats", 9), 2),  # no such item: the key's line
        (("exclude", 1, "arch"), 8),
        (("exclude", 1, "nope"), 8),
        (("image", "size"), 9),
        (("image", "layout"), 12),
        (("image", "hooks"), 11),  # not in the file: the table's header
        (("hosts", 0, "name"), 15),
        (("hosts", 1), 16),
        (("hosts", 2, "jobs"), 19),
        (("hosts", 2, "address"), 18),
        (("mirrors", "debian"), 1),  # nothing to point at
        ((), 1),
    ],
)
def test_line_of(loc: tuple[str | int, ...], line: int) -> None:
    assert _line_of(LOCATOR_TEXT, loc) == line


def test_odd_keys_are_quoted_in_the_field(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "\n".join([*HEAD, "[image]", '"pack ages" = []'])))
    assert (err.field, err.line) == ('image."pack ages"', 6)


# --- nothing but MatrixError, whatever the file holds -----------------------------------------

KEYS = ["name", "arches", "distros", "formats", "exclude", "image", "hosts", "size", "arch", "x"]
VALUES = [
    '"t"',
    '"amd64"',
    '["amd64"]',
    '["debian/bookworm"]',
    '["raw", "raw"]',
    "[]",
    "3",
    "-1",
    "true",
    "1.5",
    '"3GiB"',
    '"auto"',
    "{}",
    '{ arch = "amd64" }',
    "[{}]",
    '[[1], "a"]',
    "1979-05-27",
    '"a;b"',
    '"~/x"',
    '"hooks"',
    '"""\nx"""',
    "[\n1,\n]",
]
HEADERS = ["[image]", "[mirrors]", "[[hosts]]", "[[exclude]]", "[image.x]", "[hosts]", "[[a.b]]"]
TOMLISH = st.lists(
    st.one_of(
        st.sampled_from(HEAD + HOST + HEADERS),
        st.builds(
            "{}{} = {}".format,
            st.sampled_from(["", "image.", "hosts.", '"q".']),
            st.sampled_from(KEYS),
            st.sampled_from(VALUES),
        ),
        st.text(max_size=20),
    ),
    max_size=14,
).map("\n".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=200), TOMLISH.map(str.encode)))
def test_only_matrix_errors(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_bytes(content)
    try:
        load_matrix(path)
    except MatrixError as e:
        assert re.fullmatch(r".+:\d+: \S+: .+\(.+\)", str(e)), str(e)


# --- remote hosts: how the worker is started, and its folders ---------------------------------


def test_host_worker_defaults_and_values(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([*HEAD, *HOST]) + "\n")
    (h,) = load_matrix(path).hosts
    assert (h.command, h.workdir, h.cache) == ("factory", "/var/tmp/factory", "/var/cache/factory")
    text = [*HEAD, *HOST, 'command = "/opt/f/.venv/bin/factory"', 'workdir = "/srv/w"']
    (h,) = load_matrix(write(tmp_path, "\n".join(text) + "\n")).hosts
    assert (h.command, h.workdir) == ("/opt/f/.venv/bin/factory", "/srv/w")


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        ('command = "factory; rm -rf /"', "command", "is not a command"),
        ('command = "factory --debug"', "command", "no spaces or arguments"),
        ('command = "$(id)"', "command", "is not a command"),
        ('command = "-x"', "command", "is not a command"),
        ('workdir = "relative/dir"', "workdir", "not a plain absolute path"),
        ('workdir = "/tmp/../etc"', "workdir", "no '..'"),
        ('cache = "/var/cache/$HOME"', "cache", "not a plain absolute path"),
    ],
)
def test_host_worker_values_without_shell_syntax(
    tmp_path: Path, line: str, field: str, fragment: str
) -> None:
    err = error_of(write(tmp_path, "\n".join([*HEAD, *HOST, line]) + "\n"))
    assert (err.field, err.line) == (f"hosts[0].{field}", 9)
    assert fragment in err.message


def test_several_layouts_give_each_arch_those_that_fit(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "t"\narches = ["amd64", "ppc64el"]\ndistros = ["debian/bookworm"]\n'
        'formats = ["raw"]\n[image]\nlayout = ["mbr", "gpt-efi", "ppc-prep"]\n',
    )
    m = load_matrix(path)
    assert m.layouts_for("amd64") == (LAYOUTS["mbr"], LAYOUTS["gpt-efi"])
    assert m.layouts_for("ppc64el") == (LAYOUTS["ppc-prep"],)


def test_extra_repositories_and_signing(tmp_path: Path) -> None:
    (tmp_path / "repo.gpg").write_bytes(b"k")
    path = write(
        tmp_path,
        "\n".join(
            [
                *HEAD,
                "[image]",
                "epoch = 1700000000",
                "[sign]",
                'gpg_key = "0xABCDEF0123456789"',
                "[[mirrors.extra]]",
                'uri = "https://repo.example/x"',
                'suite = "stable"',
                'components = ["main", "extra"]',
                'signed_by = "repo.gpg"',
                "[[mirrors.extra]]",
                'uri = "file:///srv/repo"',
                'suite = "local"',
                "trusted = true",
            ]
        )
        + "\n",
    )
    m = load_matrix(path)
    assert m.image.epoch == 1700000000
    assert m.sign is not None and m.sign.gpg_key == "0xABCDEF0123456789"
    one, two = m.mirrors.extra
    assert (one.components, one.signed_by, one.trusted) == (
        ("main", "extra"),
        (tmp_path / "repo.gpg").resolve(),
        False,
    )
    assert (two.uri, two.signed_by, two.trusted) == ("file:///srv/repo", None, True)
