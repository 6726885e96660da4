"""The disk side of reproducible builds: what the tools would draw at random or read from
the clock comes from the job's key and the epoch. The patch functions are checked on
small real files made by qemu-img, and with qemu-img's own check afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import anyio
import pytest

from factory import proc, repro
from factory.layouts import LAYOUTS, MiB
from factory.stages import assemble, bootloader, convert
from tests.conftest import qcow2_clusters

KEY = "a" * 64
EPOCH = 1_700_000_000
ROOT_UUID = "6d53d9fc-503d-5842-9fe5-2accc67a7fcc"

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img")
needs_e2fsprogs = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None, reason="e2fsprogs"
)


def sh(*argv: str | os.PathLike[str]) -> str:
    return subprocess.run(
        [os.fspath(a) for a in argv], check=True, capture_output=True, text=True, timeout=60
    ).stdout


# --- the partition table ----------------------------------------------------------------


def test_sfdisk_script_carries_ids_from_the_key() -> None:
    gpt = LAYOUTS["gpt-efi"].sfdisk_script(300 * MiB, KEY)
    assert f"label-id: {str(repro.seeded_uuid(KEY, 'gpt-disk')).upper()}" in gpt
    uuids = [line.split("uuid=")[1].split(",")[0] for line in gpt.splitlines() if "uuid=" in line]
    assert len(uuids) == 3 == len(set(uuids))
    assert LAYOUTS["gpt-efi"].sfdisk_script(300 * MiB, KEY) == gpt
    assert LAYOUTS["gpt-efi"].sfdisk_script(300 * MiB, "b" * 64) != gpt
    dos = LAYOUTS["mbr"].sfdisk_script(300 * MiB, KEY)
    assert "label-id: 0x" in dos and "uuid=" not in dos
    assert "label-id" not in LAYOUTS["mbr"].sfdisk_script(300 * MiB)  # without a key: sfdisk's


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk")
@pytest.mark.parametrize("name", ["mbr", "gpt-efi"])
def test_sfdisk_writes_the_same_table_twice(tmp_path: Path, name: str) -> None:
    layout = LAYOUTS[name]
    tables = []
    for n in (1, 2):
        disk = tmp_path / f"{n}.raw"
        with open(disk, "wb") as fh:
            fh.truncate(100 * MiB)
        subprocess.run(
            ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
            input=layout.sfdisk_script(100 * MiB, KEY),
            text=True,
            check=True,
            capture_output=True,
            timeout=30,
        )
        tables.append(disk.read_bytes())
    assert tables[0] == tables[1]
    table = json.loads(sh("sfdisk", "--json", tmp_path / "1.raw"))["partitiontable"]
    if name == "gpt-efi":
        assert table["id"] == str(repro.seeded_uuid(KEY, "gpt-disk")).upper()
        root = str(repro.seeded_uuid(KEY, "gpt-part-root")).upper()
        assert table["partitions"][2]["uuid"] == root


# --- ext4 ---------------------------------------------------------------------------------


def test_mkfs_args_put_every_extended_option_in_one_e() -> None:
    args = assemble.mkfs_args(Path("/t"), "d.raw", ROOT_UUID, 1048576, 64 * MiB, "1-2-3")
    assert args.count("-E") == 1
    assert args[args.index("-E") + 1] == "offset=1048576,hash_seed=1-2-3"
    assert args[args.index("-U") + 1] == ROOT_UUID
    empty = assemble.mkfs_args(None, "/dev/loop0p1", ROOT_UUID, None, 64 * MiB, "1-2-3")
    assert empty[empty.index("-E") + 1] == "hash_seed=1-2-3" and "-d" not in empty


def test_clamp_script_quotes_and_skips_what_debugfs_cannot_name() -> None:
    script, skipped = assemble.clamp_script(iter(["/a b", '/q"x', "/n\nl"]), EPOCH)
    assert script.splitlines() == [
        f'sif "/a b" atime {EPOCH}',
        f'sif "/a b" ctime {EPOCH}',
        f'sif "/q""x" atime {EPOCH}',
        f'sif "/q""x" ctime {EPOCH}',
    ]
    assert skipped == ["/n\nl"]


def make_tree(root: Path, order: range) -> Path:
    (root / "etc" / "sub dir").mkdir(parents=True)
    for i in order:
        (root / "etc" / f"f{i}").write_text(f"{i}\n")
    (root / "etc" / "sub dir" / 'q"uote').write_text("x")
    os.symlink("f1", root / "etc" / "link")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    return root


@needs_e2fsprogs
async def test_ext4_is_the_same_from_trees_made_apart(tmp_path: Path) -> None:
    """Two trees with the same content made in another order and at other times (so other
    ctimes and atimes): the same filesystem bytes, e2fsck clean."""
    images = []
    for n, order in ((1, range(1, 60)), (2, range(59, 0, -1))):
        tree = make_tree(tmp_path / f"tree{n}", order)
        disk = tmp_path / f"{n}.raw"
        with open(disk, "wb") as fh:
            fh.truncate(201 * MiB)  # room for the 64 MiB journal
        seed = assemble.hash_seed(KEY)
        args = assemble.mkfs_args(tree, disk, ROOT_UUID, MiB, 200 * MiB, seed)
        await proc.run(args, env=repro.source_date_env(EPOCH))
        fs = assemble.partition(disk, MiB)
        await assemble.clamp_times(fs, tree, EPOCH, tmp_path)
        await proc.run(["tune2fs", "-c", "0", "-i", "0", fs], env=repro.source_date_env(EPOCH))
        await proc.run(["e2fsck", "-fn", fs])
        images.append(hashlib.sha256(disk.read_bytes()).hexdigest())
        await anyio.sleep(1.1)  # another second on the clock
    assert images[0] == images[1]
    stat = sh("debugfs", "-R", "stat /etc/f5", assemble.partition(tmp_path / "1.raw", MiB))
    assert "ctime: 0x6553f100" in stat and "atime: 0x6553f100" in stat
    assert "mtime: 0x5f5e1000" in stat  # the tree's own
    super_ = sh("dumpe2fs", "-h", assemble.partition(tmp_path / "1.raw", MiB))
    assert "Directory Hash Seed:      " + assemble.hash_seed(KEY) in super_


# --- the ESP ------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("mkfs.vfat") or not shutil.which("mcopy"), reason="mtools")
async def test_esp_is_the_same_seconds_apart(tmp_path: Path) -> None:
    src = tmp_path / "payload"
    images = []
    for n in (1, 2):
        src.write_bytes(b"x" * 5000)  # written anew: another mtime
        disk = tmp_path / f"{n}.raw"
        with open(disk, "wb") as fh:
            fh.truncate(40 * MiB)
        files = [bootloader.EspFile("EFI/BOOT/BOOTX64.EFI", src)]
        await bootloader.make_esp(disk, MiB, 34 * MiB, files, epoch=EPOCH, seed=KEY)
        images.append(disk.read_bytes())
        if n == 1:
            await anyio.sleep(2.1)  # FAT times count in two seconds
    assert images[0] == images[1]
    serial = bootloader.esp_serial(KEY)
    listing = sh("mdir", "-i", f"{tmp_path / '1.raw'}@@{MiB}", "::/EFI/BOOT")
    assert f"{serial[:4]}-{serial[4:]}".upper() in listing
    assert "2023-11-14" in listing  # the epoch, not the clock or the source's mtime


# --- conversions --------------------------------------------------------------------------


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(3 * MiB)
        fh.write(os.urandom(200_000))
    return path


async def qemu_convert(raw: Path, dest: Path, *options: str) -> Path:
    await proc.run(["qemu-img", "convert", "-q", "-f", "raw", *options, raw, dest])
    return dest


async def qemu_info(path: Path, fmt: str) -> dict[str, object]:
    out = await proc.run(["qemu-img", "info", "--output=json", "-f", fmt, path], capture=True)
    info: dict[str, object] = json.loads(out.text)
    return info


@needs_qemu_img
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
async def test_vhd_patch(tmp_path: Path, raw: Path, subformat: str) -> None:
    opts = ["-O", "vpc", "-o", f"subformat={subformat},force_size=on"]
    a = await qemu_convert(raw, tmp_path / "a.vhd", *opts)
    b = await qemu_convert(raw, tmp_path / "b.vhd", *opts)
    footer = a.read_bytes()[-512:]
    assert convert.vhd_checksum(footer) == struct.unpack_from(">I", footer, 64)[0]  # qemu's own
    unique = repro.seeded_uuid(KEY, "vhd-unique-id")
    for path in (a, b):
        convert.patch_vhd(path, EPOCH, unique)
    assert a.read_bytes() == b.read_bytes()
    data = a.read_bytes()
    footer = data[-512:]
    assert struct.unpack_from(">I", footer, 24)[0] == EPOCH - 946_684_800
    assert footer[68:84] == unique.bytes
    assert convert.vhd_checksum(footer) == struct.unpack_from(">I", footer, 64)[0]
    if subformat == "dynamic":
        assert data[:512] == footer
    info = await qemu_info(a, "vpc")
    assert info["virtual-size"] == 64 * MiB


def test_vhd_footer_patch_refuses_other_data() -> None:
    with pytest.raises(ValueError, match="VHD"):
        convert.patch_vhd_footer(bytes(512), EPOCH, uuid.uuid4())


@needs_qemu_img
async def test_vdi_patch(tmp_path: Path, raw: Path) -> None:
    a = await qemu_convert(raw, tmp_path / "a.vdi", "-O", "vdi")
    b = await qemu_convert(raw, tmp_path / "b.vdi", "-O", "vdi")
    image, modify = repro.seeded_uuid(KEY, "vdi-image"), repro.seeded_uuid(KEY, "vdi-modify")
    for path in (a, b):
        convert.patch_vdi(path, image, modify)
    assert a.read_bytes() == b.read_bytes()
    header = a.read_bytes()[:512]
    assert header[0x188:0x198] == image.bytes and header[0x198:0x1A8] == modify.bytes
    await proc.run(["qemu-img", "check", "-q", "-f", "vdi", a])
    with pytest.raises(ValueError, match="VDI"):
        convert.patch_vdi_header(bytes(512), image, modify)


@needs_qemu_img
async def test_vmdk_patch(tmp_path: Path, raw: Path) -> None:
    """Written under the published name in two folders: after the patch, the same bytes,
    and the descriptor names that file."""
    paths = []
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        dest = tmp_path / str(n) / "debian-bookworm-amd64.vmdk"
        opts = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
        paths.append(await qemu_convert(raw, dest, *opts))
    cid = convert.vmdk_cid(KEY)
    for path in paths:
        convert.patch_vmdk(path, cid)
    a, b = (p.read_bytes() for p in paths)
    assert a == b
    assert f"CID={cid:08x}\n".encode() in a[512:2048]
    assert b'SPARSE "debian-bookworm-amd64.vmdk"' in a[512:2048]
    await proc.run(["qemu-img", "check", "-q", "-f", "vmdk", paths[0]])
    info = await qemu_info(paths[0], "vmdk")
    assert info["virtual-size"] == 64 * MiB


def test_vmdk_descriptor_patch() -> None:
    area = b"# Disk DescriptorFile\nversion=1\nCID=1a2b\nparentCID=ffffffff\n".ljust(512, b"\0")
    out = convert.patch_vmdk_descriptor(area, 0xDEADBEEF)
    assert len(out) == 512
    assert out.startswith(b"# Disk DescriptorFile\nversion=1\nCID=deadbeef\nparentCID=ffffffff\n")
    assert out.rstrip(b"\0").endswith(b"ffffffff\n")
    with pytest.raises(ValueError, match="CID"):
        convert.patch_vmdk_descriptor(b"version=1\n".ljust(512, b"\0"), 1)
    assert convert.vmdk_cid(KEY) not in (0xFFFFFFFF, 0xFFFFFFFE)


@needs_qemu_img
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
async def test_qcow2_is_the_same_twice(tmp_path: Path, raw: Path, compression: str) -> None:
    args = convert.convert_args("qcow2", compression, None, threads=2)
    a = await qemu_convert(raw, tmp_path / "a.qcow2", *args)
    b = await qemu_convert(raw, tmp_path / "b.qcow2", *args)
    assert a.read_bytes() == b.read_bytes()


@needs_e2fsprogs
async def test_clamp_times_names_files_that_are_not_utf8(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / os.fsdecode(b"caf\xe9")).write_text("x")
    disk = tmp_path / "d.raw"
    with open(disk, "wb") as fh:
        fh.truncate(200 * MiB)
    args = assemble.mkfs_args(tree, disk, ROOT_UUID, 0, 200 * MiB, assemble.hash_seed(KEY))
    await proc.run(args, env=repro.source_date_env(EPOCH))
    await assemble.clamp_times(str(disk), tree, EPOCH, tmp_path)
    listing = (await proc.run(["debugfs", "-R", "ls -l /", disk], capture=True)).stdout
    assert b" 12 " in listing and b"caf" in listing  # the only file: the first inode
    stat = (await proc.run(["debugfs", "-R", "stat <12>", disk], capture=True)).text
    assert "ctime: 0x6553f100" in stat and "atime: 0x6553f100" in stat


@pytest.mark.parametrize("compression", ["zlib", "zstd", "none"])
async def test_qcow2_is_written_in_order(tmp_path: Path, compression: str) -> None:
    """factory's qcow2 (several reads in flight, -m 16) has its clusters where a writer
    that handles one request at a time (-m 1) puts them, byte for byte; with -W the
    clusters land as writes complete (this data gives other bytes on every -W run)."""
    raw = tmp_path / "scattered.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * MiB)
        for offset in range(0, 64 * MiB, 256 * 1024):
            fh.seek(offset)
            fh.write(os.urandom(65536))
    ours = convert.convert_args("qcow2", compression, None, threads=2)
    assert "-m" in ours and ours[ours.index("-m") + 1] != "1"
    one = [*ours]
    one[one.index("-m") + 1] = "1"
    a = await qemu_convert(raw, tmp_path / "ours.qcow2", *ours)
    b = await qemu_convert(raw, tmp_path / "one.qcow2", *one)
    assert qcow2_clusters(a) == qcow2_clusters(b)
    assert len(qcow2_clusters(a)) >= 256
    assert a.read_bytes() == b.read_bytes()
