"""Distribution families: what differs between Debian and, say, Fedora, behind one protocol.

A stage asks `get(family)` for the bootstrap command, the packages a boot method needs,
how the initramfs is made, the package manifest, the clean-up and the EFI vendor folder;
the schema asks it for release and package name rules. A new family is one module here
with a `FAMILY` object that implements `Family`: it is found by looking, not by a list.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, cast

from factory.arches import BootMethod


class Family(Protocol):
    name: str
    releases: tuple[str, ...]  # known releases: for messages and docs
    efi_vendor: str  # the ESP's /EFI/<vendor> folder its signed grub reads its config from
    leftovers: tuple[str, ...]  # globs of build leftovers removed from the tree
    cloud_init_packages: tuple[str, ...]  # cloud-init and what it needs to read a seed
    initramfs_command: tuple[str, ...]  # run in the chroot once the tree is configured
    clean_command: tuple[str, ...]  # run in the chroot last: package caches
    manifest_format: str
    purl_type: str  # its packages' package-URL type (the namespace is the family's name)

    def version_of(self, release: str) -> str:
        """VERSION_ID of a release, as purls and SBOMs name it."""
        ...

    def sources(self, release: str, mirror: str, updates: bool, security: bool) -> str:
        """The package sources of the family's archive for `release` ("host": made from
        the build machine's own); ValueError (one line) when they cannot be made."""
        ...

    def extra_source(
        self, uri: str, suite: str, components: tuple[str, ...], key: bytes | None, trusted: bool
    ) -> str:
        """Sources for a repository of one's own, with its key (a keyring's bytes)."""
        ...

    def suites_of(self, text: str) -> list[tuple[str, str, tuple[str, ...]]]:
        """(uri, suite, components) of every suite in sources: the archive state to read."""
        ...

    def package_problem(self, name: str) -> str | None:
        """Why `name` cannot be one of the family's package names, or None."""
        ...

    def packages(
        self, release: str, arch: str, methods: Iterable[BootMethod], extra: Iterable[str]
    ) -> list[str]:
        """Every package the tree gets: base, kernel, the boot methods' loaders, extra."""
        ...

    def bootstrap_args(
        self,
        *,
        release: str,
        arch: str,
        packages: Iterable[str],
        target: Path,
        sources_file: Path,
        lists: Path | None = None,
    ) -> list[str]:
        """The command that builds the tree into `target` from `sources_file`, keeping
        the archive's Release files it used in `lists`."""
        ...

    def bootstrap_progress(self, line: str) -> tuple[float, float] | None:
        """How far the bootstrap is from a line of its output (a proc.Parser), or None."""
        ...

    def explain_bootstrap(self, tail: Iterable[str], arch: str) -> str | None:
        """A failed bootstrap's last lines as one line with the fix, if known."""
        ...

    def configure_initramfs(self, tree: Path, arch: str, filesystem: str) -> None:
        """Write the initramfs generator's settings for a VM disk into the tree."""
        ...

    async def manifest(self, tree: Path) -> list[dict[str, str]]:
        """Every installed package: package, version, arch, status, source,
        source_version, maintainer; sorted."""
        ...


def _discover() -> dict[str, Family]:
    """Every module of this package with a FAMILY, by its name."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if family is not None:
            found[family.name] = cast(Family, family)
    return found


FAMILIES: dict[str, Family] = _discover()


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown distro family {name!r} (valid: {', '.join(FAMILIES)})") from None
