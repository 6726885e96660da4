"""One matrix with arches amd64, arm64 and ppc64el and layouts mbr, gpt-efi and ppc-prep,
built here with no remote host: amd64 gets two disks from one tree, arm64 and ppc64el one
each, and the run's boot test brings each to a login prompt (amd64 by BIOS and by UEFI,
arm64 by UEFI on virt with AAVMF, ppc64el on pseries), all under TCG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.conftest import DATA
from tests.integration.conftest_images import built, partitions, sh

AMD, ARM, PPC = "debian-bookworm-amd64", "debian-bookworm-arm64", "debian-bookworm-ppc64el"
QEMU = {
    "bios": "$ qemu-system-x86_64 ",
    "uefi": "$ qemu-system-x86_64 ",
    "aavmf": "$ qemu-system-aarch64 -M virt -cpu max",
    "pseries": "$ qemu-system-ppc64 -M pseries ",
}
FIRMWARE_CODE = {"uefi": "OVMF_CODE", "aavmf": "AAVMF_CODE"}

pytestmark = pytest.mark.slow


@pytest.mark.timeout(3600)
def test_one_matrix_every_layout_each_disk_boots(tmp_path: Path) -> None:
    build = built(DATA / "layouts.toml", tmp_path / "out")
    jobs = {j["id"]: j for j in build.report["jobs"]}
    assert [j for j in jobs if j.startswith("rootfs:")] == [
        f"rootfs:{AMD}",
        f"rootfs:{ARM}",
        f"rootfs:{PPC}",
    ]
    # (disk, its label, the firmware that boots it, the boot job)
    disks = {
        "mbr": (build.out / AMD / f"{AMD}-mbr.raw", "dos", "bios", f"boot:{AMD}:mbr"),
        "gpt-efi": (build.out / AMD / f"{AMD}-gpt-efi.raw", "gpt", "uefi", f"boot:{AMD}:gpt-efi"),
        "arm64 gpt-efi": (build.out / ARM / f"{ARM}.raw", "gpt", "aavmf", f"boot:{ARM}"),
        "ppc-prep": (build.out / PPC / f"{PPC}.raw", "dos", "pseries", f"boot:{PPC}"),
    }
    assert sorted(j for j in jobs if j.startswith("boot:")) == sorted(d[3] for d in disks.values())
    for layout, (disk, label, firmware, boot_id) in disks.items():
        table = partitions(disk)
        assert table["label"] == label, layout
        # The console, as the boot job logged it: the QEMU it started and the guest's own
        # words, up to the login prompt.
        boot = jobs[boot_id]
        console = (build.out / boot["log"]).read_text(errors="replace")
        *_, qemu = [line for line in console.splitlines() if line.startswith("$ qemu-system-")]
        assert qemu.startswith(QEMU[firmware]), qemu
        for kind, code in FIRMWARE_CODE.items():
            assert (code in qemu) == (firmware == kind), qemu
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
