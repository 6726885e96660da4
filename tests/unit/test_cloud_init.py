"""cloud-init: [image] cloud_init and boot_test_user_data in the matrix and the plan, the
datasource file and instance state in finalise, the NoCloud seed of `factory boot`."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from factory import proc
from factory.plan import make_plan
from factory.results import StageError
from factory.spec import CLOUD_INIT_DATASOURCES, load_matrix
from factory.stages import boot, finalise
from tests.conftest import factory
from tests.unit.test_spec import HEAD, error_of, write

CELL = "debian-bookworm-amd64"


def matrix(tmp_path: Path, *image: str) -> Path:
    return write(tmp_path, "\n".join([*HEAD, "[image]", *image]) + "\n")


# --- the matrix ---------------------------------------------------------------------------------


def test_datasources_load_and_none_ends_the_list(tmp_path: Path) -> None:
    m = load_matrix(matrix(tmp_path, 'cloud_init = ["NoCloud", "ConfigDrive", "OpenStack"]'))
    assert m.image.cloud_init == ("NoCloud", "ConfigDrive", "OpenStack")
    assert m.image.datasource_list() == ("NoCloud", "ConfigDrive", "OpenStack", "None")
    m = load_matrix(matrix(tmp_path, 'cloud_init = ["Ec2", "None"]'))
    assert m.image.datasource_list() == ("Ec2", "None")
    assert load_matrix(matrix(tmp_path, "boot_test = true")).image.datasource_list() == ()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('["NoCloud", "Nocloud2"]', "'Nocloud2' is not a cloud-init datasource (did you mean"),
        ('["nocloud"]', "did you mean 'NoCloud'?"),
        ('["NoCloud", "NoCloud"]', "'NoCloud' is listed twice"),
        ('["None", "NoCloud"]', '"None" is the fallback and ends the list'),
        ('"NoCloud"', "an array"),
    ],
)
def test_bad_datasources_are_named_at_their_line(tmp_path: Path, value: str, says: str) -> None:
    err = error_of(matrix(tmp_path, "packages = []", f"cloud_init = {value}"))
    assert err.line == 7
    assert err.field.startswith("image.cloud_init")
    assert says in str(err)


def test_every_datasource_name_is_accepted(tmp_path: Path) -> None:
    names = ", ".join(f'"{n}"' for n in CLOUD_INIT_DATASOURCES)
    assert load_matrix(matrix(tmp_path, f"cloud_init = [{names}]")).image.cloud_init


def test_boot_test_user_data_is_relative_to_the_matrix(tmp_path: Path) -> None:
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci/user-data").write_text("#cloud-config\n")
    m = load_matrix(
        matrix(tmp_path, 'cloud_init = ["NoCloud"]', 'boot_test_user_data = "ci/user-data"')
    )
    assert m.image.boot_test_user_data == tmp_path / "ci/user-data"


def test_boot_test_user_data_must_exist_and_needs_nocloud(tmp_path: Path) -> None:
    err = error_of(matrix(tmp_path, 'cloud_init = ["NoCloud"]', 'boot_test_user_data = "nope"'))
    assert (err.line, err.field) == (7, "image.boot_test_user_data")
    assert "does not exist" in str(err)
    (tmp_path / "ud").write_text("#cloud-config\n")
    err = error_of(matrix(tmp_path, 'cloud_init = ["Ec2"]', 'boot_test_user_data = "ud"'))
    assert err.field == "image.boot_test_user_data"
    assert 'add "NoCloud" to cloud_init' in str(err)
    err = error_of(matrix(tmp_path, 'boot_test_user_data = "ud"'))
    assert err.field == "image.boot_test_user_data"


# --- the plan ------------------------------------------------------------------------------------


def plan_of(tmp_path: Path, *image: str) -> dict[str, tuple[str, dict[str, object]]]:
    p = make_plan(load_matrix(matrix(tmp_path, *image)))
    return {j.id.split(":")[0]: (j.key, j.params) for j in p.jobs}


def test_cloud_init_puts_the_package_in_and_the_list_in_the_keys(tmp_path: Path) -> None:
    plain = plan_of(tmp_path)
    nocloud = plan_of(tmp_path, 'cloud_init = ["NoCloud"]')
    both = plan_of(tmp_path, 'cloud_init = ["NoCloud", "ConfigDrive"]')
    assert "cloud-init" not in plain["rootfs"][1]["packages"]  # type: ignore[operator]
    assert "cloud-init" in nocloud["rootfs"][1]["packages"]  # type: ignore[operator]
    assert nocloud["finalise"][1]["datasources"] == ["NoCloud", "None"]
    assert plain["rootfs"][0] != nocloud["rootfs"][0]
    # Another list is the same tree, finalised otherwise: a new finalise and disk.
    assert nocloud["rootfs"][0] == both["rootfs"][0]
    assert nocloud["finalise"][0] != both["finalise"][0]
    assert nocloud["assemble"][0] != both["assemble"][0]


def test_user_data_bytes_are_in_the_boot_key_only(tmp_path: Path) -> None:
    (tmp_path / "ud").write_text("#cloud-config\nruncmd: [[true]]\n")
    image = ('cloud_init = ["NoCloud"]', "boot_test = true", 'boot_test_user_data = "ud"')
    one = plan_of(tmp_path, *image)
    (tmp_path / "ud").write_text("#cloud-config\nruncmd: [[false]]\n")
    two = plan_of(tmp_path, *image)
    assert one["assemble"][0] == two["assemble"][0]
    assert one["boot"][0] != two["boot"][0]
    user_data = two["boot"][1]["user_data"]
    assert user_data == {
        "path": str(tmp_path / "ud"),
        "digest": hashlib.sha256(b"#cloud-config\nruncmd: [[false]]\n").hexdigest(),
    }
    # Where the file is does not count, what it holds does.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "ud").write_text("#cloud-config\nruncmd: [[false]]\n")
    assert plan_of(other, *image)["boot"][0] == two["boot"][0]


# --- finalise ------------------------------------------------------------------------------------


def test_datasource_file_and_no_instance_state(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("etc/cloud/cloud.cfg.d", "var/lib/cloud/instances/i-1", "etc/ssh", "dev"):
        (tree / d).mkdir(parents=True)
    (tree / "var/lib/cloud/instance").symlink_to("/var/lib/cloud/instances/i-1")
    (tree / "var/lib/cloud/data").mkdir()
    (tree / "var/lib/cloud/data/instance-id").write_text("i-1\n")
    (tree / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    finalise._cloud_init(tree, ("NoCloud", "None"))
    finalise._identity(tree)
    cfg = tree / "etc/cloud/cloud.cfg.d/91-factory-datasources.cfg"
    assert cfg.read_text().splitlines()[-1] == "datasource_list: [ NoCloud, None ]"
    assert list((tree / "var/lib/cloud").iterdir()) == []
    assert list((tree / "etc/ssh").iterdir()) == []
    assert (tree / "etc/machine-id").read_text() == ""


def test_cloud_init_without_the_package_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    finalise._cloud_init(tmp_path, ())  # nothing asked, nothing done
    assert not (tmp_path / "etc/cloud").exists()
    with pytest.raises(StageError, match="no cloud-init package"):
        finalise._cloud_init(tmp_path, ("NoCloud", "None"))


# --- the NoCloud seed ---------------------------------------------------------------------------


needs_mtools = pytest.mark.skipif(
    shutil.which("mcopy") is None or not Path("/usr/sbin/mkfs.vfat").exists(),
    reason="mtools and dosfstools",
)


def mtools(*args: str | Path) -> str:
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=True, env=env
    ).stdout


@needs_mtools
async def test_the_seed_is_a_cidata_fat_with_both_files_and_goes_away(tmp_path: Path) -> None:
    data = b"#cloud-config\nruncmd: [[echo, hi]]\n" + b"#" * 5000 + b"\n"
    async with boot.nocloud_seed(tmp_path, data) as seed:
        assert seed.parent.parent == tmp_path
        assert "CIDATA" in mtools("mlabel", "-s", "-i", seed, "::")
        assert mtools("mtype", "-i", seed, "::user-data").encode() == data
        meta = mtools("mtype", "-i", seed, "::meta-data")
        assert meta == f'instance-id: "{boot.instance_id_of(data)}"\nlocal-hostname: "factory"\n'
        blkid = mtools(shutil.which("blkid") or "/usr/sbin/blkid", "-p", "-o", "export", seed)
        assert "TYPE=vfat" in blkid and "LABEL=CIDATA" in blkid  # what ds-identify looks for
    assert list(tmp_path.iterdir()) == []


@needs_mtools
async def test_the_seed_goes_away_when_the_boot_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        async with boot.nocloud_seed(tmp_path, b"#cloud-config\n", "iid-x") as seed:
            assert 'instance-id: "iid-x"' in mtools("mtype", "-i", seed, "::meta-data")
            raise RuntimeError("qemu went away")
    assert list(tmp_path.iterdir()) == []


def test_instance_ids() -> None:
    assert boot.instance_id_of(b"a") != boot.instance_id_of(b"b")
    assert boot.instance_id_of(b"a") == boot.instance_id_of(b"a")
    assert boot.check_instance_id("iid-local01") == "iid-local01"
    for bad in ("", "a b", "x\ninstance-id: y", '"q"', "a" * 129):
        with pytest.raises(StageError, match="is not plain"):
            boot.check_instance_id(bad)


def test_the_seed_is_a_second_virtio_drive(tmp_path: Path) -> None:
    args = boot.qemu_args(tmp_path / "d.raw", "raw", "amd64", "bios", None, seed=tmp_path / "s")
    drives = [args[i + 1] for i, a in enumerate(args) if a == "-drive"]
    assert drives == [f"file={tmp_path}/d.raw,format=raw,if=virtio", f"file={tmp_path}/s,format=raw,if=virtio"]  # fmt: skip  # noqa: E501
    assert "-snapshot" in args  # the seed, like the disk, is never written
    assert args[args.index("-nic") + 1] == "user,restrict=on,model=virtio-net-pci"
    plain = boot.qemu_args(tmp_path / "d.raw", "raw", "amd64", "bios", None)
    assert plain[plain.index("-nic") + 1] == "none"


# --- waiting for several lines -------------------------------------------------------------------


async def test_until_waits_for_every_pattern_in_any_order() -> None:
    script = "echo 'FINISHED'; sleep 0.2; printf 'debian login: '; sleep 600"
    with anyio.fail_after(10):
        done = await proc.run(["sh", "-c", script], until=(r"login:\s*$", "FINISHED"))
    assert done.matched is True
    with pytest.raises(proc.CommandError, match="one that matches 'MISSING'"):
        await proc.run(["sh", "-c", "echo 'login: '"], until=(r"login:", "MISSING"))


async def test_until_one_pattern_is_not_enough_for_two() -> None:
    with pytest.raises(TimeoutError):
        await proc.run(["sh", "-c", "echo 'login: '; sleep 600"], until=("login:", "X"), timeout=1)


# --- the command ---------------------------------------------------------------------------------


def test_boot_options_are_checked_before_any_boot(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(b"\0" * 512)
    r = factory("boot", image, "--arch", "amd64", "--instance-id", "iid-1")
    assert r.returncode == 2 and "give --cloud-init USER_DATA too" in r.stderr
    r = factory("boot", image, "--arch", "amd64", "--cloud-init", tmp_path / "none")
    assert r.returncode == 2 and "--cloud-init" in r.stderr
    (tmp_path / "ud").write_text("#cloud-config\n")
    r = factory("boot", image, "--cloud-init", tmp_path / "ud", "--instance-id", "a b")
    assert r.returncode == 2 and "is not plain" in r.stderr
