"""The tree side is reproducible: the pack makers give the same bytes for the same tree
whatever order it was written in, when (mtimes after the epoch) and where (OUT) it is
packed and on how many threads; finalise clamps the tree's times, drops what differs
between builds and runs the chroot's commands on the cell's clock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from factory import distros
from factory.cache import Cache
from factory.distros import debian
from factory.plan import Job
from factory.stages import Context, Workspace, chroot, finalise, pack

EPOCH = 1_700_000_000
TOOLS = {
    "tar": ["tar"],
    "tgz": ["tar", "pigz"],
    "squashfs": ["mksquashfs", "getfattr"],
    "aci": ["tar"],
    "docker": ["tar"],
}


def _xattrs_work(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


def make_tree(root: Path, *, reverse: bool, newer: int, xattrs_reversed: bool = False) -> Path:
    """A small tree with every kind of entry pack must carry. `reverse` writes it in the
    other order (so directory order differs); `newer` seconds after the epoch is the
    mtime of the entries the 'build' touched; `xattrs_reversed` sets a file's two xattrs
    in the other order (the order tar stores them in)."""
    root.mkdir(parents=True)
    files = {f"etc/f{i:02d}": f"file {i}\n" for i in range(12)}
    files |= {"usr/bin/tool": "#!/bin/sh\n", "var/log/empty": "", "zz/deep/a/b": "b\n"}
    (root / "usr/lib").mkdir(parents=True)
    items = sorted(files.items(), reverse=reverse)
    for rel, text in items:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    with open(root / "usr/lib/big", "wb") as big:  # several blocks for pigz and mksquashfs
        for i in range(40_000):
            big.write(f"line {i} {i * 7919 % 104729}\n".encode())
    with open(root / "var/log/sparse", "wb") as sparse:  # a hole, then data
        sparse.truncate(1 << 20)
        sparse.seek(500_000)
        sparse.write(b"data after a hole\n")
    os.chmod(root / "usr/bin/tool", 0o755)
    os.link(root / "etc/f03", root / "usr/hardlink")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/dangling").symlink_to("/nowhere")
    attrs = [("user.b", b"2"), ("user.a", b"1")]
    for name, value in attrs if xattrs_reversed else attrs[::-1]:
        os.setxattr(root / "etc/f01", name, value)
    old = (EPOCH - 86400) * 1_000_000_000
    build = (EPOCH + newer) * 1_000_000_000
    for top, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            os.utime(Path(top) / name, ns=(build, build), follow_symlinks=False)
    os.utime(root / "etc/f00", ns=(old, old))  # a packaged file: older than the epoch
    os.utime(root, ns=(build, build))
    return root


def pack_ctx(out: Path, fmt: str, cpus: int) -> Context:
    job = Job(
        id=f"pack:tiny:{fmt}",
        kind="pack",
        cell="tiny",
        arch="amd64",
        deps=("finalise:tiny",),
        key="0" * 64,
        params={
            "format": fmt,
            "arch": "amd64",
            "image_name": "tiny",
            "docker_tag": "t/t:1",
            "epoch": EPOCH,
        },
    )
    return Context(job, {}, Workspace(out, Cache(out / "cache"), cpus=cpus), lambda _: None)


def make(tree: Path, out: Path, fmt: str, cpus: int) -> bytes:
    dest = out / f"tree.{fmt}"
    out.mkdir(parents=True)
    anyio.run(pack.MAKERS[fmt], pack_ctx(out, fmt, cpus), tree, dest, pack._Made())
    return dest.read_bytes()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    if not _xattrs_work(tmp_path):
        pytest.skip("no user xattrs on the test filesystem")
    a = make_tree(tmp_path / "a" / "tree", reverse=False, newer=1000)
    b = make_tree(tmp_path / "b" / "elsewhere", reverse=True, newer=999_999)
    return a, b


@pytest.mark.parametrize("fmt", sorted(pack.MAKERS))
def test_pack_makers_give_the_same_bytes(
    fmt: str, trees: tuple[Path, Path], tmp_path: Path
) -> None:
    missing = [t for t in TOOLS[fmt] if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    a, b = trees
    first = make(a, tmp_path / "out1", fmt, cpus=1)
    second = make(b, tmp_path / "out2", fmt, cpus=2)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()


def test_tar_clamps_mtimes_and_keeps_older_ones(trees: tuple[Path, Path], tmp_path: Path) -> None:
    make(trees[0], tmp_path / "out", "tar", cpus=1)
    with tarfile.open(tmp_path / "out" / "tree.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        names = [m.name for m in tf.getmembers()]
        sparse = tf.extractfile("./var/log/sparse")
        assert sparse is not None and sparse.read() == (trees[0] / "var/log/sparse").read_bytes()
    assert members["./etc/f00"].mtime == EPOCH - 86400
    assert members["./bin"].mtime == EPOCH and members["./bin"].issym()
    assert members["./usr/hardlink"].islnk() or members["./etc/f03"].islnk()
    assert members["./etc/f01"].pax_headers.get("SCHILY.xattr.user.a") == "1"
    assert all(m.uid == os.geteuid() for m in members.values())
    assert not any("atime" in m.pax_headers or "ctime" in m.pax_headers for m in members.values())
    assert names == sorted(names, key=lambda n: n.split("/"))


def test_docker_config_is_created_at_the_epoch(trees: tuple[Path, Path], tmp_path: Path) -> None:
    make(trees[0], tmp_path / "out", "docker", cpus=1)
    with tarfile.open(tmp_path / "out" / "tree.docker") as tf:
        (entry,) = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tf.extractfile(entry["Config"]))  # type: ignore[arg-type]
        assert {m.mtime for m in tf.getmembers()} == {EPOCH}
    assert config["created"] == "2023-11-14T22:13:20Z" == pack.rfc3339(EPOCH)
    assert config["history"][0]["created"] == config["created"]


def test_gzip_and_squashfs_are_pinned() -> None:
    assert pack.gzip_program(2).split()[:2] == ["pigz", "-n"]
    assert pack.gzip_program(1).endswith("-p 2")  # -p 1 gives other bytes
    assert pack.mksquashfs_env(EPOCH) == {"SOURCE_DATE_EPOCH": str(EPOCH)}
    args = pack.tar_tree(Path("/t"), Path("/o.tar"), EPOCH)
    assert {"--sort=name", f"--mtime=@{EPOCH}", "--clamp-mtime", "--numeric-owner"} <= set(args)
    assert "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime" in args


def test_normalise_tree_clamps_mtimes(tmp_path: Path) -> None:
    if not _xattrs_work(tmp_path):
        pytest.skip("no user xattrs on the test filesystem")
    tree = make_tree(tmp_path / "t", reverse=False, newer=5)
    assert finalise.normalise_tree(tree, EPOCH) > 0
    for top, dirs, names in os.walk(tree):
        for name in [*dirs, *names]:
            st = os.lstat(Path(top) / name)
            assert st.st_mtime_ns <= EPOCH * 1_000_000_000, name
    assert os.lstat(tree / "bin").st_mtime == EPOCH
    assert tree.stat().st_mtime == EPOCH
    assert (tree / "etc/f00").stat().st_mtime == EPOCH - 86400
    assert finalise.normalise_tree(tree, EPOCH) == 0


def test_normalise_tree_sorts_xattrs_for_tar(tmp_path: Path) -> None:
    """tar stores xattrs in the order they were set: finalise puts them in name order."""
    if not _xattrs_work(tmp_path):
        pytest.skip("no user xattrs on the test filesystem")
    a = make_tree(tmp_path / "a", reverse=False, newer=5)
    b = make_tree(tmp_path / "b", reverse=False, newer=5, xattrs_reversed=True)
    assert make(a, tmp_path / "o1", "tar", 1) != make(b, tmp_path / "o2", "tar", 1)
    for tree in (a, b):
        finalise.normalise_tree(tree, EPOCH)
        assert os.listxattr(tree / "etc/f01") == ["user.a", "user.b"]
    assert make(a, tmp_path / "o3", "tar", 1) == make(b, tmp_path / "o4", "tar", 1)


def test_leftovers_go_and_logs_are_emptied(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    keep = ["var/cache/apt/archives/partial", "var/lib/dpkg/status", "var/log/apt/history.log"]
    gone = [
        "var/cache/ldconfig/aux-cache",
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
        "var/cache/man/index.db",
        "var/cache/debconf/config.dat-old",
        "var/lib/dpkg/status-old",
        "var/lib/systemd/random-seed",
        "var/log/apt/eipp.log.xz",
        "var/log/bootstrap.log",
        "tmp/scratch",
        "run/blkid/blkid.tab",
    ]
    for rel in [*keep[1:], *gone, "var/log/dpkg.log"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("2026-12-02 00:00:00 something\n")
    (tree / keep[0]).mkdir(parents=True)
    finalise._remove_leftovers(tree, distros.get("debian").leftovers)
    assert [rel for rel in gone if (tree / rel).exists()] == []
    assert all((tree / rel).exists() for rel in keep)
    assert (tree / "var/log/dpkg.log").read_text() == ""
    assert (tree / "var/log/apt/history.log").read_text() == ""
    assert (tree / "tmp").is_dir() and (tree / "var/cache/man").is_dir()


def test_manifest_rows_have_source_and_maintainer_in_order() -> None:
    text = (
        "zlib1g\t1:1.2.13\tamd64\tinstalled\tzlib\t1:1.2.13\tMark <m@example.org>\n"
        "libc6\t2.36-9\ti386\tinstalled\tglibc\t2.36-9\tGNU Libc <l@example.org>\n"
        "libc6\t2.36-9\tamd64\tinstalled\tglibc\t2.36-9\tGNU Libc <l@example.org>\n"
    )
    rows = debian.manifest_rows(text)
    assert [(r["package"], r["arch"]) for r in rows] == [
        ("libc6", "amd64"),
        ("libc6", "i386"),
        ("zlib1g", "amd64"),
    ]
    assert rows[0] == {
        "package": "libc6",
        "version": "2.36-9",
        "arch": "amd64",
        "status": "installed",
        "source": "glibc",
        "source_version": "2.36-9",
        "maintainer": "GNU Libc <l@example.org>",
    }


def test_chroot_commands_run_on_the_cells_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []

    @contextlib.asynccontextmanager
    async def bound(tree: Path) -> AsyncIterator[Path]:
        yield tree

    async def run_in(
        tree: Path, argv: Sequence[str], env: Mapping[str, str] | None = None, **_: Any
    ) -> None:
        seen.append((list(argv), dict(env or {})))

    monkeypatch.setattr(chroot, "bound", bound)
    monkeypatch.setattr(chroot, "run_in", run_in)
    hook = tmp_path / "hooks" / "h" / "finalise.d" / "10-x"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    job = Job(
        id="finalise:c",
        kind="finalise",
        cell="c",
        arch="amd64",
        deps=(),
        key="1" * 64,
        params={},
    )
    ctx = Context(job, {}, Workspace(tmp_path / "o", Cache(tmp_path / "c")), lambda _: None)
    tree = tmp_path / "tree"
    tree.mkdir()
    params = finalise.Params(
        family="debian",
        release="bookworm",
        arch="amd64",
        boot=("bios-mbr",),
        root_uuid="u",
        filesystem="ext4",
        image_name="c",
        hooks=(finalise.Hook(name="h", digest="d", path=str(hook.parent.parent)),),
        manifest="c/c.manifest.json",
        epoch=EPOCH,
    )
    anyio.run(finalise._in_chroot, ctx, params, distros.get("debian"), tree)
    assert [argv[0] for argv, _ in seen] == [
        "update-initramfs",
        "systemctl",
        "/tmp/factory-hooks/h/10-x",
        "apt-get",
    ]
    assert all(env.get("SOURCE_DATE_EPOCH") == str(EPOCH) for _, env in seen)
