"""factory.publish.oci without a registry: the containerDisk's bytes, the index's
platforms, and how credentials reach skopeo (a stand-in `skopeo` on PATH records what it
was given; the real one, against a real registry, is in tests/integration)."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from factory.publish import oci
from factory.publish.oci import OciAuth, push_container_disks, push_images
from factory.results import StageError

EPOCH = 1764633600
DISK = b"QFI\xfb" + bytes(range(256)) * 41  # not a multiple of 512: the padding counts


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "debian-bookworm-arm64.qcow2"
    path.write_bytes(DISK)
    return path


def layer_bytes(path: Path, epoch: int = EPOCH) -> tuple[bytes, str, int]:
    out = io.BytesIO()
    digest, size = oci.write_disk_layer(path, out, epoch)
    return out.getvalue(), digest, size


def test_the_disk_layer_is_the_same_bytes_every_time(qcow2: Path, tmp_path: Path) -> None:
    first, digest, size = layer_bytes(qcow2)
    os.utime(qcow2, (1, 1))  # the file's own times do not count, the epoch does
    copy = tmp_path / "elsewhere" / qcow2.name
    copy.parent.mkdir()
    copy.write_bytes(DISK)
    assert layer_bytes(copy)[0] == first
    assert (digest, size) == (oci.hashlib.sha256(first).hexdigest(), len(first))
    assert size % tarfile.RECORDSIZE == 0
    assert layer_bytes(qcow2, EPOCH + 1)[0] != first


def test_the_disk_layer_holds_the_disk_read_only_for_qemu(qcow2: Path) -> None:
    data, _, _ = layer_bytes(qcow2)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["disk", "disk/debian-bookworm-arm64.qcow2"]
        folder, disk = members
        assert folder.isdir() and disk.isfile()
        for m in members:
            assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (107, 107, "", "", EPOCH)
        assert (stat.S_IMODE(folder.mode), stat.S_IMODE(disk.mode)) == (0o555, 0o444)
        fh = tar.extractfile(disk)
        assert fh is not None and fh.read() == DISK
    # What tarfile itself would write for these two entries.
    again = io.BytesIO()
    with tarfile.open(fileobj=again, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder_info, disk_info = oci.disk_members(qcow2.name, len(DISK), EPOCH)
        tar.addfile(folder_info)
        tar.addfile(disk_info, io.BytesIO(DISK))
    assert again.getvalue() == data


def test_a_long_name_still_gives_one_layer(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 150 + ".qcow2")
    path.write_bytes(DISK)
    data, _, _ = layer_bytes(path)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["disk", f"disk/{path.name}"]


def test_the_index_names_each_arch_platform() -> None:
    manifest = oci.descriptor(oci.MEDIA_MANIFEST, b"{}")
    index = json.loads(oci.image_index([("arm64", manifest), ("ppc64el", manifest)]))
    assert index["mediaType"] == oci.MEDIA_INDEX and index["schemaVersion"] == 2
    assert [m["platform"] for m in index["manifests"]] == [
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
        {"architecture": "ppc64le", "os": "linux"},
    ]
    assert index["manifests"][0]["digest"] == manifest["digest"]
    assert oci.platform("amd64") == {"architecture": "amd64", "os": "linux"}


def test_a_container_disk_in_a_layout(qcow2: Path, tmp_path: Path) -> None:
    layout = oci.Layout(tmp_path / "layout").create()
    manifest = oci.add_container_disk(layout, "arm64", qcow2, EPOCH)
    assert layout.find("arm64") == manifest
    doc = json.loads(layout.read(manifest))
    config = json.loads(layout.read(doc["config"]))
    assert (config["architecture"], config["variant"], config["os"]) == ("arm64", "v8", "linux")
    assert config["created"] == "2025-12-02T00:00:00Z"
    (layer,) = doc["layers"]
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]
    assert layer["mediaType"] == oci.MEDIA_LAYER
    assert layer["size"] == len(layout.read(layer))
    again = oci.add_container_disk(oci.Layout(tmp_path / "again").create(), "arm64", qcow2, EPOCH)
    assert again == manifest
    assert sorted(p.name for p in layout.blobs.iterdir()) == sorted(
        d["digest"].removeprefix("sha256:") for d in (manifest, doc["config"], layer)
    )


def test_bad_input_is_one_line() -> None:
    refs = ["127.0.0.1:5000/factory/x:latest"]
    for sources, to, problem in [
        ([], refs, "no image"),
        ([("amd64", Path("a"))], [], "no ref"),
        ([("sparc", Path("a"))], refs, "unknown arch 'sparc'"),
        ([("amd64", Path("a")), ("amd64", Path("b"))], refs, "two images for arch amd64"),
        ([("amd64", Path("a"))], ["factory:latest"], "not a REGISTRY/REPO:TAG"),
        ([("amd64", Path("a"))], ["127.0.0.1:5000/factory/x"], "not a REGISTRY/REPO:TAG"),
    ]:
        with pytest.raises(StageError, match=problem):
            oci.check_sources(sources, to)


def test_the_password_is_hidden_from_repr() -> None:
    assert "hunter2" not in repr(OciAuth("me", "hunter2"))


# A stand-in skopeo: records its argv (one JSON line a call), the auth file's mode and
# content when it is given one, writes the digest file `copy` is asked for, and fails
# when FAKE_SKOPEO_FAIL is set, saying what a registry would about a wrong login.
FAKE = """#!/usr/bin/env python3
import base64, json, os, sys
args = sys.argv[1:]
seen = {"argv": args}
for flag in ("--dest-authfile", "--src-authfile"):
    if flag in args:
        path = args[args.index(flag) + 1]
        seen[flag] = [oct(os.stat(path).st_mode & 0o777), open(path).read()]
