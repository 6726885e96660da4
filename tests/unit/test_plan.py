"""The plan: one rootfs per cell, a DAG of jobs, keys that are stable and content-addressed."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from factory.plan import KINDS, Plan, hook_digest, job_key, make_plan
from factory.spec import load_matrix
from factory.stages import registry

ROOT = Path(__file__).resolve().parents[2]
NIGHTLY = ROOT / "matrix" / "nightly.toml"
CELL_ID = re.compile(r"^[a-z0-9]+-[a-z0-9]+-[a-z0-9]+$")


def write_matrix(
    folder: Path,
    *,
    packages: tuple[str, ...] = ("openssh-server",),
    hooks: tuple[str, ...] = (),
    exclude: str = "",
    formats: str | None = None,
    extra: str = "",
    name: str = "t",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "matrix.toml"
    fmts = formats or '["raw", "qcow2", "tar"]'
    path.write_text(
        f'name = "{name}"\n'
        'arches = ["amd64", "ppc64el"]\n'
        'distros = ["debian/bookworm", "debian/trixie"]\n'
        f"formats = {fmts}\n"
        + (f"exclude = {exclude}\n" if exclude else "")
        + "[image]\n"
        + f"packages = {json.dumps(list(packages))}\n"
        + f"hooks = {json.dumps(list(hooks))}\n"
        + extra
    )
    return path


def make_hook(folder: Path, script: str = "#!/bin/sh\necho hi\n") -> Path:
    (folder / "finalise.d").mkdir(parents=True)
    f = folder / "finalise.d" / "10-hello"
    f.write_text(script)
    f.chmod(0o755)
    return folder


def keys(p: Plan) -> dict[str, str]:
    return {j.id: j.key for j in p.jobs}


def ancestors(p: Plan, jid: str) -> set[str]:
    jobs = p.by_id()
    seen: set[str] = set()
    stack = list(jobs[jid].deps)
    while stack:
        d = stack.pop()
        if d not in seen:
            seen.add(d)
            stack.extend(jobs[d].deps)
    return seen


@pytest.fixture(scope="module")
def nightly() -> Plan:
    return make_plan(load_matrix(NIGHTLY))


# --- shape ------------------------------------------------------------------------------------


def test_one_rootfs_per_cell(nightly: Plan) -> None:
    cells = nightly.cells()
    assert sorted(cells) == [
        "debian-bookworm-amd64",
        "debian-bookworm-arm64",
        "debian-bookworm-ppc64el",
        "debian-trixie-amd64",
    ]  # arm64/trixie and ppc64el/trixie are excluded
    for cell in cells:
        rootfs = [j for j in nightly.jobs if j.cell == cell and j.kind == "rootfs"]
        assert len(rootfs) == 1, cell
        assert rootfs[0].deps == ()
        for j in nightly.jobs:
            if j.cell == cell and j is not rootfs[0]:
                assert rootfs[0].id in ancestors(nightly, j.id), j.id


def test_every_format_of_a_cell_shares_one_tree(nightly: Plan) -> None:
    cell = "debian-bookworm-amd64"
    jobs = [j for j in nightly.jobs if j.cell == cell]
    kinds = [j.kind for j in jobs]
    assert kinds.count("finalise") == 1
    assert kinds.count("assemble") == 1  # one disk for raw, qcow2, vhd, vmdk, vdi
    publish = {j.params["format"] for j in jobs if j.kind == "publish"}
    assert publish == {
        "raw",
        "qcow2",
        "vhd",
        "vmdk",
        "vdi",
        "tar",
        "tgz",
        "squashfs",
        "aci",
        "docker",
    }
    convert = {j.params["format"] for j in jobs if j.kind == "convert"}
    assert convert == {"qcow2", "vhd", "vmdk", "vdi"}
    pack = {j.params["format"] for j in jobs if j.kind == "pack"}
    assert pack == {"tar", "tgz", "squashfs", "aci", "docker"}


def test_ids_unique_deps_exist_and_acyclic(nightly: Plan) -> None:
    ids = [j.id for j in nightly.jobs]
    assert len(ids) == len(set(ids))
    position = {jid: i for i, jid in enumerate(ids)}
    for j in nightly.jobs:
        assert j.kind in KINDS
        assert CELL_ID.match(j.cell), j.cell
        for d in j.deps:
            assert d in position, (j.id, d)
            # deps come earlier in the plan: a topological order, so no cycle is possible
            assert position[d] < position[j.id]
            assert nightly.by_id()[d].cell == j.cell  # cells do not depend on each other


def test_cell_ids(nightly: Plan) -> None:
    for j in nightly.jobs:
        family, release, arch = j.cell.split("-")
        assert family == "debian"
        assert release in ("bookworm", "trixie")
        assert arch == j.arch
        assert j.id.split(":")[1] == j.cell


def test_to_json_shape(nightly: Plan) -> None:
    data = json.loads(json.dumps(nightly.to_json()))
    assert isinstance(data["jobs"], list)
    assert len(data["jobs"]) == len(nightly.jobs)
    for entry, j in zip(data["jobs"], nightly.jobs, strict=True):
        assert set(entry) == {"id", "kind", "cell", "deps", "key"}
        assert entry == {
            "id": j.id,
            "kind": j.kind,
            "cell": j.cell,
            "deps": list(j.deps),
            "key": j.key,
        }
        assert re.fullmatch(r"[0-9a-f]{64}", entry["key"])


def test_select_keeps_deps(nightly: Plan) -> None:
    target = "publish:debian-bookworm-amd64:qcow2"
    sub = nightly.select([target])
    assert [j.id for j in sub.jobs] == [
        "rootfs:debian-bookworm-amd64",
        "finalise:debian-bookworm-amd64",
        "assemble:debian-bookworm-amd64",
        "convert:debian-bookworm-amd64:qcow2",
        "publish:debian-bookworm-amd64:qcow2",
    ]
    assert sub.matrix == nightly.matrix
    # jobs are the same objects' values, keys included
    assert all(j == nightly.by_id()[j.id] for j in sub.jobs)


def test_select_several_in_plan_order(nightly: Plan) -> None:
    sub = nightly.select(["pack:debian-trixie-amd64:tar", "rootfs:debian-bookworm-ppc64el"])
    ids = [j.id for j in sub.jobs]
    assert ids == [
        "rootfs:debian-bookworm-ppc64el",
        "rootfs:debian-trixie-amd64",
        "finalise:debian-trixie-amd64",
        "pack:debian-trixie-amd64:tar",
    ]
    assert nightly.select([]).jobs == ()


def test_excludes_remove_cells(tmp_path: Path) -> None:
    full = make_plan(load_matrix(write_matrix(tmp_path / "a")))
    assert len(full.cells()) == 4
    excluded = make_plan(
        load_matrix(
            write_matrix(tmp_path / "b", exclude='[{ arch = "ppc64el", distro = "debian/trixie" }]')
        )
    )
    assert sorted(excluded.cells()) == [
        "debian-bookworm-amd64",
        "debian-bookworm-ppc64el",
        "debian-trixie-amd64",
    ]
    assert not any(j.cell == "debian-trixie-ppc64el" for j in excluded.jobs)
    by_arch = make_plan(load_matrix(write_matrix(tmp_path / "c", exclude='[{ arch = "ppc64el" }]')))
    assert sorted(by_arch.cells()) == ["debian-bookworm-amd64", "debian-trixie-amd64"]
    # what is left is planned exactly as before
    assert keys(excluded).items() <= keys(full).items()


def test_tree_formats_only_plan_no_disk(tmp_path: Path) -> None:
    p = make_plan(load_matrix(write_matrix(tmp_path, formats='["tar", "docker"]')))
    assert not [j for j in p.jobs if j.kind in ("assemble", "convert", "boot")]
    assert {j.kind for j in p.jobs} == {"rootfs", "finalise", "pack", "publish"}


def test_boot_test_adds_a_boot_job_after_assemble(tmp_path: Path) -> None:
    p = make_plan(
        load_matrix(write_matrix(tmp_path, formats='["tar"]', extra="boot_test = true\n"))
    )
    boots = [j for j in p.jobs if j.kind == "boot"]
    assert len(boots) == len(p.cells()) == 4
    for b in boots:
        assert b.deps == (f"assemble:{b.cell}",)


def test_layout_follows_the_arch(nightly: Plan) -> None:
    for j in nightly.jobs:
        if j.kind == "assemble":
            layout = {"amd64": "mbr", "arm64": "gpt-efi", "ppc64el": "ppc-prep"}[j.arch]
            assert j.params["layout"]["name"] == layout
            boot = {"amd64": ["bios-mbr"], "arm64": ["uefi"], "ppc64el": ["prep"]}[j.arch]
            assert j.params["boot"] == boot


# --- keys -------------------------------------------------------------------------------------


def test_keys_stable_across_folders(nightly: Plan, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "nightly.toml"
    copy.parent.mkdir()
    shutil.copy(NIGHTLY, copy)
    again = make_plan(load_matrix(copy))
    assert keys(again) == keys(nightly)
    assert again.to_json() == nightly.to_json()
    # the planned filesystem UUIDs are stable too (the tree is finalised before any disk)
    assert [j.params for j in again.jobs] == [j.params for j in nightly.jobs]


def test_keys_differ_between_jobs(nightly: Plan) -> None:
    all_keys = [j.key for j in nightly.jobs]
    assert len(set(all_keys)) == len(all_keys)
    uuids = {j.params["root_uuid"] for j in nightly.jobs if j.kind == "finalise"}
    assert len(uuids) == len(nightly.cells())


def test_packages_change_keys(tmp_path: Path) -> None:
    a = make_plan(load_matrix(write_matrix(tmp_path / "a", packages=("openssh-server",))))
    b = make_plan(load_matrix(write_matrix(tmp_path / "b", packages=("openssh-server", "curl"))))
    ka, kb = keys(a), keys(b)
    assert ka.keys() == kb.keys()
    # every job is downstream of a rootfs, so every key changes
    assert all(ka[jid] != kb[jid] for jid in ka)
    # the same set in another order is the same image
    c = make_plan(load_matrix(write_matrix(tmp_path / "c", packages=("curl", "openssh-server"))))
    assert keys(c) == kb


def test_hook_content_changes_finalise_keys_not_rootfs(tmp_path: Path) -> None:
    make_hook(tmp_path / "a" / "myhook", "#!/bin/sh\necho one\n")
    before = make_plan(load_matrix(write_matrix(tmp_path / "a", hooks=("myhook",))))
    (tmp_path / "a" / "myhook" / "finalise.d" / "10-hello").write_text("#!/bin/sh\necho two\n")
    after = make_plan(load_matrix(write_matrix(tmp_path / "a", hooks=("myhook",))))
    kb, ka = keys(before), keys(after)
    for j in before.jobs:
        if j.kind == "rootfs":
            assert kb[j.id] == ka[j.id], j.id
        else:
            assert kb[j.id] != ka[j.id], j.id  # finalise and everything after it


def test_hook_mode_change_changes_keys(tmp_path: Path) -> None:
    hook = make_hook(tmp_path / "a" / "myhook")
    before = keys(make_plan(load_matrix(write_matrix(tmp_path / "a", hooks=("myhook",)))))
    (hook / "finalise.d" / "10-hello").chmod(0o644)
    after = keys(make_plan(load_matrix(write_matrix(tmp_path / "a", hooks=("myhook",)))))
    assert before["finalise:debian-bookworm-amd64"] != after["finalise:debian-bookworm-amd64"]


def test_moving_the_hook_folder_keeps_keys(tmp_path: Path) -> None:
    make_hook(tmp_path / "a" / "myhook")
    here = make_plan(load_matrix(write_matrix(tmp_path / "a", hooks=("myhook",))))
    shutil.copytree(tmp_path / "a" / "myhook", tmp_path / "b" / "deeper" / "myhook")
    there = make_plan(load_matrix(write_matrix(tmp_path / "b", hooks=("deeper/myhook",))))
    assert keys(here) == keys(there)
    # and hooks are part of the key at all
    none = make_plan(load_matrix(write_matrix(tmp_path / "c")))
    assert (
        keys(none)["finalise:debian-bookworm-amd64"] != keys(here)["finalise:debian-bookworm-amd64"]
    )


def test_job_key_ignores_locations_and_dep_order() -> None:
    p1 = {"hooks": [{"name": "h", "digest": "d", "path": "/one/h"}], "x": 1}
    p2 = {"hooks": [{"name": "h", "digest": "d", "path": "/two/h"}], "x": 1}
    assert job_key("finalise", p1, ["k1", "k2"]) == job_key("finalise", p2, ["k2", "k1"])
    assert job_key("finalise", p1, ["k1"]) != job_key("finalise", p1, ["k2"])
    assert job_key("finalise", p1, []) != job_key("assemble", p1, [])
    p3 = {"hooks": [{"name": "h", "digest": "other", "path": "/one/h"}], "x": 1}
    assert job_key("finalise", p1, []) != job_key("finalise", p3, [])


def test_recipe_bump_changes_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    before = job_key("rootfs", {"a": 1}, [])
    stage = registry.STAGES["rootfs"]
    monkeypatch.setitem(
        registry.STAGES, "rootfs", dataclasses.replace(stage, recipe=stage.recipe + 1)
    )
    assert job_key("rootfs", {"a": 1}, []) != before


def test_code_fingerprint_is_in_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed stage module (or a module it imports) gives new keys for its kind only."""
    before = {kind: job_key(kind, {"a": 1}, []) for kind in registry.STAGES}
    assert "factory.distros.debian" in registry.code_of("finalise")
    assert "factory.stages.bootloader" in registry.code_of("assemble")
    real = registry.fingerprint
    monkeypatch.setattr(
        registry, "fingerprint", lambda kind: "changed" if kind == "finalise" else real(kind)
    )
    after = {kind: job_key(kind, {"a": 1}, []) for kind in registry.STAGES}
    assert [k for k in registry.STAGES if after[k] != before[k]] == ["finalise"]


