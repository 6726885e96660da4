"""cloud-init in an image ([image] cloud_init), given user-data by `factory boot
--cloud-init` on a NoCloud seed: one amd64 BIOS raw disk, booted under TCG.

The guest's runcmd prints what cloud-init did (the user, the file, the key, the
instance-id) on the serial console, which `factory boot --log` keeps; the image itself is
read with debugfs at the root partition's offset, never mounted.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import factory, sha256
from tests.integration.conftest import DATA, Build
from tests.integration.conftest_images import built, debugfs, sh

pytestmark = pytest.mark.timeout(2400)

CELL = "debian-bookworm-amd64"
MATRIX = DATA / "cloud-init.toml"
# A cloud-init first boot under TCG: the kernel, then cloud-init's four stages in Python.
TIMEOUT = "600"
KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICqSxVBQEzuHbg4QsiQPWgFYf80nNTY3cmBaUu0ZoCYQ factory-test"
)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Build:
    return built(MATRIX, tmp_path_factory.mktemp("cloud-init-out"))


def user_data(n: int, user: str) -> str:
    """A #cloud-config that makes a user with a key and a file, then prints them on the
    console, the instance-id and the ssh state, and last a marker."""
    say = "> /dev/console"
    return f"""#cloud-config
users:
  - name: {user}
    shell: /bin/bash
    ssh_authorized_keys:
      - {KEY}
write_files:
  - path: /etc/factory-ci-{n}
    content: |
      file of user-data {n}
runcmd:
  - [sh, -c, 'echo "FACTORY-CI-ID $(id {user})" {say}']
  - [sh, -c, 'echo "FACTORY-CI-FILE $(cat /etc/factory-ci-{n})" {say}']
  - [sh, -c, 'echo "FACTORY-CI-KEY $(cat /home/{user}/.ssh/authorized_keys)" {say}']
  - [sh, -c, 'echo "FACTORY-CI-IID $(cat /var/lib/cloud/data/instance-id)" {say}']
  - [sh, -c, 'echo "FACTORY-CI-OTHER $(ls /etc/factory-ci-* | tr "\\n" " ")" {say}']
  - [sh, -c, 'echo "FACTORY-CI-SSH $(systemctl is-active ssh) $(ls /etc/ssh/ssh_host_*_key | wc -l)" {say}']
  - [sync]
  - [sh, -c, 'echo FACTORY-CI-MARKER-{n} {say}']
"""  # noqa: E501


def boot_with(image: Path, data: Path, log: Path, *args: str) -> tuple[str, float]:
    """`factory boot --cloud-init`: the console's lines that runcmd printed, and the time."""
    started = time.monotonic()
    result = factory(
        "boot", image, "--cloud-init", data, "--timeout", TIMEOUT, "--log", log, *args,
        timeout=900,
    )  # fmt: skip
    took = time.monotonic() - started
    console = log.read_text(errors="replace") if log.exists() else ""
    assert result.returncode == 0, result.stderr + console[-3000:]
    assert "login prompt and cloud-init done" in result.stdout
    print(f"\n{data.name}: {result.stdout.strip()} (factory boot took {took:.0f} s)")
    return console, took


def line(console: str, tag: str) -> str:
    (found,) = [x for x in console.splitlines() if x.startswith(f"{tag} ")]
    return found.removeprefix(f"{tag} ").strip()


def test_the_image_holds_no_instance_state(cloud: Build) -> None:
    """cloud-init and its datasource_list are in the image; what makes an instance is not."""
    manifest = json.loads((cloud.out / CELL / f"{CELL}.manifest.json").read_text())
    assert {"cloud-init", "openssh-server"} <= {row["package"] for row in manifest}
    cfg = debugfs(cloud, CELL, "cat /etc/cloud/cloud.cfg.d/91-factory-datasources.cfg")
    assert "datasource_list: [ NoCloud, None ]" in cfg
    listing = debugfs(cloud, CELL, "ls -p /var/lib/cloud").split()
    entries = [e.split("/")[5] for e in listing if e.startswith("/")]
    assert set(entries) <= {".", ".."}, entries
    assert re.search(r"\bSize: 0\s", debugfs(cloud, CELL, "stat /etc/machine-id"))
    ssh = [e.split("/")[5] for e in debugfs(cloud, CELL, "ls -p /etc/ssh").split() if "/" in e]
    assert "sshd_config" in ssh  # openssh-server is there, its build-time keys are not
    assert [n for n in ssh if n.startswith("ssh_host_")] == []


def test_first_boot_applies_the_user_data_and_a_new_instance_id_new_data(
    cloud: Build, tmp_path: Path
) -> None:
    """As a cloud runs an image: an instance disk (a qcow2 overlay on the raw image) booted
    with user-data, then the same disk, with what the first boot wrote, booted again with
    other user-data and another instance-id: cloud-init applies the new data."""
    disk = tmp_path / "instance.qcow2"
    raw = cloud.artifact("raw")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", disk)
    data = tmp_path / "user-data-1.yaml"
    data.write_text(user_data(1, "alice"))
    console, _ = boot_with(
        disk, data, tmp_path / "console-1.log", "--write", "--wait-for", "FACTORY-CI-MARKER-1"
    )
    assert "FACTORY-CI-MARKER-1" in console
    assert "uid=" in line(console, "FACTORY-CI-ID") and "(alice)" in line(console, "FACTORY-CI-ID")
    assert line(console, "FACTORY-CI-FILE") == "file of user-data 1"
    assert line(console, "FACTORY-CI-KEY") == KEY
    # The default instance-id comes from the user-data's bytes.
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    assert line(console, "FACTORY-CI-IID") == f"iid-factory-{digest}"
    # sshd runs with host keys made on this boot, none from the build.
    active, keys = line(console, "FACTORY-CI-SSH").split()
    assert active == "active" and int(keys) >= 1

    data = tmp_path / "user-data-2.yaml"
    data.write_text(user_data(2, "bob"))
    console, _ = boot_with(
        disk, data, tmp_path / "console-2.log",
        "--write", "--instance-id", "iid-factory-second", "--wait-for", "FACTORY-CI-MARKER-2",
    )  # fmt: skip
    assert "FACTORY-CI-MARKER-1" not in console  # runcmd is per instance
    assert "(bob)" in line(console, "FACTORY-CI-ID")
    assert line(console, "FACTORY-CI-FILE") == "file of user-data 2"
    assert line(console, "FACTORY-CI-IID") == "iid-factory-second"
    # The first instance's file is still on the disk: one disk, a second instance.
    assert line(console, "FACTORY-CI-OTHER") == "/etc/factory-ci-1 /etc/factory-ci-2"
    # The image itself was never written: the overlay took every write.
    sh("qemu-img", "check", "-q", disk)
    assert sha256(raw) == next(
        a["sha256"] for a in cloud.report["artifacts"] if a["format"] == "raw"
    )
