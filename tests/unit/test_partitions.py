"""[[image.partitions]]: the example loads, every bad layout is one `FILE:LINE: field: …
(fix)` error, and the plan, sizes, partition table, fstab and grub follow the partitions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from factory import layouts, plan, sizing
from factory.layouts import LAYOUTS, MiB, Volume
from factory.results import StageError
from factory.spec import load_matrix
from factory.stages import bootloader, finalise, partitions
from tests.unit.test_spec import error_of, write

REPO = Path(__file__).resolve().parents[2]
GiB = 1024 * MiB

HEAD = """\
name = "t"
arches = ["amd64"]
distros = ["debian/bookworm"]
formats = ["raw"]

[image]
layout = "gpt-efi"
"""


def parts(*entries: dict[str, object]) -> str:
    """[[image.partitions]] tables, one key a line."""
    out = []
    for entry in entries:
        out.append("[[image.partitions]]")
        for key, value in entry.items():
            shown = str(value).lower() if isinstance(value, bool) else f'"{value}"'
            out.append(f"{key} = {shown}")
    return "\n".join(out) + "\n"


ROOT = {"mountpoint": "/", "size": "auto", "filesystem": "ext4"}


def test_the_shipped_example_loads() -> None:
    m = load_matrix(REPO / "matrix/partitions.toml")
    points = [p.mountpoint for p in m.image.partitions]
    assert points == ["/boot", "/", "/var", None, "/srv/data"]
    assert [p.filesystem for p in m.image.partitions] == ["ext4", "xfs", "btrfs", "swap", "ext4"]
    assert m.image.partitions[1].size is None  # auto
    assert m.image.partitions[4].empty
    assert m.image.root_filesystem() == "xfs"


def bad(tmp_path: Path, text: str) -> tuple[int, str, str]:
    err = error_of(write(tmp_path, HEAD + text))
    return err.line, err.field, err.message


def test_two_partitions_with_one_mount_point(tmp_path: Path) -> None:
    line, field, message = bad(
        tmp_path,
        parts(ROOT, {"mountpoint": "/var", "size": "1GiB", "filesystem": "ext4"},
              {"mountpoint": "/var", "size": "1GiB", "filesystem": "xfs"}),
    )  # fmt: skip
    assert field == "image.partitions[2].mountpoint"
    assert line == 17  # the second /var
    assert "taken by partition 2" in message and "its own mountpoint" in message


def test_a_mount_point_under_a_partition_that_comes_later(tmp_path: Path) -> None:
    line, field, message = bad(
        tmp_path,
        parts(ROOT, {"mountpoint": "/var/log", "size": "1GiB", "filesystem": "ext4"},
              {"mountpoint": "/var", "size": "1GiB", "filesystem": "ext4"}),
    )  # fmt: skip
    assert field == "image.partitions[1].mountpoint" and line == 13
    assert "/var/log is inside /var, which comes later" in message
    assert "list /var before /var/log" in message


def test_root_may_come_after_boot(tmp_path: Path) -> None:
    """The issue's own example lists /boot first: the root is mounted first anyway."""
    m = load_matrix(
        write(
            tmp_path,
            HEAD + parts({"mountpoint": "/boot", "size": "512MiB", "filesystem": "ext4"}, ROOT),
        )
    )
    assert [p.mountpoint for p in m.image.partitions] == ["/boot", "/"]


def test_partitions_larger_than_the_disk_size(tmp_path: Path) -> None:
    text = HEAD.replace("[image]\n", '[image]\nsize = "2GiB"\n') + parts(
        ROOT,
        {"mountpoint": "/var", "size": "1GiB", "filesystem": "ext4"},
        {"mountpoint": "/srv", "size": "1GiB", "filesystem": "ext4"},
    )
    err = error_of(write(tmp_path, text))
    assert err.field == "image.partitions[2].size" and err.line == 19
    assert "more than image.size 2048 MiB" in err.message


