"""Debian: package sets and apt sources rewritten for another release (pure text)."""

from __future__ import annotations

import pytest

from factory.distros import debian
from factory.distros.debian import (
    KEYRING,
    SourcesError,
    Stanza,
    packages_for,
    parse_sources,
    sources_for,
    sources_for_url,
)
from factory.layouts import LAYOUTS

BOOKWORM_DEB822 = """\
Types: deb deb-src
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

# the security archive
Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://example.org/disabled
Suites: bookworm
Enabled: no

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main
"""

BOOKWORM_ONE_LINE = """\
# comment line
deb [arch=amd64 signed-by=/etc/apt/keyrings/mirror.gpg] http://mirror.example/debian \
bookworm main non-free-firmware
deb http://mirror.example/debian bookworm-updates main
deb-src http://mirror.example/debian bookworm main
deb http://security.mirror.example/debian-security bookworm-security main  # trailing comment

"""


def stanzas_of(rendered: str) -> list[dict[str, str]]:
    """Rendered deb822 text back to dicts, to check what sources_for wrote."""
    out = []
    for block in rendered.strip().split("\n\n"):
        out.append(dict(line.split(": ", 1) for line in block.splitlines()))
    return out


# --- parsing ----------------------------------------------------------------------------------


def test_parse_deb822() -> None:
    got = parse_sources(BOOKWORM_DEB822, deb822=True)
    assert got == [
        Stanza(
            ("http://mirror.example/debian",),
            ("bookworm", "bookworm-updates"),
            ("main", "contrib"),
            "/usr/share/keyrings/debian-archive-keyring.gpg",
        ),
        Stanza(
            ("http://mirror.example/debian-security",),
            ("bookworm-security",),
            ("main",),
            "/usr/share/keyrings/debian-archive-keyring.gpg",
        ),
    ]  # the disabled stanza and the deb-src only one are left out


def test_parse_deb822_continuation_and_defaults() -> None:
    text = "Types: deb\nURIs: http://a.example/debian\n  http://b.example/debian\nSuites: trixie\n"
    [st] = parse_sources(text, deb822=True)
    assert st.uris == ("http://a.example/debian", "http://b.example/debian")
    assert st.components == ("main",)
    assert st.signed_by is None


def test_parse_deb822_is_case_insensitive_in_field_names() -> None:
    text = "types: deb\nuris: http://a.example/debian\nsuites: bookworm\ncomponents: main\n"
    [st] = parse_sources(text, deb822=True)
    assert st.suites == ("bookworm",)


def test_parse_one_line() -> None:
    got = parse_sources(BOOKWORM_ONE_LINE, deb822=False)
    assert got == [
        Stanza(
            ("http://mirror.example/debian",),
            ("bookworm",),
            ("main", "non-free-firmware"),
            "/etc/apt/keyrings/mirror.gpg",
        ),
        Stanza(("http://mirror.example/debian",), ("bookworm-updates",), ("main",), None),
        Stanza(
            ("http://security.mirror.example/debian-security",),
            ("bookworm-security",),
            ("main",),
            None,
        ),
    ]


def test_parse_one_line_without_components() -> None:
    [st] = parse_sources("deb http://m.example/debian bookworm\n", deb822=False)
    assert st.components == ("main",)


def test_parse_nothing() -> None:
    assert parse_sources("", deb822=True) == []
    assert parse_sources("", deb822=False) == []
    assert parse_sources("# only comments\n", deb822=False) == []


# --- rewriting for a release ------------------------------------------------------------------


def test_sources_for_renames_suites() -> None:
    out = sources_for(
        "trixie", parse_sources(BOOKWORM_DEB822, deb822=True), updates=True, security=True
    )
    assert "bookworm" not in out
    main, sec = stanzas_of(out)
    assert main == {
        "Types": "deb",
        "URIs": "http://mirror.example/debian",
        "Suites": "trixie trixie-updates",
        "Components": "main contrib",
        "Signed-By": "/usr/share/keyrings/debian-archive-keyring.gpg",
    }
    assert sec["URIs"] == "http://mirror.example/debian-security"
    assert sec["Suites"] == "trixie-security"


def test_sources_for_from_one_line_sources() -> None:
    out = sources_for(
        "trixie", parse_sources(BOOKWORM_ONE_LINE, deb822=False), updates=True, security=True
    )
    blocks = stanzas_of(out)
    assert [b["Suites"] for b in blocks] == ["trixie", "trixie-updates", "trixie-security"]
    assert blocks[0]["Signed-By"] == "/etc/apt/keyrings/mirror.gpg"  # the host's key is kept
    assert blocks[1]["Signed-By"] == KEYRING  # and Debian's where the host named none


@pytest.mark.parametrize(
    ("updates", "security", "suites"),
    [
        (True, True, {"trixie", "trixie-updates", "trixie-security"}),
        (False, True, {"trixie", "trixie-security"}),
        (True, False, {"trixie", "trixie-updates"}),
        (False, False, {"trixie"}),
    ],
)
def test_sources_for_flags(updates: bool, security: bool, suites: set[str]) -> None:
    out = sources_for(
        "trixie", parse_sources(BOOKWORM_DEB822, deb822=True), updates=updates, security=security
    )
    got = {s for b in stanzas_of(out) for s in b["Suites"].split()}
    assert got == suites


