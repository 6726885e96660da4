"""One matrix with arches amd64 and ppc64el and layouts mbr, gpt-efi and ppc-prep, built
here with no remote host: amd64 gets two disks from one tree, ppc64el one, and the run's
boot test brings each to a login prompt (amd64 by BIOS and by UEFI, ppc64el on pseries)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.conftest import DATA
from tests.integration.conftest_images import built, partitions, sh

AMD, PPC = "debian-bookworm-amd64", "debian-bookworm-ppc64el"
QEMU = {
    "bios": "$ qemu-system-x86_64 ",
    "uefi": "$ qemu-system-x86_64 ",
    "pseries": "$ qemu-system-ppc64 -M pseries ",
}

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_one_matrix_every_layout_each_disk_boots(tmp_path: Path) -> None:
    build = built(DATA / "layouts.toml", tmp_path / "out")
    jobs = {j["id"]: j for j in build.report["jobs"]}
    assert [j for j in jobs if j.startswith("rootfs:")] == [f"rootfs:{AMD}", f"rootfs:{PPC}"]
    disks = {
        "mbr": (build.out / AMD / f"{AMD}-mbr.raw", "dos", "bios"),
        "gpt-efi": (build.out / AMD / f"{AMD}-gpt-efi.raw", "gpt", "uefi"),
        "ppc-prep": (build.out / PPC / f"{PPC}.raw", "dos", "pseries"),
    }
    for layout, (disk, label, firmware) in disks.items():
        table = partitions(disk)
        assert table["label"] == label, layout
        # The console, as the boot job logged it: the QEMU it started and the guest's own
        # words, up to the login prompt.
        boot = jobs[f"boot:{AMD}:{layout}" if layout != "ppc-prep" else f"boot:{PPC}"]
        console = (build.out / boot["log"]).read_text(errors="replace")
        *_, qemu = [line for line in console.splitlines() if line.startswith("$ qemu-system-")]
        assert qemu.startswith(QEMU[firmware]), qemu
        assert ("OVMF_CODE" in qemu) == (firmware == "uefi"), qemu
        assert "Debian GNU/Linux 12" in console, console[-2000:]
        assert re.search(r"(?m)\S+ login:\s*$", console), console[-2000:]
        assert any(a["path"] == str(disk.relative_to(build.out)) for a in build.report["artifacts"])
    assert partitions(disks["ppc-prep"][0])["partitions"][0]["type"] == "41"
    # One tree, one filesystem UUID: both amd64 disks hold the same root filesystem.
    uuids = set()
    for layout in ("mbr", "gpt-efi"):
        offset = jobs[f"assemble:{AMD}:{layout}"]["info"]["root_offset"]
        header = sh("dumpe2fs", "-h", f"{disks[layout][0]}?offset={offset}")
        uuids.add(
            next(x.split()[-1] for x in header.splitlines() if x.startswith("Filesystem UUID"))
        )
    assert len(uuids) == 1