def test_hook_digest(tmp_path: Path) -> None:
    a = make_hook(tmp_path / "a")
    b = make_hook(tmp_path / "b")
    assert hook_digest(a) == hook_digest(b)
    (b / "finalise.d" / "10-hello").rename(b / "finalise.d" / "20-hello")
    assert hook_digest(a) != hook_digest(b)  # file names matter (they order the scripts)
    c = make_hook(tmp_path / "c")
    (c / "cleanup.d").mkdir()
    (c / "cleanup.d" / "link").symlink_to("../finalise.d/10-hello")
    d = make_hook(tmp_path / "d")
    (d / "cleanup.d").mkdir()
    (d / "cleanup.d" / "link").symlink_to("../finalise.d/other")
    assert len({hook_digest(a), hook_digest(c), hook_digest(d)}) == 3


def test_several_layouts_give_a_cell_a_disk_each_from_one_tree(tmp_path: Path) -> None:
    """amd64 gets mbr and gpt-efi disks, ppc64el its ppc-prep one; one rootfs per cell."""
    path = write_matrix(
        tmp_path,
        formats='["raw", "qcow2", "tar"]',
        extra='layout = ["mbr", "gpt-efi", "ppc-prep"]\nboot_test = true\n',
        exclude='[{ distro = "debian/trixie" }]',
    )
    p = make_plan(load_matrix(path))
    amd, ppc = "debian-bookworm-amd64", "debian-bookworm-ppc64el"
    ids = {j.id for j in p.jobs}
    assert {f"rootfs:{amd}", f"rootfs:{ppc}"} <= ids
    assert sum(j.kind == "rootfs" for j in p.jobs) == 2
    for layout in ("mbr", "gpt-efi"):
        assert {
            f"assemble:{amd}:{layout}",
            f"convert:{amd}:qcow2-{layout}",
            f"publish:{amd}:raw-{layout}",
            f"publish:{amd}:qcow2-{layout}",
            f"boot:{amd}:{layout}",
        } <= ids
    # A cell with one layout keeps the plain names.
    assert {f"assemble:{ppc}", f"publish:{ppc}:raw", f"boot:{ppc}"} <= ids
    assert f"publish:{amd}:tar" in ids  # tree formats: once per cell
    names = {j.params["name"] for j in p.jobs if j.kind == "publish"}
    assert f"{amd}/{amd}-gpt-efi.qcow2" in names and f"{amd}/{amd}-mbr.raw" in names
    assert f"{ppc}/{ppc}.raw" in names
    by_id = p.by_id()
    # The amd64 tree carries both boot loaders; each boot job boots its own disk.
    assert {"grub-pc-bin", "shim-signed"} <= set(by_id[f"rootfs:{amd}"].params["packages"])
    assert by_id[f"finalise:{amd}"].params["boot"] == ["bios-mbr", "uefi", "bios-gpt"]
    assert by_id[f"boot:{amd}:gpt-efi"].params["boot"] == "uefi"
    assert by_id[f"boot:{amd}:mbr"].params["boot"] == "bios-mbr"
    assert by_id[f"boot:{amd}:gpt-efi"].deps == (f"assemble:{amd}:gpt-efi",)
