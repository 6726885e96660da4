"""Partition layouts: the sfdisk scripts, checked as text and by sfdisk itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from factory.arches import ARCHES
from factory.layouts import LAYOUTS, SECTOR, Layout, MiB, Partition, fitting, resolve

BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def entries(script: str) -> list[dict[str, str]]:
    """The partition lines of an sfdisk script as field dicts ("bootable" as a flag)."""
    out = []
    for line in script.splitlines():
        if not line.startswith("start="):
            continue
        fields: dict[str, str] = {}
        for part in line.split(", "):
            key, _, value = part.partition("=")
            fields[key] = value or "yes"
        out.append(fields)
    return out


def header(script: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in script.splitlines() if ": " in line)


def test_mbr_script() -> None:
    disk = 100 * MiB
    script = LAYOUTS["mbr"].sfdisk_script(disk)
    assert header(script) == {"label": "dos", "unit": "sectors"}
    [root] = entries(script)
    assert root == {
        "start": "2048",
        "size": str(disk // SECTOR - 2048),
        "type": "83",
        "bootable": "yes",
    }
    assert script.endswith("\n")


def test_ppc_prep_script() -> None:
    disk = 100 * MiB
    script = LAYOUTS["ppc-prep"].sfdisk_script(disk)
    assert header(script)["label"] == "dos"
    prep, root = entries(script)
    assert prep == {
        "start": "2048",
        "size": str(8 * MiB // SECTOR),
        "type": "41",
        "bootable": "yes",
    }
    assert root["start"] == str(9 * MiB // SECTOR)
    assert root["type"] == "83"
    assert "bootable" not in root
    assert int(root["start"]) + int(root["size"]) == disk // SECTOR


def test_gpt_efi_script() -> None:
    disk = 200 * MiB
    script = LAYOUTS["gpt-efi"].sfdisk_script(disk)
    head = header(script)
    assert head["label"] == "gpt"
    assert int(head["last-lba"]) == disk // SECTOR - 34
    bios, esp, root = entries(script)
    assert (bios["type"], bios["start"], bios["size"]) == (BIOS_BOOT, "2048", "2048")
    assert (esp["type"], esp["start"], esp["size"]) == (ESP, "4096", str(64 * MiB // SECTOR))
    assert root["type"] == LINUX
    assert [bios["name"], esp["name"], root["name"]] == ['"bios"', '"esp"', '"root"']
    # root ends within the usable area, before the backup GPT
    assert int(root["start"]) + int(root["size"]) - 1 <= int(head["last-lba"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("disk_mib", [80, 512, 4099])
def test_offsets_tile_the_disk(name: str, disk_mib: int) -> None:
    layout = LAYOUTS[name]
    disk = disk_mib * MiB
    offsets = layout.offsets(disk)
    assert list(offsets) == [p.role for p in layout.partitions]
    pos = layout.first_mib * MiB
    for start, size in offsets.values():
        assert start == pos  # contiguous, no overlap
        assert start % MiB == 0  # aligned
        assert size > 0
        pos += size
    tail = MiB if layout.label == "gpt" else 0
    assert pos + tail == disk
    assert offsets["root"][1] == disk - layout.overhead_mib() * MiB


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_overhead_matches_offsets(name: str) -> None:
    """disk = overhead + root: what sizing relies on."""
    layout = LAYOUTS[name]
    fs = 300 * MiB
    assert layout.offsets(layout.overhead_mib() * MiB + fs)["root"][1] == fs


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_too_small_disk_raises(name: str) -> None:
    layout = LAYOUTS[name]
    smallest = layout.overhead_mib() * MiB
    with pytest.raises(ValueError, match="too small"):
        layout.offsets(smallest)
    with pytest.raises(ValueError, match="too small"):
        layout.sfdisk_script(smallest // 2)
    assert layout.offsets(smallest + MiB)["root"][1] == MiB


def test_resolve_and_arch_table() -> None:
    assert resolve("auto", "amd64").name == "mbr"
    assert resolve("auto", "ppc64el").name == "ppc-prep"
    assert resolve("gpt-efi", "amd64").name == "gpt-efi"
    for arch in ARCHES:
        names = fitting(arch)
        assert names, arch
        assert all(n in LAYOUTS for n in names)
    for name, layout in LAYOUTS.items():
        assert layout.name == name
        assert [p.role for p in layout.partitions].count("root") == 1
        assert layout.partitions[-1].role == "root"
        assert layout.partitions[-1].size_mib is None


# --- with the real sfdisk ---------------------------------------------------------------------

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk not installed")


def apply(layout: Layout, disk: int, path: Path) -> dict[str, Any]:
    with open(path, "wb") as fh:
        fh.truncate(disk)
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)],
        input=layout.sfdisk_script(disk),
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    )
    out = subprocess.run(
        ["sfdisk", "--json", str(path)], text=True, check=True, capture_output=True, timeout=30
    ).stdout
    table: dict[str, Any] = json.loads(out)["partitiontable"]
    assert path.stat().st_blocks * 512 < disk  # still sparse
    return table


@needs_sfdisk
@pytest.mark.parametrize("disk_mib", [100, 1000])
def test_sfdisk_mbr(tmp_path: Path, disk_mib: int) -> None:
    disk = disk_mib * MiB
    table = apply(LAYOUTS["mbr"], disk, tmp_path / "disk.raw")
    assert table["label"] == "dos"
    [root] = table["partitions"]
    assert (root["start"], root["size"], root["type"]) == (2048, disk // SECTOR - 2048, "83")
    assert root.get("bootable") is True


@needs_sfdisk
@pytest.mark.parametrize("disk_mib", [100, 1000])
def test_sfdisk_ppc_prep(tmp_path: Path, disk_mib: int) -> None:
    disk = disk_mib * MiB
    table = apply(LAYOUTS["ppc-prep"], disk, tmp_path / "disk.raw")
    assert table["label"] == "dos"
    prep, root = table["partitions"]
    assert (prep["start"], prep["size"], prep["type"]) == (2048, 16384, "41")
    assert prep.get("bootable") is True
    assert (root["start"], root["type"]) == (18432, "83")
    assert root["start"] + root["size"] == disk // SECTOR
    assert not root.get("bootable")


@needs_sfdisk
@pytest.mark.parametrize("disk_mib", [100, 1000])
def test_sfdisk_gpt_efi(tmp_path: Path, disk_mib: int) -> None:
    disk = disk_mib * MiB
    layout = LAYOUTS["gpt-efi"]
    table = apply(layout, disk, tmp_path / "disk.raw")
    assert table["label"] == "gpt"
    assert table["lastlba"] == disk // SECTOR - 34
    bios, esp, root = table["partitions"]
    assert (bios["start"], bios["size"], bios["type"], bios["name"]) == (
        2048,
        2048,
        BIOS_BOOT,
        "bios",
    )
    assert (esp["start"], esp["size"], esp["type"], esp["name"]) == (
        4096,
        64 * MiB // SECTOR,
        ESP,
        "esp",
    )
    assert (root["start"], root["type"], root["name"]) == (135168, LINUX, "root")
    start, size = layout.offsets(disk)["root"]
    assert (root["start"] * SECTOR, root["size"] * SECTOR) == (start, size)
    assert root["start"] + root["size"] - 1 <= table["lastlba"]


@needs_sfdisk
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sfdisk_agrees_with_offsets(tmp_path: Path, name: str) -> None:
    layout = LAYOUTS[name]
    disk = 300 * MiB
    table = apply(layout, disk, tmp_path / "disk.raw")
    got = [(p["start"] * SECTOR, p["size"] * SECTOR) for p in table["partitions"]]
    assert got == list(layout.offsets(disk).values())


# --- boot methods, derived from partitions and arch --------------------------------------------


@pytest.mark.parametrize(
    ("name", "arch", "methods"),
    [
        ("mbr", "amd64", ("bios-mbr",)),
        ("gpt-efi", "amd64", ("uefi", "bios-gpt")),
        ("ppc-prep", "ppc64el", ("prep",)),
        ("mbr", "ppc64el", ()),
        ("gpt-efi", "ppc64el", ()),
        ("ppc-prep", "amd64", ()),
    ],
)
def test_boot_methods_of_the_shipped_layouts(
    name: str, arch: str, methods: tuple[str, ...]
) -> None:
    assert LAYOUTS[name].boot_methods(arch) == methods
    assert LAYOUTS[name].fits(arch) == bool(methods)


def test_boot_methods_follow_the_partitions_not_the_name() -> None:
    """A layout nobody shipped boots by what its partitions allow."""
    esp_only = Layout(
        name="anything",
        label="gpt",
        partitions=(
            Partition(role="esp", type=ESP, size_mib=100, filesystem="vfat"),
            Partition(role="root", type=LINUX, size_mib=None, mountpoint="/"),
        ),
    )
    assert esp_only.boot_methods("amd64") == ("uefi",)
    assert esp_only.boot_methods("ppc64el") == ()
    bios_only = esp_only.model_copy(
        update={"partitions": (Partition(role="bios", type=BIOS_BOOT, size_mib=1),
                               esp_only.partitions[1])}
    )  # fmt: skip
    assert bios_only.boot_methods("amd64") == ("bios-gpt",)


def test_a_layout_is_data_in_the_assemble_params() -> None:
    data = LAYOUTS["gpt-efi"].model_dump(mode="json")
    assert Layout.model_validate(data) == LAYOUTS["gpt-efi"]
    assert [p["role"] for p in data["partitions"]] == ["bios", "esp", "root"]
