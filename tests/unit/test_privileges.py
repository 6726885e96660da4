"""A tree made without the capabilities it needs is refused before any work: in a
container without them mmdebstrap leaves a /dev of regular files and "succeeds"."""

from __future__ import annotations

from factory.runner import missing_caps

# /proc/self/status lines as a root shell, Docker's default set and buildah's chroot
# default set print them.
ROOT = "Name:\tbash\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"
DOCKER_DEFAULT = "CapEff:\t00000000a80425fb\n"
NO_MKNOD = "CapEff:\t00000000a00425fb\n"


def test_root_has_what_a_tree_needs() -> None:
    assert missing_caps(ROOT) == []


def test_dockers_default_set_lacks_sys_admin() -> None:
    assert missing_caps(DOCKER_DEFAULT) == ["CAP_SYS_ADMIN"]


def test_without_mknod_and_sys_admin_both_are_named() -> None:
    assert missing_caps(NO_MKNOD) == ["CAP_SYS_ADMIN", "CAP_MKNOD"]


def test_no_capeff_line_refuses_nothing() -> None:
    assert missing_caps("Name:\tbash\n") == []
