"""The OCI registry publish target against a real registry: Debian's docker-registry on
127.0.0.1, real skopeo, and an amd64 and a ppc64el cell built for real (their trees are
those of uefi.toml and ppc64el.toml, so a warm cache builds only the disks and archives).

What is checked is what a puller sees: the multi-arch list under every tag, each arch's
config, and a containerDisk copied back whose one layer holds a qcow2 that qemu-img
accepts, owned by KubeVirt's qemu user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from factory import proc
from factory.publish.oci import OciAuth, push_container_disks, push_images
from factory.results import StageError
from tests.integration.conftest import Build, run_matrix

REGISTRY = Path("/usr/bin/docker-registry")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not REGISTRY.exists()
        or subprocess.run(["which", "skopeo"], capture_output=True).returncode,
        reason="no docker-registry or skopeo",
    ),
]

MATRIX = """\
name = "itest-oci"
arches = ["amd64", "ppc64el"]
distros = ["debian/bookworm"]
formats = ["docker", "qcow2"]

[image]
layout = ["gpt-efi", "ppc-prep"]

[mirrors]
debian = "host"
security = false
"""
ARCHES = ("amd64", "ppc64el")
EPOCH = 1764633600  # 2025-12-02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def docker_registry(root: Path, htpasswd: Path | None = None) -> Iterator[str]:
    """Debian's docker-registry on a free loopback port, storing under `root`; its
    address. Stopped (TERM, then KILL) however the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = (
        f"auth:\n  htpasswd:\n    realm: factory-test\n    path: {htpasswd}\n" if htpasswd else ""
    )
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: factory-test\n" + auth
    )
    log = open(root / "registry.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([REGISTRY, "serve", config], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=2).close()
                break
            except urllib.error.HTTPError:  # 401 with auth on: it is up
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "docker-registry did not start: " + (root / "registry.log").read_text()
                    ) from None
                time.sleep(0.1)
        yield address
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with docker_registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The amd64 and ppc64el cells, each as a docker archive and a qcow2, built once."""
    matrix = tmp_path_factory.mktemp("oci-matrix") / "oci.toml"
    matrix.write_text(MATRIX)
    build = run_matrix(matrix, tmp_path_factory.mktemp("oci-out"))
    assert build.returncode == 0, build.stderr[-3000:]
    return build


def artifacts(build: Build, fmt: str) -> list[tuple[str, Path]]:
    found = {a["cell"].rsplit("-", 1)[1]: build.out / a["path"]
             for a in build.report["artifacts"] if a["format"] == fmt}  # fmt: skip
    assert sorted(found) == sorted(ARCHES)
    return [(arch, found[arch]) for arch in ARCHES]


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=True)


def raw(ref: str, *opts: str) -> tuple[str, dict[str, Any]]:
    """What the registry serves for `ref`: its digest and its manifest (or list)."""
    text = skopeo("inspect", "--raw", "--tls-verify=false", *opts, f"docker://{ref}").stdout
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


def platforms(index: dict[str, Any]) -> list[dict[str, str]]:
    return sorted((m["platform"] for m in index["manifests"]), key=lambda p: p["architecture"])


LIST_PLATFORMS = [
    {"architecture": "amd64", "os": "linux"},
    {"architecture": "ppc64le", "os": "linux"},
]
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


def config_of(ref: str, goarch: str) -> dict[str, Any]:
    """The image config a puller on `goarch` gets."""
    text = skopeo(
        "inspect", "--config", "--raw", "--tls-verify=false", "--override-arch", goarch,
        f"docker://{ref}",
    ).stdout  # fmt: skip
    return dict(json.loads(text))


@dataclass
class Layer:
    members: list[tarfile.TarInfo]
    disk: Path


def pull_disk(ref: str, goarch: str, dest: Path) -> tuple[dict[str, Any], Layer]:
    """One arch of a containerDisk copied back into an OCI layout: its config, and its
    layers (there must be one) opened, the disk extracted to `dest`."""
    layout = dest / "layout"
    dest.mkdir(parents=True)
    skopeo(
        "copy", "--quiet", "--src-tls-verify=false", "--override-arch", goarch,
        f"docker://{ref}", f"oci:{layout}:pulled",
    )  # fmt: skip

    def blob(d: dict[str, Any]) -> Path:
        return layout / "blobs" / "sha256" / str(d["digest"]).removeprefix("sha256:")

    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    manifest = json.loads(blob(entry).read_text())
    config = json.loads(blob(manifest["config"]).read_text())
    (layer,) = manifest["layers"]
    with tarfile.open(blob(layer), "r:*") as tar:
        members = tar.getmembers()
        disks = [m for m in members if m.isfile()]
        assert len(disks) == 1, [m.name for m in members]
        tar.extract(disks[0], dest / "root", set_attrs=False, filter="data")
    return config, Layer(members, dest / "root" / disks[0].name)


async def test_container_disks_are_one_multi_arch_list(
    cells: Build, registry: str, tmp_path: Path
) -> None:
    refs = [
        f"{registry}/factory/debian-bookworm-disk:20261202",
        f"{registry}/factory/debian-bookworm-disk:latest",
    ]
    sources = artifacts(cells, "qcow2")
    kwargs: dict[str, Any] = {"auth": None, "tls_verify": False, "epoch": EPOCH}
    digest = await push_container_disks(sources, refs, workdir=tmp_path / "a", **kwargs)
    for ref in refs:
        got, index = raw(ref)
        assert got == digest, ref
        assert index["mediaType"] in INDEX_TYPES
        assert platforms(index) == LIST_PLATFORMS
    # Deterministic: the same disks and epoch give the same list, pushed again elsewhere.
    again = [f"{registry}/factory/again:1"]
    assert await push_container_disks(sources, again, workdir=tmp_path / "b", **kwargs) == digest

    config, layer = pull_disk(refs[1], "ppc64le", tmp_path / "pulled")
    assert (config["architecture"], config["os"]) == ("ppc64le", "linux")
    assert config["rootfs"]["diff_ids"] and len(config["rootfs"]["diff_ids"]) == 1
    by_name = {m.name.rstrip("/"): m for m in layer.members}
    assert sorted(by_name) == ["disk", "disk/debian-bookworm-ppc64el.qcow2"]
    assert all((m.uid, m.gid) == (107, 107) for m in layer.members)
    assert by_name["disk/debian-bookworm-ppc64el.qcow2"].mode == 0o444
    assert by_name["disk"].isdir()
    assert layer.disk.read_bytes()[:4] == b"QFI\xfb"
    assert layer.disk.stat().st_size == sources[1][1].stat().st_size
    await anyio.run_process(["qemu-img", "check", "-q", "-f", "qcow2", layer.disk])

    config, layer = pull_disk(refs[0], "amd64", tmp_path / "pulled-amd64")
    assert config["architecture"] == "amd64" and "variant" not in config
    assert layer.disk.name == "debian-bookworm-amd64.qcow2"


async def test_one_arch_is_a_plain_manifest(cells: Build, registry: str, tmp_path: Path) -> None:
    ref = f"{registry}/factory/one-arch:latest"
    amd64 = artifacts(cells, "qcow2")[:1]
    digest = await push_container_disks(
        amd64, [ref], auth=None, tls_verify=False, workdir=tmp_path, epoch=EPOCH
    )
    got, manifest = raw(ref)
    assert got == digest
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert len(manifest["layers"]) == 1


def htpasswd(path: Path, user: str, password: str) -> Path:
    """An htpasswd file as docker-registry reads it: bcrypt only (by libxcrypt, through
    the crypt module: deprecated in Python 3.11, gone in 3.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    path.write_text(f"{user}:{hashed}\n")
    return path


async def test_credentials_reach_the_registry_and_nothing_else(
    cells: Build, tmp_path: Path
) -> None:
    """A registry that wants a login: the right one pushes, a wrong one fails with one
    line that does not hold the password, and the job's log never holds it either."""
    password = "s3cret-Pa55word-for-the-test"
    users = htpasswd(tmp_path / "htpasswd", "factory", password)
    amd64 = artifacts(cells, "qcow2")[:1]
    log = tmp_path / "job.log"
    with docker_registry(tmp_path / "registry", users) as address, proc.logging_to(log):
        ref = f"{address}/factory/private:latest"

        async def push(auth: OciAuth | None) -> str:
            return await push_container_disks(
                amd64, [ref], auth=auth, tls_verify=False, workdir=tmp_path / "work", epoch=EPOCH
            )

        with pytest.raises(StageError) as refused:
            await push(None)
        assert "unauthorized" in str(refused.value) or "authentication" in str(refused.value)
        with pytest.raises(StageError) as wrong:
            await push(OciAuth("factory", password + "-wrong"))
        assert "\n" not in str(wrong.value) and password not in str(wrong.value)
        digest = await push(OciAuth("factory", password))
        with pytest.raises(subprocess.CalledProcessError):  # it is really private
            raw(ref)
        got, _ = raw(ref, "--creds", f"factory:{password}")
        assert got == digest
    text = log.read_text()
    assert "skopeo" in text and password not in text
    assert list((tmp_path / "work").iterdir()) == []  # the auth file went with its folder


async def test_a_wrong_arch_is_refused(cells: Build, registry: str, tmp_path: Path) -> None:
    """An archive pushed under another arch's platform would break every pull of it."""
    (amd64, _) = artifacts(cells, "docker")
    with pytest.raises(StageError, match="for linux/amd64, not ppc64el"):
        await push_images(
            [("ppc64el", amd64[1])], [f"{registry}/factory/wrong:latest"],
            auth=None, tls_verify=False, workdir=tmp_path,
        )  # fmt: skip
    with pytest.raises(subprocess.CalledProcessError):  # nothing was pushed
        raw(f"{registry}/factory/wrong:latest")


PUBLISH = """
[[publish]]
name = "registry"
kind = "oci"
registry = "{registry}"
repository = "nightly"
tls_verify = false
"""


async def test_factory_run_publishes_to_the_registry(
    cells: Build, registry: str, tmp_path: Path
) -> None:
    """`factory run` with an oci [[publish]] target, into the cells' own OUT: the cells
    are carried (nothing is rebuilt) and the one upload job pushes both lists."""
    matrix = cells.out.parent / "oci-publish.toml"
    matrix.write_text(MATRIX + PUBLISH.format(registry=registry))
    build = run_matrix(matrix, cells.out)
    assert build.returncode == 0, build.stderr[-3000:]
    (upload,) = [j for j in build.report["jobs"] if j["kind"] == "upload"]
    assert upload["status"] == "done"
    pushed = upload["info"]["upload"]["pushed"]
    assert sorted(j["id"] for j in build.report["jobs"] if j["status"] == "done") == [upload["id"]]
    epoch = max(c["epoch"] for c in cells.report["cells"].values())
    date = time.strftime("%Y%m%d", time.gmtime(epoch))
    for name in ("debian-bookworm", "debian-bookworm-disk"):
        refs = [f"{registry}/nightly/{name}:{tag}" for tag in (date, "latest")]
        assert pushed[refs[0]] == pushed[refs[1]]
        for ref in refs:
            got, index = raw(ref)
            assert got == pushed[ref]
            assert platforms(index) == LIST_PLATFORMS
    image = config_of(f"{registry}/nightly/debian-bookworm:latest", "ppc64le")
    assert image["architecture"] == "ppc64le"
    ref = f"{registry}/nightly/debian-bookworm-disk:{date}"
    config, layer = pull_disk(ref, "amd64", tmp_path / "pulled")
    assert config["architecture"] == "amd64"
    assert [(m.name.rstrip("/"), m.uid, m.gid) for m in layer.members] == [
        ("disk", 107, 107), ("disk/debian-bookworm-amd64.qcow2", 107, 107)
    ]  # fmt: skip
    await anyio.run_process(["qemu-img", "check", "-q", "-f", "qcow2", layer.disk])


PRIVATE = """
[[publish]]
name = "private"
kind = "oci"
registry = "{registry}"
repository = "private"
tls_verify = false
formats = ["qcow2"]
username_env = "FACTORY_TEST_OCI_USER"
password_env = "FACTORY_TEST_OCI_PASSWORD"
"""


def test_factory_run_logs_in_from_the_environment(
    cells: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that wants a login, the login in the environment as the matrix names
    it: the containerDisks get there, and the password is nowhere in OUT."""
    password = "an0ther-s3cret-for-the-run"
    users = htpasswd(tmp_path / "htpasswd", "nightly", password)
    monkeypatch.setenv("FACTORY_TEST_OCI_USER", "nightly")
    monkeypatch.setenv("FACTORY_TEST_OCI_PASSWORD", password)
    with docker_registry(tmp_path / "registry", users) as address:
        matrix = cells.out.parent / "oci-private.toml"
        matrix.write_text(MATRIX + PRIVATE.format(registry=address))
        build = run_matrix(matrix, cells.out)
        assert build.returncode == 0, build.stderr[-3000:]
        (upload,) = [j for j in build.report["jobs"] if j["kind"] == "upload"]
        ref = f"{address}/private/debian-bookworm-disk:latest"
        got, index = raw(ref, "--creds", f"nightly:{password}")
        assert got == upload["info"]["upload"]["pushed"][ref]
        assert platforms(index) == LIST_PLATFORMS
    assert password not in build.stderr
    for path in cells.out.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert password.encode() not in path.read_bytes(), path