with open(os.environ["FAKE_SKOPEO_LOG"], "a") as fh:
    fh.write(json.dumps(seen) + "\\n")
if os.environ.get("FAKE_SKOPEO_FAIL"):
    auth = json.loads(open(args[args.index("--dest-authfile") + 1]).read())
    (entry,) = auth["auths"].values()
    login = base64.b64decode(entry["auth"]).decode()
    sys.stderr.write('time="x" level=fatal msg="denied: %s (%s)"\\n' % (login, entry["auth"]))
    sys.exit(1)
if "--digestfile" in args:
    open(args[args.index("--digestfile") + 1], "w").write("sha256:" + "ab" * 32)
"""


@pytest.fixture
def fake_skopeo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "skopeo").write_text(FAKE)
    (bin_dir / "skopeo").chmod(0o755)
    log = tmp_path / "skopeo.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SKOPEO_LOG", os.fspath(log))
    return log


def calls(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


async def test_credentials_go_in_a_0600_file_never_on_the_command_line(
    fake_skopeo: Path, qcow2: Path, tmp_path: Path
) -> None:
    password = "s3cret-pw"
    refs = ["127.0.0.1:5000/factory/d-disk:20261202", "127.0.0.1:5000/factory/d-disk:latest"]
    work = tmp_path / "work"
    digest = await push_container_disks(
        [("arm64", qcow2)], refs, auth=OciAuth("bot", password), tls_verify=False, workdir=work,
        epoch=EPOCH,
    )  # fmt: skip
    assert digest == "sha256:" + "ab" * 32
    made = calls(fake_skopeo)
    assert len(made) == 2  # the push, then the second tag from the registry itself
    first, second = made
    for call in made:
        assert not any(password in a for a in call["argv"])  # type: ignore[union-attr]
        mode, content = call["--dest-authfile"]  # type: ignore[misc]
        assert mode == "0o600"
        token = base64.b64encode(f"bot:{password}".encode()).decode()
        assert json.loads(content) == {"auths": {"127.0.0.1:5000": {"auth": token}}}
    assert first["argv"][-2:] == ["oci:layout:arm64", f"docker://{refs[0]}"]  # type: ignore[index]
    assert "--all" not in first["argv"]  # type: ignore[operator]
    assert second["argv"][-2:] == [  # type: ignore[index]
        f"docker://127.0.0.1:5000/factory/d-disk@{digest}",
        f"docker://{refs[1]}",
    ]
    assert "--src-authfile" in second
    assert "--dest-tls-verify=false" in first["argv"]  # type: ignore[operator]
    assert list(work.iterdir()) == []  # the auth file went with the call's folder


async def test_several_arches_push_the_index_with_all(
    fake_skopeo: Path, qcow2: Path, tmp_path: Path
) -> None:
    ppc = tmp_path / "ppc.qcow2"
    ppc.write_bytes(DISK[::-1])
    ref = "127.0.0.1:5000/factory/d-disk:latest"
    await push_container_disks(
        [("ppc64el", ppc), ("arm64", qcow2)], [ref], auth=None, tls_verify=True,
        workdir=tmp_path / "work", epoch=EPOCH,
    )  # fmt: skip
    (call,) = calls(fake_skopeo)
    argv = call["argv"]
    assert "--all" in argv and argv[-2:] == ["oci:layout:all", f"docker://{ref}"]  # type: ignore[operator,index]
    assert "--dest-tls-verify=true" in argv  # type: ignore[operator]
    assert "--dest-authfile" not in argv  # type: ignore[operator]


async def test_a_failure_is_one_line_without_the_password(
    fake_skopeo: Path, qcow2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SKOPEO_FAIL", "1")
    ref = "127.0.0.1:5000/factory/d-disk:latest"
    with pytest.raises(StageError) as failed:
        await push_container_disks(
            [("arm64", qcow2)], [ref], auth=OciAuth("bot", "pw-in-the-message"),
            tls_verify=False, workdir=tmp_path / "work", epoch=EPOCH,
        )  # fmt: skip
    message = str(failed.value)
    assert message == f"push containerDisk to {ref}: skopeo: denied: bot:*** (***)"
    assert list((tmp_path / "work").iterdir()) == []


async def test_a_docker_archive_for_another_arch_is_refused(
    fake_skopeo: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "x.docker.tar"
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": []}]).encode()
    with tarfile.open(archive, "w") as tar:
        for name, data in (("manifest.json", manifest), ("c.json", config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert oci.archive_platform(archive) == {"architecture": "amd64", "os": "linux"}
    with pytest.raises(StageError, match=r"for linux/amd64, not arm64 \(linux/arm64/v8\)"):
        await push_images(
            [("arm64", archive)], ["127.0.0.1:5000/f/x:1"], auth=None, tls_verify=False,
            workdir=tmp_path / "work",
        )  # fmt: skip
    assert not fake_skopeo.exists()  # refused before any skopeo
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(StageError, match="not a docker archive"):
        oci.archive_platform(tmp_path / "junk.tar")
