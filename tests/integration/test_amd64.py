"""The amd64 pipeline end to end, on one real build shared by every test here.

rootfs (mmdebstrap) → finalise (chroot, hooks) → assemble (sfdisk, mkfs -d, grub) →
every format; then each output is read by a program that uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import factory, qcow2_clusters, sha256
from tests.integration.conftest import CACHE, DATA, Build, run_matrix

# A session build (trees cold: minutes) counts against the first test that uses it.
pytestmark = pytest.mark.timeout(1800)


CELL = "debian-bookworm-amd64"
DISKS = {"raw": "raw", "qcow2": "qcow2", "vhd": "vpc", "vmdk": "vmdk", "vdi": "vdi"}


def sh(*args: str | os.PathLike[str], input: str | None = None) -> str:
    return subprocess.run(
        list(map(str, args)), capture_output=True, text=True, check=True, input=input
    ).stdout


def fs_of(build: Build) -> str:
    """The root filesystem inside the raw disk, as e2fsprogs name it."""
    offset = build.job(f"assemble:{CELL}")["info"]["root_offset"]
    return f"{build.artifact('raw')}?offset={offset}"


def debugfs(build: Build, request: str) -> str:
    return sh("debugfs", "-R", request, fs_of(build))


def finalised_tree(build: Build) -> Path:
    return CACHE / "trees" / build.job(f"finalise:{CELL}")["key"] / "root"


def test_one_tree_serves_every_format(amd64: Build) -> None:
    kinds = [j["kind"] for j in amd64.report["jobs"]]
    assert kinds.count("rootfs") == 1
    assert kinds.count("finalise") == 1
    assert {j["status"] for j in amd64.report["jobs"]} == {"done"}
    formats = sorted(a["format"] for a in amd64.report["artifacts"])
    assert formats == sorted(
        ["raw", "qcow2", "vhd", "vmdk", "vdi", "tar", "tgz", "squashfs", "aci", "docker"]
    )
    plan = json.loads(factory("plan", DATA / "amd64.toml", "--json", check=True).stdout)
    assert [j["id"] for j in plan["jobs"]] == [j["id"] for j in amd64.report["jobs"]]
    assert [j["key"] for j in plan["jobs"]] == [j["key"] for j in amd64.report["jobs"]]


def test_checksums_match_the_files(amd64: Build) -> None:
    sums = (amd64.out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 10
    for line in sums:
        digest, path = line.split("  ")
        artifact = amd64.out / path
        h = hashlib.sha256()
        with open(artifact, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        assert h.hexdigest() == digest, path
        assert (
            artifact.parent / f"{artifact.name}.sha256"
        ).read_text() == f"{digest}  {artifact.name}\n"
    leftovers = [p for p in amd64.out.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert not (amd64.out / ".work").exists()


@pytest.mark.parametrize("fmt", DISKS)
def test_disk_formats_read_back_exactly(amd64: Build, fmt: str) -> None:
    raw_size = amd64.artifact("raw").stat().st_size
    info = json.loads(
        sh("qemu-img", "info", "--output=json", "-f", DISKS[fmt], amd64.artifact(fmt))
    )
    assert info["format"] == DISKS[fmt]
    assert info["virtual-size"] == raw_size
    if fmt in ("qcow2", "vmdk", "vdi"):
        sh("qemu-img", "check", "-f", DISKS[fmt], amd64.artifact(fmt))
    if fmt == "qcow2":
        assert info["format-specific"]["data"]["compression-type"] == "zstd"
    if fmt == "vmdk":
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    if fmt == "raw":
        # sparse: the free space of the filesystem takes no room
        assert amd64.artifact("raw").stat().st_blocks * 512 < raw_size


def zero_blocks_stored(path: Path, block: int = 4096) -> int:
    """How many bytes of the file's allocated data are whole blocks of zeros."""
    zero, found = bytes(block), 0
    with open(path, "rb") as fh:
        end, pos = os.fstat(fh.fileno()).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(fh.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            stop = os.lseek(fh.fileno(), pos, os.SEEK_HOLE)
            fh.seek(pos)
            while pos < stop:
                found += block if fh.read(block) == zero else 0
                pos += block
    return found


def test_raw_stores_no_zeros_but_the_journal(amd64: Build) -> None:
    """Free space is holes; the only zeros stored are the journal's, on purpose."""
    assert zero_blocks_stored(amd64.artifact("raw")) <= 65 * 1024 * 1024


def test_partition_table_and_filesystem(amd64: Build) -> None:
    table = json.loads(sh("sfdisk", "--json", amd64.artifact("raw")))["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == 2048 and part["type"] == "83" and part.get("bootable") is True
    assert part["start"] + part["size"] == amd64.artifact("raw").stat().st_size // 512
    sh("e2fsck", "-fn", fs_of(amd64))
    header = sh("dumpe2fs", "-h", fs_of(amd64))
    uuid = next(
        line.split()[-1] for line in header.splitlines() if line.startswith("Filesystem UUID:")
    )
    assert "Maximum mount count:      -1" in header
    fstab = debugfs(amd64, "cat /etc/fstab")
    assert fstab.startswith(f"UUID={uuid} / ext4 ")
    grub = debugfs(amd64, "cat /boot/grub/grub.cfg")
    assert f"root=UUID={uuid}" in grub and "console=ttyS0,115200" in grub
    assert "/dev/loop" not in grub
    # boot code: grub's boot.img in the MBR, core.img right after it
    with open(amd64.artifact("raw"), "rb") as fh:
        mbr = fh.read(1024)
    assert mbr[510:512] == b"\x55\xaa"
    assert b"GRUB" in mbr[:440]


def test_size_is_explained(amd64: Build) -> None:
    info = amd64.job(f"assemble:{CELL}")["info"]
    assert "extra_size" in info["size_reason"]
    assert info["virtual_size"] == amd64.artifact("raw").stat().st_size
    assert info["virtual_size"] % (1024 * 1024) == 0


def test_finalise_left_a_clean_identity(amd64: Build) -> None:
    assert debugfs(amd64, "cat /etc/machine-id") == ""
    listing = debugfs(amd64, "ls -p /etc")
    assert "/resolv.conf/" not in listing
    dev = [line.split("/")[5] for line in debugfs(amd64, "ls -p /dev").splitlines() if line]
    assert sorted(dev) == [".", ".."]
    boot = debugfs(amd64, "ls -p /boot")
    assert boot.count("/initrd.img-") == 1
    manifest = json.loads(debugfs(amd64, f"cat /etc/factory/manifests/{CELL}.json"))
    beside = json.loads((amd64.out / CELL / f"{CELL}.manifest.json").read_text())
    assert manifest == beside
    packages = {p["package"]: p for p in manifest}
    assert packages["linux-image-amd64"]["status"] == "installed"
    assert packages["linux-image-amd64"]["arch"] == "amd64"


def test_initramfs_built_once(amd64: Build) -> None:
    """Once in finalise, never while packages install (kernel postinst, trigger)."""
    rootfs_log = (CACHE / "trees" / amd64.job(f"rootfs:{CELL}")["key"] / "build.log").read_text()
    finalise_log = (finalised_tree(amd64).parent / "build.log").read_text()
    assert "update-initramfs: deferred to finalise" in rootfs_log
    assert "update-initramfs: Generating" not in rootfs_log
    assert finalise_log.count("update-initramfs: Generating /boot/initrd.img") == 1


def test_hooks_ran_in_order_and_place(amd64: Build) -> None:
    """finalise.d inside the chroot, then cleanup.d on the host, as the tree's build log
    has them; each with diskimage-builder's variables, as the image has what they wrote."""
    log = (finalised_tree(amd64).parent / "build.log").read_text().splitlines()
    commands = [line for line in log if line.startswith("$ ")]
    (inside,) = [
        i for i, c in enumerate(commands) if c.endswith(" /tmp/factory-hooks/marker/10-marker")
    ]
    (outside,) = [i for i, c in enumerate(commands) if c.endswith("/marker/cleanup.d/10-metadata")]
    assert inside < outside
    assert " chroot " in commands[inside] and " chroot " not in commands[outside]
    env = debugfs(amd64, "cat /etc/factory-test/finalise.env")
    assert env.splitlines() == [
        "TARGET_ROOT=/",
        "ARCH=amd64",
        "DIB_RELEASE=bookworm",
        "DISTRO_NAME=debian",
        f"IMAGE_NAME={CELL}",
    ]
    assert debugfs(amd64, "cat /etc/factory-test/cleanup") == "cleanup ran\n"


def test_image_keeps_owners_modes_links_and_xattrs(amd64: Build) -> None:
    owned = debugfs(amd64, "stat /etc/factory-test/owned")
    assert "User:  4242   Group:  4343" in owned
    assert "Mode:  04750" in owned
    assert "Links: 2" in owned
    assert "Type: FIFO" in debugfs(amd64, "stat /etc/factory-test/fifo")
    assert 'Fast link dest: "owned"' in debugfs(amd64, "stat /etc/factory-test/symlink")
    xattrs = debugfs(amd64, "ea_list /etc/factory-test/acl")
    assert 'user.factory (4) = "kept"' in xattrs
    assert "system.posix_acl_access" in xattrs


def test_image_files_match_the_tree(amd64: Build, tmp_path: Path) -> None:
    """Every directory, file and link of the finalised tree is in the image, alike."""
    dump = tmp_path / "dump"
    dump.mkdir()
    sh("debugfs", "-R", f"rdump / {dump}", fs_of(amd64))
    tree = finalised_tree(amd64)

    def walk(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
        out = {}
        for dirpath, dirs, files in os.walk(root):
            for name in (*dirs, *files):
                p = Path(dirpath, name)
                st = p.lstat()
                if not (
                    stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)
                ):
                    continue  # rdump writes only files, folders and links
                link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, size, link)
        return out

    expected, found = walk(tree), walk(dump / "")
    found.pop("lost+found", None)
    assert len(expected) > 10000
    missing = sorted(set(expected) - set(found))[:5]

    # rdump chowns after chmod, which clears setuid/setgid: those bits are read with stat.
    def plain(meta: tuple[int, int, int, int, str]) -> tuple[int, int, int, int, str]:
        return (meta[0] & ~0o7000, *meta[1:])

    different = [k for k in expected if k in found and plain(expected[k]) != found[k]]
    assert missing == [] and different == [], (missing, different[:5])
    special = [k for k, v in expected.items() if v[0] & 0o7000]
    assert "etc/factory-test/owned" in special
    for path in special:
        mode = expected[path][0] & 0o7777
        assert f"Mode:  {mode:05o}" in debugfs(amd64, f"stat /{path}"), path


def test_tar_keeps_numeric_owners_and_acls(amd64: Build, tmp_path: Path) -> None:
    listing = sh("tar", "--numeric-owner", "-tvf", amd64.artifact("tar"))
    owned = next(line for line in listing.splitlines() if line.endswith("etc/factory-test/owned"))
    assert owned.split()[:2] == ["-rwsr-x---", "4242/4343"]
    sh(
        "tar",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        "-C",
        tmp_path,
        "-xf",
        amd64.artifact("tar"),
        "./etc/factory-test/acl",
    )
    assert "user:4242:r--" in sh("getfacl", "-n", tmp_path / "etc/factory-test/acl")
    tgz = sh("tar", "-tzf", amd64.artifact("tgz"))
    assert "./etc/factory-test/owned" in tgz.splitlines()


def test_squashfs_lists_the_tree(amd64: Build) -> None:
    listing = sh("unsquashfs", "-l", amd64.artifact("squashfs"))
    assert "squashfs-root/etc/factory-test/owned" in listing.splitlines()
    assert "squashfs-root/boot/grub/grub.cfg" in listing.splitlines()


def test_aci_manifest_and_rootfs(amd64: Build) -> None:
    manifest = json.loads(sh("tar", "-xOf", amd64.artifact("aci"), "manifest"))
    assert manifest["acKind"] == "ImageManifest"
    assert manifest["acVersion"].count(".") == 2
    assert manifest["name"] == CELL
    assert {"name": "os", "value": "linux"} in manifest["labels"]
    assert {"name": "arch", "value": "amd64"} in manifest["labels"]
    names = sh("tar", "-tf", amd64.artifact("aci")).splitlines()
    assert "rootfs/etc/fstab" in names
    assert all(n == "manifest" or n.startswith("rootfs") for n in names)


def test_docker_archive_is_readable_by_skopeo(amd64: Build) -> None:
    # The tag the pack stage writes when the matrix names none: NAME/FAMILY:RELEASE-ARCH.
    tag = "itest/debian:bookworm-amd64"
    archive = amd64.artifact("docker")
    (image,) = json.loads(sh("tar", "-xOf", archive, "manifest.json"))
    assert image["RepoTags"] == [tag]
    assert len(image["Layers"]) == 1
    # skopeo finds the image by that tag (a tag the archive lacks is an error).
    info = json.loads(sh("skopeo", "inspect", f"docker-archive:{archive}:{tag}"))
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert len(info["Layers"]) == 1
    missing = subprocess.run(
        ["skopeo", "inspect", f"docker-archive:{archive}:itest/debian:other"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0


def test_qcow2_clusters_are_where_an_in_order_writer_puts_them(
    amd64: Build, tmp_path: Path
) -> None:
    """Written in order (no -W): each cluster of the qcow2 is where qemu-img puts it when it
    writes one request at a time (-m 1) from the same raw disk with the same options, so
    the file is the same every run. (Host offsets do not simply grow with guest offsets:
    qcow2 refills clusters it freed, as when its refcount table grows.) Out of order (-W),
    clusters land as their writes complete: almost every one elsewhere."""
    log = (amd64.out / amd64.job(f"convert:{CELL}:qcow2")["log"]).read_text()
    (command,) = [line for line in log.splitlines() if line.startswith("$ qemu-img convert ")]
    *options, _raw, _dest = shlex.split(command.removeprefix("$ "))
    assert "-W" not in options
    if "-m" in options:
        options[options.index("-m") + 1] = "1"
    one_at_a_time = tmp_path / "one-at-a-time.qcow2"
    sh(*options, amd64.artifact("raw"), one_at_a_time)
    clusters = qcow2_clusters(amd64.artifact("qcow2"))
    assert len(clusters) > 1000  # the filesystem's data, not an empty disk
    assert clusters == qcow2_clusters(one_at_a_time)
    assert sha256(amd64.artifact("qcow2")) == sha256(one_at_a_time)


@pytest.mark.parametrize("fmt", ["qcow2", "vhd", "vmdk"])
def test_disk_boots_to_login(amd64: Build, fmt: str, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    result = factory("boot", amd64.artifact(fmt), "--timeout", "300", "--log", console, timeout=400)
    assert result.returncode == 0, result.stderr + console.read_text()[-2000:]
    assert "login prompt after" in result.stdout
    assert "Debian GNU/Linux 12" in console.read_text()


def test_second_run_takes_trees_from_cache(amd64: Build, tmp_path: Path) -> None:
    again = run_matrix(DATA / "amd64.toml", tmp_path / "out", "--only", "*:raw")
    assert again.returncode == 0, again.stderr
    assert [j["kind"] for j in again.report["jobs"]] == [
        "rootfs",
        "finalise",
        "assemble",
        "publish",
    ]
    assert again.job(f"rootfs:{CELL}")["info"]["cached"] is True
    assert again.job(f"finalise:{CELL}")["info"]["cached"] is True
    assert again.job(f"rootfs:{CELL}")["key"] == amd64.job(f"rootfs:{CELL}")["key"]


def test_failing_hook_fails_its_cell_with_its_output(tmp_path: Path) -> None:
    failed = run_matrix(DATA / "failing-hook.toml", tmp_path / "out")
    assert failed.returncode == 1
    job = failed.job(f"finalise:{CELL}")
    assert job["status"] == "failed"
    assert "hook fails/finalise.d/50-fail exited 3" in job["error"]
    assert any("hook says: cannot go on" in line for line in job["tail"])
    skipped = [j for j in failed.report["jobs"] if j["status"] == "skipped"]
    assert {j["kind"] for j in skipped} == {"assemble", "pack", "publish"}
    assert failed.report["artifacts"] == []
    assert not list((tmp_path / "out").glob(f"{CELL}/*.raw"))


def test_run_with_boot_test_boots_the_disk(tmp_path: Path) -> None:
    """`factory run --boot-test` boots the raw disk it built and reports the time to login."""
    booted = run_matrix(DATA / "amd64.toml", tmp_path / "out", "--boot-test", "--only", "boot:*")
    assert booted.returncode == 0, booted.stderr + json.dumps(booted.report.get("jobs"))
    job = booted.job(f"boot:{CELL}")
    assert job["status"] == "done"
    assert job["info"]["login_after"] > 0  # reported; the console below says it booted
    log = (tmp_path / "out" / job["log"]).read_text()
    assert "Debian GNU/Linux 12" in log and "login:" in log


def test_boot_probes_kvm_once_and_says_when_it_falls_back(amd64: Build, tmp_path: Path) -> None:
    """A host whose /dev/kvm cannot run the guest kernel boots by TCG and says so; the
    verdict is kept, so the next boot does not probe again (its log, which has every
    command the boot ran, has no probe in it). The second boot need not reach a login
    prompt to show that: it is cut short."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm here: nothing to probe")
    cache = tmp_path / "cache"
    runs = []
    for n, limit in ((1, "300"), (2, "15")):
        log = tmp_path / f"console-{n}.log"
        result = factory(
            "boot", amd64.artifact("raw"), "--cache", cache, "--log", log, "--timeout", limit,
            timeout=400,
        )  # fmt: skip
        assert result.returncode == (0 if n == 1 else 1), result.stderr
        commands = [line for line in log.read_text().splitlines() if line.startswith("$ ")]
        runs.append((result.stderr, [c for c in commands if "qemu-system" in c]))
    (works,) = json.loads((cache / "kvm.json").read_text()).values()
    for stderr, qemus in runs:
        assert ("using TCG" in stderr) == (not works)
        assert qemus[-1].count("-accel kvm" if works else "-accel tcg") == 1  # the boot
    first, second = (qemus for _, qemus in runs)
    assert len(first) == 2 and "-accel kvm" in first[0]  # the probe, then the boot
    assert len(second) == 1  # the boot alone: the kept verdict, no probe
