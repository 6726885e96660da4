"""factory.changes: package changes between two manifests and two output folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory import changes
from factory.changes import Changes


def row(
    package: str, version: str, arch: str = "amd64", status: str = "installed"
) -> dict[str, str]:
    return {"package": package, "version": version, "arch": arch, "status": status}


OLD = [row("bash", "5.2.15-2+b2"), row("factory-marker", "1.0", "all"), row("bar", "1.0")]
NEW = [row("bash", "5.2.15-2+b2"), row("factory-marker", "1.1", "all"), row("foo", "2.0")]


def test_diff_of_rows() -> None:
    got = changes.diff(OLD, NEW)
    assert got == Changes(
        added=(("foo", "2.0"),),
        removed=(("bar", "1.0"),),
        changed=(("factory-marker", "1.0", "1.1"),),
    )
    assert not got.empty
    assert got.to_json() == {
        "added": [{"package": "foo", "version": "2.0"}],
        "removed": [{"package": "bar", "version": "1.0"}],
        "changed": [{"package": "factory-marker", "old": "1.0", "new": "1.1"}],
    }


def test_same_rows_are_empty() -> None:
    got = changes.diff(OLD, list(reversed(OLD)))
    assert got.empty
    assert got.to_json() == {"added": [], "removed": [], "changed": []}


def test_lists_are_sorted() -> None:
    got = changes.diff([], [row("zz", "1"), row("aa", "1"), row("mm", "1")])
    assert [p for p, _ in got.added] == ["aa", "mm", "zz"]


def test_multiarch_names_carry_their_arch() -> None:
    old = [row("libc6", "2.36-9"), row("libc6", "2.36-9", "i386")]
    new = [row("libc6", "2.36-9"), row("libc6", "2.36-10", "i386")]
    assert changes.diff(old, new).changed == (("libc6:i386", "2.36-9", "2.36-10"),)
    gone = changes.diff(old, [row("libc6", "2.36-9")])
    assert gone.removed == (("libc6:i386", "2.36-9"),)


def test_only_installed_packages_count() -> None:
    """A package removed with its conffiles kept (config-files) is gone from the image."""
    new = [*OLD[:2], row("bar", "1.0", status="config-files")]
    assert changes.diff(OLD, new).removed == (("bar", "1.0"),)


def test_rows_of_older_manifests() -> None:
    """Rows without status, source or maintainer still compare."""
    old = [{"package": "a", "version": "1", "arch": "amd64"}]
    new = [{"package": "a", "version": "2", "arch": "amd64", "source": "a", "maintainer": "x"}]
    assert changes.diff(old, new).changed == (("a", "1", "2"),)


def test_markdown() -> None:
    per_cell: dict[str, Changes | None] = {
        "debian-trixie-amd64": None,
        "debian-bookworm-amd64": changes.diff(OLD, NEW),
        "debian-bookworm-arm64": changes.diff(OLD, OLD),
    }
    text = changes.markdown("Changes in run k2", per_cell, since="run k1")
    assert text == (
        "# Changes in run k2\n"
        "\n"
        "Since run k1.\n"
        "\n"
        "3 cells: 1 changed, 1 unchanged, 1 first build.\n"
        "\n"
        "## debian-bookworm-amd64\n"
        "\n"
        "- factory-marker 1.0 → 1.1\n"
        "- added foo 2.0\n"
        "- removed bar 1.0\n"
        "\n"
        "## debian-bookworm-arm64\n"
        "\n"
        "- no package changed\n"
        "\n"
        "## debian-trixie-amd64\n"
        "\n"
        "- first build (no earlier manifest)\n"
    )


def test_markdown_escapes_tildes_and_omits_since() -> None:
    per_cell: dict[str, Changes | None] = {"c": Changes(changed=(("x", "1.0~rc1", "1.0~rc2"),))}
    text = changes.markdown("T", per_cell, None)
    assert "Since" not in text
    assert "- x 1.0\\~rc1 → 1.0\\~rc2\n" in text


# --- output folders -------------------------------------------------------------------


def make_out(out: Path, cells: dict[str, list[dict[str, str]]]) -> Path:
    for cell, rows in cells.items():
        (out / cell).mkdir(parents=True, exist_ok=True)
        (out / cell / f"{cell}.manifest.json").write_text(json.dumps(rows, indent=1))
        (out / cell / f"{cell}.qcow2").write_bytes(b"not an image")
    return out


def test_compare_outputs(tmp_path: Path) -> None:
    old = make_out(tmp_path / "old", {"debian-bookworm-amd64": OLD, "debian-bookworm-i386": OLD})
    new = make_out(tmp_path / "new", {"debian-bookworm-amd64": NEW, "debian-trixie-amd64": NEW})
    got = changes.compare_outputs(old, new)
    assert list(got) == ["debian-bookworm-amd64", "debian-bookworm-i386", "debian-trixie-amd64"]
    assert got["debian-bookworm-amd64"] == changes.diff(OLD, NEW)
    assert got["debian-trixie-amd64"] is None  # first build
    gone = got["debian-bookworm-i386"]
    assert gone is not None
    assert gone.removed == (("bar", "1.0"), ("bash", "5.2.15-2+b2"), ("factory-marker", "1.0"))
    assert not gone.added and not gone.changed


def test_compare_follows_report_json(tmp_path: Path) -> None:
    """report.json's finalise job names the manifest, wherever it is."""
    old = make_out(tmp_path / "old", {"c1": OLD})
    new = tmp_path / "new"
    (new / "elsewhere").mkdir(parents=True)
    (new / "elsewhere" / "m.json").write_text(json.dumps(NEW))
    report = {
        "jobs": [
            {"cell": "c1", "kind": "rootfs", "info": {}},
            {"cell": "c1", "kind": "finalise", "info": {"manifest": "elsewhere/m.json"}},
            {"cell": None, "kind": "fetch", "info": {}},
        ],
        "artifacts": [{"cell": "c1", "path": "c1/c1.qcow2"}],
    }
    (new / "report.json").write_text(json.dumps(report))
    assert changes.compare_outputs(old, new) == {"c1": changes.diff(OLD, NEW)}


