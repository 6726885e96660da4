"""The disk side of reproducible builds, end to end through the real stage code: one small
tree (the host's grub modules and a few files, no Debian tree) assembled twice, seconds
apart and into different folders, in both amd64 layouts, then converted to every disk
format; each file must have the same sha256 both times."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path

import anyio
import pytest

from factory import plan
from factory.cache import Cache
from factory.layouts import LAYOUTS
from factory.plan import Job
from factory.results import Output
from factory.stages import Context, Workspace, assemble, convert

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds images: needs root"),
    pytest.mark.skipif(
        not Path("/usr/lib/grub/i386-pc").is_dir() or not Path("/usr/lib/grub/x86_64-efi").is_dir(),
        reason="the host's grub modules (grub-pc-bin, grub-efi-amd64-bin)",
    ),
]

CELL = "debian-bookworm-amd64"
EPOCH = 1_700_000_000
ROOT_UUID = "6d53d9fc-503d-5842-9fe5-2accc67a7fcc"
FORMATS = {"qcow2": "qcow2", "vhd": "vpc", "vmdk": "vmdk", "vdi": "vdi"}


def small_tree(root: Path) -> Path:
    """grub's modules for both firmwares and a few files; the times are the clock's."""
    for platform in ("i386-pc", "x86_64-efi"):
        shutil.copytree(f"/usr/lib/grub/{platform}", root / "usr/lib/grub" / platform)
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.cfg").write_text("linux /vmlinuz root=UUID=x\n")
    (root / "etc").mkdir()
    for i in range(50):
        (root / "etc" / f"file{i}").write_text(f"{i}\n" * i)
    os.symlink("file1", root / "etc" / "link")
    return root


def job(kind: str, jid: str, key: str, **params: object) -> Job:
    return Job(id=jid, kind=kind, cell=CELL, arch="amd64", deps=(), key=key, params=params)  # type: ignore[arg-type]


def digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


async def build(tree: Path, out: Path, layout: str) -> dict[str, str]:
    """The stages as a run calls them: assemble, then each conversion."""
    ws = Workspace(out=out, cache=Cache(out / "cache"), cpus=2)
    finalise = {f"finalise:{CELL}": Output(tree)}
    made = await assemble.run(
        Context(
            job(
                "assemble",
                f"assemble:{CELL}:{layout}",
                f"assemble-{layout}-key",
                family="debian",
                arch="amd64",
                layout=LAYOUTS[layout].model_dump(mode="json"),
                boot=list(LAYOUTS[layout].boot_methods("amd64")),
                size=None,
                extra_size=128 * 1024 * 1024,  # mkfs wants the fs at least twice the journal
                filesystem="ext4",
                root_uuid=ROOT_UUID,
                epoch=EPOCH,
            ),
            finalise,
            ws,
            lambda _: None,
        )
    )
    assert made.path is not None
    sums = {"raw": digest(made.path)}
    for fmt, qemu in FORMATS.items():
        converted = await convert.run(
            Context(
                job(
                    "convert",
                    f"convert:{CELL}:{fmt}-{layout}",
                    f"convert-{fmt}-{layout}-key",
                    format=fmt,
                    qemu=qemu,
                    compression="zlib" if fmt == "qcow2" else None,
                    vhd_subformat="dynamic" if fmt == "vhd" else None,
                    epoch=EPOCH,
                    artifact=f"{CELL}-{layout}.{fmt}",
                ),
                {f"assemble:{CELL}:{layout}": made},
                ws,
                lambda _: None,
            )
        )
        assert converted.path is not None
        sums[fmt] = digest(converted.path)
    return sums


@pytest.mark.parametrize("layout", ["mbr", "gpt-efi"])
async def test_two_builds_give_the_same_bytes(tmp_path: Path, layout: str) -> None:
    tree = small_tree(tmp_path / "tree")
    first = await build(tree, tmp_path / "out1", layout)
    await anyio.sleep(2.1)  # FAT and VHD times would move on
    # Another atime and ctime, as a tree read again or made again has; mtimes kept.
    for path in (tree / "etc").iterdir():
        mtime = os.lstat(path).st_mtime_ns
        os.utime(path, ns=(time.time_ns(), mtime), follow_symlinks=False)
    second = await build(tree, tmp_path / "out2", layout)
    assert first == second
    assert set(first) == {"raw", *FORMATS}
    vmdk = (tmp_path / "out1" / ".work" / CELL / layout / "disk.vmdk").read_bytes()[:4096]
    assert f'SPARSE "{CELL}-{layout}.vmdk"'.encode() in vmdk


# The user's partitions of every filesystem, small; the UUIDs as the plan would give them.
VOLUMES = [
    ("/boot", "ext4", 80), ("/", "ext4", None), ("/var", "btrfs", 200), (None, "swap", 16),
    ("/srv", "vfat", 40), ("/opt", "xfs", 300),
]  # fmt: skip


async def build_partitions(
    tree: Path, out: Path, loop: bool = False, said: list[str] | None = None
) -> tuple[Path, list[dict[str, object]]]:
    volumes = [
        {
            "mountpoint": point,
            "filesystem": fs,
            "size": size and size * 1024 * 1024,
            "uuid": ROOT_UUID
            if point == "/"
            else plan.fs_uuid(fs, uuid.uuid5(uuid.NAMESPACE_URL, str(point))),
        }
        for point, fs, size in VOLUMES
    ]
    made = await assemble.run(
        Context(
            job(
                "assemble",
                f"assemble:{CELL}:gpt-efi",
                "assemble-partitions-key",
                family="debian",
                arch="amd64",
                layout=LAYOUTS["gpt-efi"].model_dump(mode="json"),
                boot=list(LAYOUTS["gpt-efi"].boot_methods("amd64")),
                size=None,
                extra_size=128 * 1024 * 1024,
                filesystem="ext4",
                root_uuid=ROOT_UUID,
                volumes=volumes,
                epoch=EPOCH,
            ),
            {f"finalise:{CELL}": Output(tree)},
            Workspace(out=out, cache=Cache(out / "cache"), cpus=2, loop=loop),
            (said if said is not None else []).append,
        )
    )
    assert made.path is not None
    return made.path, made.info["partitions"]


def part_digest(disk: Path, part: dict[str, object]) -> str:
    with open(disk, "rb") as fh:
        fh.seek(int(str(part["offset"])))
        return hashlib.sha256(fh.read(int(str(part["size"])))).hexdigest()


async def test_user_partitions_ext4_vfat_swap_and_the_table_give_the_same_bytes(
    tmp_path: Path,
) -> None:
    """ext4, vfat and swap partitions and the partition table are the same twice; btrfs
    and XFS are made too but stamp their own times and ids (README: Partitions)."""
    tree = small_tree(tmp_path / "tree")
    for folder in ("var/lib", "srv", "opt"):
        (tree / folder).mkdir(parents=True, exist_ok=True)
        (tree / folder / "f").write_text("x\n" * 100)
    first, parts = await build_partitions(tree, tmp_path / "out1")
    await anyio.sleep(2.1)
    second, again = await build_partitions(tree, tmp_path / "out2")
    assert parts == again
    for p in parts:
        if p["filesystem"] in ("ext4", "vfat", "swap"):
            assert part_digest(first, p) == part_digest(second, p), p["mountpoint"]
    head = int(str(parts[0]["offset"]))  # the GPT, the protective MBR and the boot code
    assert part_digest(first, {"offset": 0, "size": head}) == part_digest(
        second, {"offset": 0, "size": head}
    )


@pytest.mark.usefixtures("loop_devices_alone")
async def test_user_partitions_through_loop_devices(tmp_path: Path) -> None:
    """--loop: ext4, btrfs and XFS made empty in their own files, mounted, filled by cp -a;
    each says so, and blkid finds every filesystem with its planned UUID."""
    tree = small_tree(tmp_path / "tree")
    for folder in ("var/lib", "opt"):
        (tree / folder).mkdir(parents=True)
        (tree / folder / "f").write_text("x\n" * 100)
    os.link(tree / "var/lib/f", tree / "var/lib/g")  # a hard link kept by cp -a
    said: list[str] = []
    disk, parts = await build_partitions(tree, tmp_path / "out", loop=True, said=said)
    assert "/: ext4 filled through a loop device and a mount (--loop)" in said
    assert "/var: btrfs filled through a loop device and a mount (--loop)" in said
    why = "mkfs.xfs cannot fill a filesystem from a folder"
    assert f"/opt: xfs filled through a loop device and a mount ({why})" in said
    for p in parts:
        probe = (
            await anyio.run_process(
                ["blkid", "-p", "-o", "export", "-O", str(p["offset"]), "-S", str(p["size"]), disk]
            )
        ).stdout.decode()
        assert f"TYPE={p['filesystem']}" in probe and f"UUID={p['uuid']}" in probe, probe
