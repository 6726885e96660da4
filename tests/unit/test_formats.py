"""The formats registry and the pure parts of convert and pack: the command lines each
format is made with, the manifests written beside the trees, the costs that order work."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from factory import formats
from factory.arches import ARCHES
from factory.plan import make_plan
from factory.spec import load_matrix
from factory.stages import registry
from factory.stages.convert import convert_args, vhd_util_steps
from factory.stages.pack import (
    aci_manifest,
    docker_config,
    docker_manifest,
    gzip_program,
    layer_members,
    mksquashfs_args,
)

ROOT = Path(__file__).resolve().parents[2]
TEN = ["raw", "qcow2", "vhd", "vmdk", "vdi", "tar", "tgz", "squashfs", "aci", "docker"]
AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")  # appc spec, types.md


def test_registry_has_the_ten_formats_with_distinct_files() -> None:
    assert set(TEN) <= set(formats.FORMATS)
    suffixes = [f.suffix for f in formats.FORMATS.values()]
    assert len(suffixes) == len(set(suffixes))
    assert set(formats.DISK_FORMATS) >= {"raw", "qcow2", "vhd", "vmdk", "vdi", "vhdx"}
    assert set(formats.TREE_FORMATS) == {"tar", "tgz", "squashfs", "aci", "docker"}
    for f in formats.FORMATS.values():
        assert (f.qemu is not None) == (f.source == "disk"), f.name


@pytest.mark.parametrize(
    ("compression", "expected"),
    [
        ("zlib", ["-O", "qcow2", "-m", "16", "-c"]),
        ("zstd", ["-O", "qcow2", "-m", "16", "-c", "-o", "compression_type=zstd"]),
        ("none", ["-O", "qcow2", "-m", "16"]),
    ],
)
def test_qcow2_compression(compression: str, expected: list[str]) -> None:
    assert convert_args("qcow2", compression, None) == expected


def test_one_thread_budget_makes_qcow2_single_threaded() -> None:
    assert convert_args("qcow2", "zlib", None, threads=1)[:4] == ["-O", "qcow2", "-m", "1"]


def test_qcow2_convert_asks_for_no_out_of_order_writes() -> None:
    """-W (out-of-order writes) places clusters as they complete: other bytes each run.
    That the file really is in order: test_repro_disk and test_amd64 read its clusters."""
    assert all("-W" not in convert_args("qcow2", c, None) for c in ("zlib", "zstd", "none"))


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vhd_keeps_its_size_exact(subformat: str) -> None:
    assert convert_args("vhd", None, subformat) == [
        "-O",
        "vpc",
        "-o",
        f"subformat={subformat},force_size=on",
    ]
    assert convert_args("vhd", None, None)[-1] == "subformat=dynamic,force_size=on"


def test_vmdk_is_stream_optimized_and_others_pass_through() -> None:
    assert convert_args("vmdk", None, None) == ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    assert convert_args("vdi", None, None) == ["-O", "vdi"]
    assert convert_args("vhdx", None, None) == ["-O", "vhdx"]
    assert convert_args("parallels", None, None) == ["-O", "parallels"]


def test_vhd_util_steps_as_diskimage_builder() -> None:
    work, dest = Path("/w/d.raw"), Path("/w/d.vhd")
    fixed, dynamic = vhd_util_steps(work, dest, "dynamic")
    assert fixed == ["vhd-util", "convert", "-s", "0", "-t", "1", "-i", str(work), "-o", str(work)]
    assert dynamic == [
        "vhd-util",
        "convert",
        "-s",
        "1",
        "-t",
        "2",
        "-i",
        str(work),
        "-o",
        str(dest),
    ]
    assert vhd_util_steps(work, dest, "fixed") == [fixed]


def test_compression_levels_are_the_cheap_ones() -> None:
    assert formats.get("tgz").level == 3
    assert formats.get("squashfs").level == 3
    assert gzip_program(2) == "pigz -n -3 -p 2"
    assert gzip_program(1) == "pigz -n -3 -p 2"
    args = mksquashfs_args(Path("/t"), Path("/o.sqfs"), 1)
    assert args[args.index("-comp") + 1] == "zstd"
    assert args[args.index("-Xcompression-level") + 1] == "3"
    assert args[args.index("-processors") + 1] == "1"


@pytest.mark.parametrize(
    ("budget", "cores", "expected"), [(1, 2, 1), (None, 2, 2), (8, 2, 2), (0, 4, 4)]
)
def test_threads_follow_the_cpu_budget(budget: int | None, cores: int, expected: int) -> None:
    assert formats.threads(budget, cores) == expected


def test_costs_order_the_long_jobs_first() -> None:
    def cost(kind: str, fmt: str, **extra: str) -> float:
        return registry.cost(kind, {"format": fmt, **extra})

    assert cost("convert", "qcow2", compression="zlib") > cost("convert", "vdi")
    assert cost("convert", "qcow2", compression="zstd") < cost(
        "convert", "qcow2", compression="zlib"
    )
    assert cost("convert", "vmdk") > cost("pack", "tgz") > cost("pack", "squashfs")
    assert cost("pack", "squashfs") > cost("pack", "tar")
    assert cost("publish", "raw") > cost("publish", "qcow2")
    assert registry.cost("assemble", {}) > 0
    assert registry.cost("rootfs", {}) > registry.cost("finalise", {})
    assert registry.cost("finalise", {}) > registry.cost("assemble", {})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("debian-bookworm-amd64", "debian-bookworm-amd64"),
        ("My_Image.V2", "my_image.v2"),
        ("--weird  name--", "weird-name"),
        ("a__b", "a-b"),
    ],
)
def test_ac_identifier(name: str, expected: str) -> None:
    assert formats.ac_identifier(name) == expected
    assert AC_IDENTIFIER.match(expected)


def test_ac_identifier_needs_a_letter_or_digit() -> None:
    with pytest.raises(ValueError, match="AC identifier"):
        formats.ac_identifier("__")


@pytest.mark.parametrize(
    ("arch", "appc"), [(name, a.aci) for name, a in ARCHES.items()]
)
def test_aci_manifest_per_appc_spec(arch: str, appc: str) -> None:
    m = aci_manifest(f"Debian-Bookworm-{arch}", arch)
    assert m["acKind"] == "ImageManifest"
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(m["acVersion"]))
    assert AC_IDENTIFIER.match(str(m["name"]))
    labels = m["labels"]
    assert isinstance(labels, list)
    assert {"name": "os", "value": "linux"} in labels
    assert {"name": "arch", "value": appc} in labels
    names = [label["name"] for label in labels]
    assert len(names) == len(set(names)) and "name" not in names


def test_docker_config_and_manifest_name_each_other() -> None:
    layer = hashlib.sha256(b"layer").hexdigest()
    config = docker_config("ppc64el", layer, "2024-01-01T00:00:00Z")
    assert config["architecture"] == "ppc64le" and config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{layer}"]}
    blob = json.dumps(config, sort_keys=True).encode()
    name = f"{hashlib.sha256(blob).hexdigest()}.json"
    (entry,) = docker_manifest(name, "factory/debian:bookworm", layer)
    assert entry == {
        "Config": name,
        "RepoTags": ["factory/debian:bookworm"],
        "Layers": [f"{layer}/layer.tar"],
    }


def test_layer_members_are_bare_top_level_names(tmp_path: Path) -> None:
    for name in ("usr", "etc", "-dash", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "bin").symlink_to("usr/bin")
    assert layer_members(tmp_path) == sorted(["usr", "etc", "-dash", ".hidden", "bin"])


def test_bench_matrix_plans_all_ten_formats() -> None:
    matrix = load_matrix(ROOT / "matrix" / "bench.toml")
    assert sorted(matrix.formats) == sorted(TEN)
    plan = make_plan(matrix)
    published = sorted(j.params["format"] for j in plan.jobs if j.kind == "publish")
    assert published == sorted(TEN)
    assert len(plan.cells()) == 1


@pytest.mark.parametrize(
    ("fmt", "name", "value"),
    [
        ("qcow2", "compat", "0.10"),
        ("qcow2", "cluster_size", "65536"),
        ("qcow2", "lazy_refcounts", "on"),
        ("vhd", "subformat", "fixed"),
        ("vmdk", "adapter_type", "lsilogic"),
        ("vmdk", "hwversion", "6"),
        ("vdi", "static", "on"),
    ],
)
def test_qemu_img_options_that_are_offered(fmt: str, name: str, value: str) -> None:
    formats.check_qemu_img_option(fmt, name, value)


@pytest.mark.parametrize(
    ("fmt", "name", "value", "says"),
    [
        ("qcow2", "compt", "0.10", "valid: compat, cluster_size"),
        ("qcow2", "compat", "0.9", "valid: 0.10, 1.1, v2, v3"),
        ("qcow2", "cluster_size", "1000", "a power of two"),
        ("qcow2", "backing_file", "/etc/passwd", "no option 'backing_file'"),
        ("vmdk", "subformat", "monolithicFlat", "valid: streamOptimized, monolithicSparse"),
        ("raw", "size", "1", "takes no qemu-img options"),
    ],
)
def test_qemu_img_options_refused_list_the_valid_ones(
    fmt: str, name: str, value: str, says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        formats.check_qemu_img_option(fmt, name, value)


def test_qemu_img_options_come_last_in_the_one_o() -> None:
    args = convert_args("qcow2", "zstd", None, 2, {"cluster_size": "65536"})
    assert args.count("-o") == 1
    assert args[args.index("-o") + 1] == "compression_type=zstd,cluster_size=65536"
    plain = convert_args("qcow2", "zlib", None, 2, {"compat": "0.10"})
    assert plain[plain.index("-o") + 1] == "compat=0.10"
    vhd = convert_args("vhd", None, "dynamic", 2, {"subformat": "fixed"})
    assert vhd[vhd.index("-o") + 1] == "subformat=dynamic,force_size=on,subformat=fixed"
