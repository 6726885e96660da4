"""How a full disk is recognised and named."""

from __future__ import annotations

import errno
from pathlib import Path

from factory.executors.local import disk_full, fullest
from factory.proc import CommandError


def test_disk_full_from_errno_and_from_tool_output() -> None:
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert disk_full(
        CommandError(["qemu-img"], 1, ["error while writing: No space left on device"])
    )
    assert disk_full(CommandError(["tar"], 2, ["tar: x.tar: Wrote only 6144 of 10240 bytes"]))
    assert not disk_full(CommandError(["tar"], 2, ["tar: x: Cannot open: Permission denied"]))
    assert not disk_full(ValueError("no"))


def test_fullest_names_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    folder, space = fullest([tmp_path / "not" / "yet", tmp_path])
    assert folder in (tmp_path / "not" / "yet", tmp_path)
    assert space > 0