def test_no_root(tmp_path: Path) -> None:
    line, field, message = bad(
        tmp_path, parts({"mountpoint": "/var", "size": "1GiB", "filesystem": "ext4"})
    )
    assert field == "image.partitions[0].mountpoint" and line == 9
    assert 'mountpoint = "/"' in message


def test_swap_with_a_mount_point(tmp_path: Path) -> None:
    line, field, message = bad(
        tmp_path, parts(ROOT, {"mountpoint": "/swap", "size": "1GiB", "filesystem": "swap"})
    )
    assert field == "image.partitions[1].mountpoint" and line == 13
    assert "swap has no mount point" in message


def test_swap_needs_a_size(tmp_path: Path) -> None:
    _, field, message = bad(tmp_path, parts(ROOT, {"size": "auto", "filesystem": "swap"}))
    assert field == "image.partitions[1].size" and "swap needs a size" in message


def test_a_filesystem_below_its_smallest(tmp_path: Path) -> None:
    _, field, message = bad(
        tmp_path, parts(ROOT, {"mountpoint": "/var", "size": "100MiB", "filesystem": "xfs"})
    )
    assert field == "image.partitions[1].size" and "xfs needs at least 300 MiB" in message


def test_a_root_that_cannot_hold_a_system(tmp_path: Path) -> None:
    _, field, message = bad(tmp_path, parts({**ROOT, "filesystem": "vfat"}))
    assert field == "image.partitions[0].filesystem" and "ext4" in message


def test_an_unknown_filesystem(tmp_path: Path) -> None:
    _, field, message = bad(tmp_path, parts({**ROOT, "filesystem": "zfs"}))
    assert field == "image.partitions[0].filesystem" and "'ext4'" in message


