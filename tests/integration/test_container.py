"""The container the CI jobs run in (issue 13), its quick half: factory's docker format is
an image a real engine takes (buildah: no daemon, no registry), and the Dockerfile builds
on it through its BASE argument, offline, up to the step that installs the tools.

The whole proof (scripts/setup in the build, then `factory plan` and a cold `factory run`
of a tar inside the container) takes about 7 minutes cold: scripts/container-check does it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import DATA, run_matrix

# The docker format of the amd64 cell whose tree and finalise tests/integration/data/
# amd64.toml also uses ([image] and [mirrors] the same): from the cache when that ran.
BASE_MATRIX = f"""\
name = "ctbase"
arches = ["amd64"]
distros = ["debian/bookworm"]
formats = ["docker"]

[image]
hooks = ["{DATA / "hooks" / "marker"}"]
qcow2_compression = "zstd"

[mirrors]
debian = "host"
"""
BASE_TAG = "localhost/factory-base:test"
pytestmark = pytest.mark.slow
SETUP_STEP = "RUN scripts/setup"

Buildah = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def docker_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("container-base")
    (work / "base.toml").write_text(BASE_MATRIX)
    build = run_matrix(work / "base.toml", work / "out")
    assert build.returncode == 0, build.stderr[-3000:]
    return build.artifact("docker")


@pytest.fixture
def buildah(tmp_path: Path) -> Iterator[Buildah]:
    """buildah on a private store in tmp_path, asking no registry (an empty
    registries.conf); every container and image in it is removed afterwards."""
    (tmp_path / "registries.conf").write_text("")
    (tmp_path / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    base = [
        "buildah",
        "--root", str(tmp_path / "root"),
        "--runroot", str(tmp_path / "runroot"),
        "--storage-driver", "overlay",
        "--registries-conf", str(tmp_path / "registries.conf"),
    ]  # fmt: skip

    def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*base, *map(str, args)], capture_output=True, text=True, check=False, timeout=900
        )
        if check:
            assert proc.returncode == 0, f"buildah {args[0]}: {proc.stderr[-3000:]}"
        return proc

    try:
        yield run
    finally:
        run("rm", "--all", check=False)
        run("rmi", "--all", "--force", check=False)


def dockerfile_until_setup() -> str:
    """The Dockerfile up to the step that runs scripts/setup (minutes of apt and pip)."""
    text = (ROOT / "Dockerfile").read_text()
    assert SETUP_STEP in text, f"the Dockerfile has no `{SETUP_STEP}` step any more"
    return text[: text.index(SETUP_STEP)]


def test_dockerfile_base_is_an_argument_with_no_registry_in_it() -> None:
    """`FROM $BASE` with `ARG BASE` before it, so a build can use an image it already
    has; the default is a short name (no registry host), and the context leaves the
    host's .venv out."""
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    arg = re.fullmatch(r"ARG BASE=(\S+)", lines[0])
    assert arg is not None, lines[0]
    assert re.fullmatch(r"FROM \$\{?BASE\}?", lines[1]), lines[1]
    first = arg[1].split("/")[0]
    assert "/" not in arg[1] or not ("." in first or ":" in first or first == "localhost"), arg[1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored or ".venv" in ignored


def test_docker_format_is_the_dockerfile_base(
    docker_tar: Path, buildah: Buildah, tmp_path: Path
) -> None:
    """The docker archive loads into buildah and keeps what the tree had (owner and
    set-uid mode of the marker hook's file), and the Dockerfile's first steps build on it
    with --pull=never: the sources are where factory looks for the "host" mirror, the
    context has the source and not the host's .venv, and apt in the build reaches the
    mirror of the image's own sources."""
    image = buildah("pull", f"docker-archive:{docker_tar}").stdout.split()[-1]
    buildah("tag", image, BASE_TAG)
    inspect = json.loads(buildah("inspect", "--type", "image", BASE_TAG).stdout)
    assert inspect["OCIv1"]["architecture"] == "amd64"

    # The Dockerfile's default base is not in the store: the build fails, pulling nothing.
    no_pull = buildah(
        "bud", "--pull=never", "--isolation", "chroot", "-f", ROOT / "Dockerfile", ROOT,
        check=False,
    )  # fmt: skip
    assert no_pull.returncode != 0
    assert "debian:bookworm" in no_pull.stderr, no_pull.stderr[-2000:]

    quick = tmp_path / "Dockerfile.quick"
    quick.write_text(
        dockerfile_until_setup()
        + "RUN test -f /etc/apt/sources.list.d/debian.sources && test -f scripts/setup"
        " && test ! -e .venv && apt-get update -q\n"
    )
    buildah(
        "bud", "--pull=never", "--isolation", "chroot", "--network", "host",
        "--build-arg", f"BASE={BASE_TAG}", "--tag", "localhost/factory:quick",
        "-f", quick, ROOT,
    )  # fmt: skip
    ctr = buildah("from", "--pull=never", "localhost/factory:quick").stdout.strip()
    script = (
        "pwd; . /etc/os-release; echo $VERSION_CODENAME; "
        "stat -c %u:%g:%a /etc/factory-test/owned; cat /etc/factory-test/cleanup"
    )
    ran = buildah("run", "--isolation", "chroot", ctr, "--", "sh", "-c", script)
    assert ran.stdout.split("\n")[:4] == ["/src", "bookworm", "4242:4343:4750", "cleanup ran"], (
        ran.stdout
    )


@pytest.mark.parametrize("cap", ["sys_admin", "mknod"])
def test_a_tree_without_its_capabilities_is_refused(tmp_path: Path, cap: str) -> None:
    """As in a container without --cap-add SYS_ADMIN (Docker's default set) or MKNOD: the
    run stops before any work with one line naming what is missing, instead of caching a
    tree whose /dev holds regular files. setpriv drops the capability from this root."""
    proc = subprocess.run(
        ["setpriv", f"--inh-caps=-{cap}", f"--bounding-set=-{cap}",
         str(ROOT / ".venv/bin/factory"), "run", str(DATA / "amd64.toml"),
         "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--events", "plain"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"needs CAP_{cap.upper()}" in lines[0], proc.stderr
    assert "--cap-add SYS_ADMIN" in lines[0]
    assert not any((tmp_path / "out").iterdir())
