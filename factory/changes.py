"""What changed between two runs: the packages of each cell, from their dpkg manifests.

A run writes OUT/CELL/CELL.manifest.json per cell; comparing two such folders (or two
lists of rows) says which packages came, went or moved to another version, for a
CHANGES.md beside the images and for `factory diff OLD_OUT NEW_OUT`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Key = tuple[str, str]  # (package, arch): multiarch installs one name for several arches


@dataclass(frozen=True)
class Changes:
    """One cell's package changes, each list sorted by package name."""

    added: tuple[tuple[str, str], ...] = ()  # (package, version)
    removed: tuple[tuple[str, str], ...] = ()  # (package, version)
    changed: tuple[tuple[str, str, str], ...] = ()  # (package, old version, new version)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, list[dict[str, str]]]:
        return {
            "added": [{"package": p, "version": v} for p, v in self.added],
            "removed": [{"package": p, "version": v} for p, v in self.removed],
            "changed": [{"package": p, "old": o, "new": n} for p, o, n in self.changed],
        }


def diff(old_rows: Iterable[Mapping[str, str]], new_rows: Iterable[Mapping[str, str]]) -> Changes:
    """Changes from one manifest to another, keyed by (package, arch). Only installed
    packages count: one left as config-files is gone from the image. A name installed for
    several arches is shown as `name:arch` so its lines are not ambiguous."""
    old, new = _versions(old_rows), _versions(new_rows)
    arches: dict[str, set[str]] = {}
    for package, arch in [*old, *new]:
        arches.setdefault(package, set()).add(arch)

    def label(key: Key) -> str:
        return f"{key[0]}:{key[1]}" if len(arches[key[0]]) > 1 else key[0]

    return Changes(
        added=tuple(sorted((label(k), new[k]) for k in new.keys() - old.keys())),
        removed=tuple(sorted((label(k), old[k]) for k in old.keys() - new.keys())),
        changed=tuple(
            sorted((label(k), old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k])
        ),
    )


def markdown(title: str, per_cell: Mapping[str, Changes | None], since: str | None) -> str:
    """A readable CHANGES.md: a heading, a summary, then a section per cell (None = no
    earlier manifest: a first build)."""
    return _render(title, per_cell, since, md=True)


def load_manifest(path: Path) -> list[dict[str, str]]:
    """A manifest's rows; ValueError (one line) if the file is not a JSON list of rows."""
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the manifest: {e}") from None
    if not isinstance(data, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("package"), str)
        and isinstance(r.get("version"), str)
        for r in data
    ):
        raise ValueError(f"{path}: not a manifest (a JSON list of package rows)")
    return [{str(k): str(v) for k, v in r.items() if v is not None} for r in data]


def manifests(out: Path, label: str = "OUT") -> dict[str, Path]:
    """cell id → its manifest in a factory output folder: those its report.json points at,
    and every CELL/CELL.manifest.json (a run with --only leaves the other cells' files of
    earlier runs, which are still what OUT holds). ValueError when there is none."""
    if not out.is_dir():
        raise ValueError(f"{label}: {out} is not a folder")
    found = {
        p.parent.name: p
        for p in sorted(out.glob("*/*.manifest.json"))
        if p.name == f"{p.parent.name}.manifest.json"
    }
    found.update({c: p for c, p in _from_report(out).items() if p.is_file()})
    if not found:
        raise ValueError(f"{label}: no manifests in {out} (is it a factory output folder?)")
    return dict(sorted(found.items()))


def compare_outputs(old_out: Path, new_out: Path) -> dict[str, Changes | None]:
    """Per cell of either folder, what changed from OLD to NEW: a cell only in NEW is a
    first build (None), one only in OLD had everything removed."""
    old, new = manifests(old_out, "OLD"), manifests(new_out, "NEW")
    result: dict[str, Changes | None] = {}
    for cell in sorted(old.keys() | new.keys()):
        before = load_manifest(old[cell]) if cell in old else None
        after = load_manifest(new[cell]) if cell in new else []
        result[cell] = None if before is None else diff(before, after)
    return result


def render_diff(old_out: Path, new_out: Path) -> str:
    """`factory diff OLD_OUT NEW_OUT`: the same report as CHANGES.md, as plain text."""
    per_cell = compare_outputs(old_out, new_out)
    return _render(f"Changes from {old_out} to {new_out}", per_cell, None, md=False)


def _versions(rows: Iterable[Mapping[str, str]]) -> dict[Key, str]:
    return {
        (r["package"], r.get("arch", "")): r["version"]
        for r in rows
        if r.get("status", "installed") == "installed"
    }


def _from_report(out: Path) -> dict[str, Path]:
    """Manifests that OUT/report.json points at: finalise jobs' `manifest`, else the
    usual path of each cell with a job or an artifact. Empty without a usable report."""
    try:
        report: Any = json.loads((out / "report.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(report, dict):
        return {}
    found: dict[str, Path] = {}
    records = [*(report.get("jobs") or []), *(report.get("artifacts") or [])]
    for rec in records:
        cell = rec.get("cell") if isinstance(rec, dict) else None
        if not isinstance(cell, str) or not cell:
            continue
        info = rec.get("info")
        named = info.get("manifest") if isinstance(info, dict) else None
        if isinstance(named, str):
            found[cell] = out / named
        else:
            found.setdefault(cell, out / cell / f"{cell}.manifest.json")
    return found


def _render(
    title: str, per_cell: Mapping[str, Changes | None], since: str | None, *, md: bool
) -> str:
    def v(version: str) -> str:
        # A `~` pair (1.0~rc1 → 1.0~rc2) would be strikethrough in Markdown.
        return version.replace("~", "\\~") if md else version

    firsts = [c for c, ch in per_cell.items() if ch is None]
    same = [c for c, ch in per_cell.items() if ch is not None and ch.empty]
    moved = len(per_cell) - len(firsts) - len(same)
    lines = [f"# {title}" if md else title, ""]
    if since:
        lines += [f"Since {since}.", ""]
    summary = f"{len(per_cell)} cell{'s' if len(per_cell) != 1 else ''}: {moved} changed"
    summary += (
        f", {len(same)} unchanged, {len(firsts)} first build{'s' if len(firsts) != 1 else ''}"
    )
    lines += [summary + ".", ""]
    for cell in sorted(per_cell):
        ch = per_cell[cell]
        lines.append(f"## {cell}" if md else f"{cell}:")
        if md:
            lines.append("")
        if ch is None:
            lines.append("- first build (no earlier manifest)")
        elif ch.empty:
            lines.append("- no package changed")
        else:
            lines += [f"- {p} {v(o)} → {v(n)}" for p, o, n in ch.changed]
            lines += [f"- added {p} {v(ver)}" for p, ver in ch.added]
            lines += [f"- removed {p} {v(ver)}" for p, ver in ch.removed]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