def test_a_boot_filesystem_the_boot_method_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grub reads every filesystem factory makes, so the table is narrowed here to show
    the check: a boot method that could not read XFS refuses an XFS /boot."""
    monkeypatch.setitem(layouts.BOOT_READS, "uefi", frozenset({"ext4", "vfat"}))
    import factory.spec

    monkeypatch.setitem(factory.spec.BOOT_READS, "uefi", frozenset({"ext4", "vfat"}))
    _, field, message = bad(
        tmp_path, parts(ROOT, {"mountpoint": "/boot", "size": "512MiB", "filesystem": "xfs"})
    )
    assert field == "image.partitions[1].filesystem"
    assert "uefi boot of amd64 (gpt-efi) cannot read xfs" in message
    assert "use one of ext4, vfat for /boot" in message


def test_a_dos_label_holds_four_partitions(tmp_path: Path) -> None:
    text = HEAD.replace('layout = "gpt-efi"', 'layout = "mbr"') + parts(
        ROOT,
        *({"mountpoint": f"/p{i}", "size": "1GiB", "filesystem": "ext4"} for i in range(4)),
    )
    err = error_of(write(tmp_path, text))
    assert err.field == "image.partitions" and "4 partitions at most, these make 5" in err.message


def test_a_data_partition_needs_a_mount_point(tmp_path: Path) -> None:
    _, field, message = bad(tmp_path, parts(ROOT, {"size": "1GiB", "filesystem": "ext4"}))
    assert field == "image.partitions[1].mountpoint" and "needs a mount point" in message


# --- the plan, the table, sizes, fstab, grub ---------------------------------------------------


def volumes() -> tuple[Volume, ...]:
    m = load_matrix(REPO / "matrix/partitions.toml")
    (cell,) = m.cells()
    return plan.user_volumes(m, cell, "k" * 64, "6d53d9fc-503d-5842-9fe5-2accc67a7fcc")


def test_the_plan_hands_every_partition_to_finalise_and_assemble() -> None:
    m = load_matrix(REPO / "matrix/partitions.toml")
    jobs = {j.kind: j for j in plan.make_plan(m).jobs}
    fin, asm = jobs["finalise"].params, jobs["assemble"].params
    assert fin["volumes"] == asm["volumes"] and len(asm["volumes"]) == 5
    assert fin["filesystem"] == asm["filesystem"] == "xfs"
    uuids = [v["uuid"] for v in asm["volumes"]]
    assert len(set(uuids)) == 5 and uuids[1] == fin["root_uuid"]


def test_the_default_plan_has_no_volumes() -> None:
    m = load_matrix(REPO / "matrix/default.toml")
    jobs = {j.kind: j for j in plan.make_plan(m).jobs}
    assert jobs["assemble"].params["volumes"] == []


def test_compose_keeps_the_boot_partitions_and_names_each_partition() -> None:
    lay = layouts.compose(LAYOUTS["gpt-efi"], volumes(), [512, 2000, 2048, 256, 1024])
    roles = [p.role for p in lay.partitions]
    assert roles == ["bios", "esp", "data", "root", "data", "swap", "data"]
    assert [p.name for p in lay.partitions] == [
        "bios", "esp", "boot", "root", "var", "swap", "srv-data",
    ]  # fmt: skip
    assert lay.partitions[5].type == layouts.SWAP["gpt"]
    assert lay.boot_partition().mountpoint == "/boot"
    script = lay.sfdisk_script(7 * GiB, "k" * 64)
    uuids = [f.split("uuid=")[1].split(",")[0] for f in script.splitlines() if "uuid=" in f]
    assert len(set(uuids)) == 7  # one GUID each, from the seed
    assert script == lay.sfdisk_script(7 * GiB, "k" * 64)


def test_auto_partitions_share_the_tree_and_extra_size() -> None:
    vols = volumes()
    usage = {
        "/": sizing.TreeUsage(900 * MiB, 30000),
        "/boot": sizing.TreeUsage(60 * MiB, 20),
        "/var": sizing.TreeUsage(100 * MiB, 3000),
    }
    sized = sizing.partition_sizes(usage, vols, LAYOUTS["gpt-efi"], 256 * MiB, None)
    boot, root, var, swap, data = sized.mib
    assert (boot, var, swap, data) == (512, 2048, 256, 1024)
    assert root == sizing.needed("xfs", usage["/"], 256 * MiB) // MiB
    assert sized.disk.disk == (1 + 1 + 1 + 64 + boot + root + var + swap + data) * MiB
    for name in ("/boot ext4 512 MiB", "/ xfs", "/var btrfs 2048 MiB", "swap swap 256 MiB"):
        assert name in sized.disk.reason
    assert "/srv/data ext4 1024 MiB" in sized.disk.reason


def test_a_set_partition_too_small_for_its_share_names_it() -> None:
    usage = {"/": sizing.TreeUsage(100 * MiB, 10), "/boot": sizing.TreeUsage(600 * MiB, 20)}
    with pytest.raises(sizing.TooSmall, match=r"partition /boot \(ext4\) of 512 MiB"):
        sizing.partition_sizes(usage, volumes(), LAYOUTS["gpt-efi"], 0, None)


def test_a_set_disk_size_goes_to_the_auto_partitions() -> None:
    usage = {"/": sizing.TreeUsage(100 * MiB, 10)}
    sized = sizing.partition_sizes(usage, volumes(), LAYOUTS["gpt-efi"], 0, 8 * GiB)
    assert sized.disk.disk == 8 * GiB
    assert sum(sized.mib) + 67 == 8 * 1024
    with pytest.raises(sizing.TooSmall, match=r"image\.size 4096 MiB"):
        sizing.partition_sizes(usage, volumes(), LAYOUTS["gpt-efi"], 0, 4 * GiB)


def test_measure_split_gives_each_file_to_the_deepest_mount_point(tmp_path: Path) -> None:
    for rel, size in [("etc/a", 5000), ("var/b", 9000), ("var/log/c", 7000), ("boot/k", 3000)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * size)
    split = sizing.measure_split(tmp_path, ["/", "/var", "/boot"])
    whole = sizing.measure(tmp_path)
    assert sum(u.allocated for u in split.values()) == whole.allocated
    assert split["/var"].entries == 4  # b, log, log/c, and +1 for its top


def test_fstab_names_every_partition_by_uuid() -> None:
    vols = volumes()
    text = finalise.fstab_of(vols)
    lines = [line.split() for line in text.splitlines()]
    by_point = {fields[1]: fields for fields in lines}
    assert [fields[1] for fields in lines] == ["/", "/boot", "/var", "/srv/data", "none"]
    assert by_point["/"] == [f"UUID={vols[1].uuid}", "/", "xfs", "defaults", "0", "0"]
    assert by_point["/boot"][2:] == ["ext4", "errors=remount-ro", "0", "2"]
    assert by_point["/var"][2:] == ["btrfs", "defaults", "0", "0"]
    assert by_point["/srv/data"][3] == "errors=remount-ro,nofail"
    assert by_point["none"] == [f"UUID={vols[3].uuid}", "none", "swap", "sw", "0", "0"]


def test_grub_reads_a_separate_boot() -> None:
    vols = volumes()
    lay = layouts.compose(LAYOUTS["gpt-efi"], vols, [512, 2000, 2048, 256, 1024])
    boot = bootloader.BootFs.of(lay, vols[1].uuid)
    assert (boot.uuid, boot.prefix) == (vols[0].uuid, "/grub")
    assert boot.modules(bootloader.I386_MODULES) == bootloader.I386_MODULES  # ext4
    kernel = finalise.Kernel("vmlinuz-6.1.0-1-amd64", "6.1.0-1-amd64")
    cfg = finalise.grub_cfg(vols[1].uuid, kernel, "amd64", "t", vols[0].uuid)
    assert f"--set=root {vols[0].uuid}" in cfg
    assert f"linux /vmlinuz-6.1.0-1-amd64 root=UUID={vols[1].uuid}" in cfg
    assert "initrd /initrd.img-6.1.0-1-amd64" in cfg


def test_grub_reads_an_xfs_root_holding_boot() -> None:
    vols = tuple(v for v in volumes() if v.mountpoint != "/boot")
    lay = layouts.compose(LAYOUTS["mbr"], vols[:2], [2000, 2048])
    boot = bootloader.BootFs.of(lay, vols[0].uuid)
    assert (boot.uuid, boot.prefix) == (vols[0].uuid, "/boot/grub")
    assert "xfs" in boot.modules(bootloader.I386_MODULES)
    assert "ext2" not in boot.modules(bootloader.I386_MODULES)


def test_the_default_layouts_read_ext4_from_root() -> None:
    for lay in LAYOUTS.values():
        boot = bootloader.BootFs.of(lay, "u")
        assert (boot.uuid, boot.prefix, boot.module) == ("u", "/boot/grub", "ext2")


def test_the_kernel_probe_reads_proc_filesystems() -> None:
    listed = Path("/proc/filesystems").read_text().split()
    assert partitions.kernel_has("ext4") == ("ext4" in listed)
    assert not partitions.kernel_has("nosuchfs")


async def test_a_filesystem_the_kernel_cannot_mount_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def no_modprobe(*args: object, **kw: object) -> None:
        return None

    monkeypatch.setattr(partitions.proc, "run", no_modprobe)
    with pytest.raises(StageError, match=r"partition /: this kernel cannot mount nosuchfs"):
        await partitions.probe_kernel("nosuchfs", "/")


def test_a_fat_gets_a_serial_as_its_uuid(tmp_path: Path) -> None:
    """blkid names a FAT by its 32-bit serial (XXXX-XXXX): fstab must too."""
    m = load_matrix(
        write(
            tmp_path,
            HEAD + parts(ROOT, {"mountpoint": "/srv", "size": "64MiB", "filesystem": "vfat"}),
        )
    )
    (cell,) = m.cells()
    _, fat = plan.user_volumes(m, cell, "k" * 64, "6d53d9fc-503d-5842-9fe5-2accc67a7fcc")
    assert re.fullmatch(r"[0-9A-F]{4}-[0-9A-F]{4}", fat.uuid)
    assert finalise.fstab_of((fat,)) == f"UUID={fat.uuid} /srv vfat umask=0077 0 2\n"