def test_sources_for_same_release_and_codename_aliases() -> None:
    stanzas = parse_sources(
        "deb http://m.example/debian stable main\n"
        "deb http://m.example/debian stable-updates main\n",
        deb822=False,
    )
    out = sources_for("bookworm", stanzas, updates=True, security=False)
    assert [b["Suites"] for b in stanzas_of(out)] == ["bookworm", "bookworm-updates"]


def test_sources_for_drops_backports_and_repeats() -> None:
    stanzas = parse_sources(
        "deb http://m.example/debian bookworm main\n"
        "deb http://m.example/debian bookworm-backports main\n"
        "deb http://m.example/debian bookworm main contrib\n",
        deb822=False,
    )
    out = sources_for("trixie", stanzas, updates=True, security=True)
    assert "backports" not in out
    assert out.count("Suites: trixie\n") == 1


def test_sources_for_needs_a_release_suite() -> None:
    only_security = parse_sources(
        "deb http://security.mirror.example/debian-security bookworm-security main\n", deb822=False
    )
    with pytest.raises(SourcesError, match="release suite"):
        sources_for("trixie", only_security, updates=True, security=True)
    with pytest.raises(SourcesError):
        sources_for("trixie", [], updates=True, security=True)
    assert issubclass(SourcesError, ValueError)


def test_old_style_security_suite_becomes_security() -> None:
    stanzas = parse_sources(
        "deb http://mirror.example/debian buster main\n"
        "deb http://security.mirror.example/debian-security buster/updates main\n",
        deb822=False,
    )
    out = sources_for("bookworm", stanzas, updates=False, security=True)
    assert "bookworm-security" in out


def test_sources_for_url() -> None:
    out = sources_for_url("trixie", "http://mirror.example/debian/", updates=True, security=True)
    main, sec = stanzas_of(out)
    assert main == {
        "Types": "deb",
        "URIs": "http://mirror.example/debian",
        "Suites": "trixie trixie-updates",
        "Components": "main",
        "Signed-By": KEYRING,
    }
    assert sec["URIs"] == "http://mirror.example/debian-security"
    assert sec["Suites"] == "trixie-security"
    only = sources_for_url("bookworm", "file:///srv/mirror", updates=False, security=False)
    [block] = stanzas_of(only)
    assert block["URIs"] == "file:///srv/mirror"
    assert block["Suites"] == "bookworm"


def test_rendered_sources_parse_back() -> None:
    out = sources_for_url("trixie", "http://mirror.example/debian", updates=True, security=True)
    assert parse_sources(out, deb822=True) == [
        Stanza(("http://mirror.example/debian",), ("trixie", "trixie-updates"), ("main",), KEYRING),
        Stanza(
            ("http://mirror.example/debian-security",), ("trixie-security",), ("main",), KEYRING
        ),
    ]


# --- packages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "layout", "kernel", "grub"),
    [
        ("amd64", "mbr", "linux-image-amd64", "grub-pc-bin"),
        ("amd64", "gpt-efi", "linux-image-amd64", "grub-efi-amd64-bin"),
        ("ppc64el", "ppc-prep", "linux-image-powerpc64le", "grub-ieee1275-bin"),
    ],
)
def test_packages_for(arch: str, layout: str, kernel: str, grub: str) -> None:
    methods = LAYOUTS[layout].boot_methods(arch)
    got = packages_for("bookworm", arch, methods, ["openssh-server", "curl", "openssh-server"])
    assert got == sorted(set(got))  # sorted, no repeats
    assert kernel in got
    assert grub in got
    assert {pkg for m in methods for pkg in debian.bootloader(m, arch)} <= set(got)
    assert set(debian.BASE) <= set(got)
    assert {"openssh-server", "curl"} <= set(got)
    assert got.count("openssh-server") == 1
    others = set(debian.KERNELS.values()) - {kernel}
    assert not others & set(got)


def test_packages_for_user_package_already_in_base() -> None:
    plain = packages_for("trixie", "amd64", ["bios-mbr"], [])
    assert packages_for("trixie", "amd64", ["bios-mbr"], ["udev", "systemd-sysv"]) == plain


def test_packages_for_several_boot_methods_are_their_union() -> None:
    both = packages_for("bookworm", "amd64", ["bios-mbr", "uefi", "bios-gpt"], [])
    assert both == packages_for("bookworm", "amd64", ["uefi", "bios-gpt"], [])
    assert set(packages_for("bookworm", "amd64", ["bios-mbr"], [])) < set(both)
    uefi = set(packages_for("bookworm", "amd64", ["uefi"], []))
    assert {"shim-signed", "grub-efi-amd64-signed", "grub-efi-amd64-bin"} <= uefi
    assert "grub-pc-bin" not in uefi


def test_package_names_follow_the_family_rule() -> None:
    assert debian.FAMILY.package_problem("openssh-server") is None
    assert debian.FAMILY.package_problem("libc6:amd64=2.36-9") is None
    problem = debian.FAMILY.package_problem("NetworkManager")
    assert problem is not None and "not a Debian package name" in problem


EMBEDDED_KEY = """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mDMEZJ1jFhYJKwYBBAHaRw8BAQdAexample
 -----END PGP PUBLIC KEY BLOCK-----
"""


def test_embedded_signed_by_key_survives_rewriting() -> None:
    out = sources_for(
        "trixie", parse_sources(EMBEDDED_KEY, deb822=True), updates=False, security=False
    )
    assert "\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n" in out
    assert out.rstrip().endswith("-----END PGP PUBLIC KEY BLOCK-----")
