"""Helpers for reading a built disk image without mounting it: its partition table, the
filesystem inside it (e2fsprogs at an offset), raw bytes, a FAT by mtools, a boot."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import factory
from tests.integration.conftest import Build, run_matrix


def sh(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, check=True).stdout


def built(matrix: Path, out: Path) -> Build:
    """A matrix built with every job done, or the reason it was not."""
    build = run_matrix(matrix, out)
    assert build.returncode == 0, build.stderr[-3000:] + json.dumps(
        [j for j in build.report.get("jobs", []) if j["status"] != "done"], indent=1
    )
    return build


def partitions(image: Path) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    return table


def fs_of(build: Build, cell: str) -> str:
    """The root filesystem inside the raw disk, as e2fsprogs name it."""
    offset = build.job(f"assemble:{cell}")["info"]["root_offset"]
    return f"{build.artifact('raw')}?offset={offset}"


def debugfs(build: Build, cell: str, request: str) -> str:
    return sh("debugfs", "-R", request, fs_of(build, cell))


def fs_uuid(build: Build, cell: str) -> str:
    header = sh("dumpe2fs", "-h", fs_of(build, cell))
    return next(
        line.split()[-1] for line in header.splitlines() if line.startswith("Filesystem UUID:")
    )


def read_at(image: Path, offset: int, size: int) -> bytes:
    with open(image, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def u64(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<Q", data, offset)[0]
    return value


def boots(image: Path, log: Path, *args: str) -> str:
    """Boot with `factory boot` to a login prompt; the console's text."""
    result = factory("boot", image, "--timeout", "400", "--log", log, *args, timeout=500)
    console = log.read_text(errors="replace") if log.exists() else ""
    assert result.returncode == 0, result.stderr + console[-3000:]
    assert "login prompt after" in result.stdout
    return console