def test_a_broken_report_json_falls_back_to_the_files(tmp_path: Path) -> None:
    old = make_out(tmp_path / "old", {"c1": OLD})
    new = make_out(tmp_path / "new", {"c1": NEW})
    (new / "report.json").write_text("{not json")
    assert changes.compare_outputs(old, new) == {"c1": changes.diff(OLD, NEW)}


def test_cells_left_by_earlier_runs_count(tmp_path: Path) -> None:
    """A --only run's report names one cell; the other cells' files are still OUT's."""
    old = make_out(tmp_path / "old", {"c1": OLD, "c2": OLD})
    new = make_out(tmp_path / "new", {"c1": NEW, "c2": OLD})
    (new / "report.json").write_text(json.dumps({"jobs": [], "artifacts": [{"cell": "c1"}]}))
    got = changes.compare_outputs(old, new)
    assert got["c2"] == Changes()
    assert got["c1"] == changes.diff(OLD, NEW)


def test_folder_without_manifests(tmp_path: Path) -> None:
    good = make_out(tmp_path / "good", {"c1": OLD})
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"^OLD: no manifests in .*empty \(is it a factory output folder\?\)$"
    ):
        changes.compare_outputs(empty, good)
    with pytest.raises(ValueError, match=r"^NEW: no manifests"):
        changes.compare_outputs(good, empty)
    with pytest.raises(ValueError, match=r"^NEW: .*missing is not a folder$"):
        changes.compare_outputs(good, tmp_path / "missing")


def test_unreadable_manifest(tmp_path: Path) -> None:
    old = make_out(tmp_path / "old", {"c1": OLD})
    new = make_out(tmp_path / "new", {"c1": NEW})
    (new / "c1" / "c1.manifest.json").write_text('{"package": "a"}')
    with pytest.raises(ValueError, match=r"c1.manifest.json: not a manifest"):
        changes.compare_outputs(old, new)
    (new / "c1" / "c1.manifest.json").write_text("[")
    with pytest.raises(ValueError, match=r"c1.manifest.json: cannot read the manifest"):
        changes.compare_outputs(old, new)


def test_load_manifest_drops_nulls(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"package": "a", "version": "1", "source": None}]))
    assert changes.load_manifest(path) == [{"package": "a", "version": "1"}]


def test_render_diff(tmp_path: Path) -> None:
    old = make_out(tmp_path / "old", {"debian-bookworm-amd64": OLD})
    new = make_out(tmp_path / "new", {"debian-bookworm-amd64": NEW, "debian-trixie-amd64": NEW})
    text = changes.render_diff(old, new)
    assert text.splitlines() == [
        f"Changes from {old} to {new}",
        "",
        "2 cells: 1 changed, 0 unchanged, 1 first build.",
        "",
        "debian-bookworm-amd64:",
        "- factory-marker 1.0 → 1.1",
        "- added foo 2.0",
        "- removed bar 1.0",
        "",
        "debian-trixie-amd64:",
        "- first build (no earlier manifest)",
    ]
