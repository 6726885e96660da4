"""Matrix → Plan: the DAG of jobs, each with a content key.

Pure: no I/O but hashing the hook folders. A job's key is the sha256 of its kind, its
recipe version, its parameters and its dependencies' keys, so the same inputs give the
same key on every run and machine, and the cache knows what it already has.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from factory import formats
from factory.archive import CellArchive
from factory.distros import debian
from factory.spec import Cell, Matrix

Kind = Literal["rootfs", "finalise", "assemble", "convert", "pack", "publish", "boot"]
KINDS: tuple[Kind, ...] = ("rootfs", "finalise", "assemble", "convert", "pack", "publish", "boot")

# Bump a kind's recipe when its stage changes what it produces: old cache entries stop matching.
RECIPES: dict[str, int] = {**{kind: 1 for kind in KINDS}, "finalise": 2}

# Parameters that say where an input lives, not what it is: left out of keys. A tree's
# sources name mirrors; the archive state's digests say what they held.
LOCATION_FIELDS = frozenset({"path", "sources", "uri"})

_UUID_NAMESPACE = uuid.UUID("6f1d3c1e-9a56-4d3e-9c1a-7f6b0e2d5a10")


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    kind: Kind
    cell: str
    arch: str
    deps: tuple[str, ...]
    key: str
    params: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "cell": self.cell,
            "deps": list(self.deps),
            "key": self.key,
        }


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    matrix: str
    jobs: tuple[Job, ...]

    def by_id(self) -> dict[str, Job]:
        return {job.id: job for job in self.jobs}

    def cells(self) -> list[str]:
        return list(dict.fromkeys(job.cell for job in self.jobs))

    def select(self, ids: Iterable[str]) -> Plan:
        """The sub-plan of `ids` and everything they depend on, in plan order."""
        jobs = self.by_id()
        keep: set[str] = set()
        stack = list(ids)
        while stack:
            jid = stack.pop()
            if jid not in keep:
                keep.add(jid)
                stack.extend(jobs[jid].deps)
        return Plan(matrix=self.matrix, jobs=tuple(j for j in self.jobs if j.id in keep))

    def to_json(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "jobs": [job.summary() for job in self.jobs]}


def _strip_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_locations(v) for k, v in value.items() if k not in LOCATION_FIELDS}
    if isinstance(value, list | tuple):
        return [_strip_locations(v) for v in value]
    return value


def job_key(kind: str, params: dict[str, Any], dep_keys: Iterable[str]) -> str:
    blob = json.dumps(
        {
            "kind": kind,
            "recipe": RECIPES[kind],
            "params": _strip_locations(params),
            "deps": sorted(dep_keys),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def hook_digest(folder: Path) -> str:
    """Content hash of a hook folder: relative names, modes and bytes of its files."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} {path.readlink()}\n".encode())
        elif path.is_file():
            h.update(f"F {rel} {path.stat().st_mode & 0o777:o}\n".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def artifact_name(cell: Cell, fmt: str, layout: str = "") -> str:
    """`CELL.SUFFIX`; `CELL-LAYOUT.SUFFIX` for the disks of a cell with several layouts."""
    return f"{cell.id}{f'-{layout}' if layout else ''}.{formats.get(fmt).suffix}"


class _Builder:
    def __init__(self, matrix: Matrix) -> None:
        self.matrix = matrix
        self.jobs: list[Job] = []
        self.keys: dict[str, str] = {}

    def add(
        self, kind: Kind, cell: Cell, deps: Iterable[str], params: dict[str, Any], suffix: str = ""
    ) -> str:
        jid = f"{kind}:{cell.id}" + (f":{suffix}" if suffix else "")
        dep_ids = tuple(deps)
        key = job_key(kind, params, (self.keys[d] for d in dep_ids))
        self.jobs.append(
            Job(
                id=jid,
                kind=kind,
                cell=cell.id,
                arch=cell.arch,
                deps=dep_ids,
                key=key,
                params=params,
            )
        )
        self.keys[jid] = key
        return jid


# The clock of a cell planned without its archive state and without [image] epoch.
DEFAULT_EPOCH = 1_700_000_000


def cell_epoch(matrix: Matrix, state: CellArchive | None) -> int:
    """SOURCE_DATE_EPOCH of a cell: [image] epoch, else the newest Date: of its suites."""
    if matrix.image.epoch is not None:
        return matrix.image.epoch
    return state.epoch if state is not None else DEFAULT_EPOCH


def _cell_jobs(
    b: _Builder, cell: Cell, hooks: list[dict[str, str]], state: CellArchive | None
) -> None:
    m = b.matrix
    epoch = cell_epoch(m, state)
    layouts = m.layouts_for(cell.arch)
    wanted = [formats.get(f) for f in m.formats]
    disk_formats = [f for f in wanted if f.source == "disk"]
    tree_formats = [f for f in wanted if f.source == "tree"]

    rootfs = b.add(
        "rootfs",
        cell,
        (),
        {
            "family": cell.distro.family,
            "release": cell.distro.release,
            "arch": cell.arch,
            "packages": debian.packages_for(
                cell.distro.release, cell.arch, [lay.name for lay in layouts], m.image.packages
            ),
            "mirror": m.mirrors.debian,
            "updates": m.mirrors.updates,
            "security": m.mirrors.security,
            "epoch": epoch,
            **(
                {"sources": state.sources, "archive": [s.to_json() for s in state.suites]}
                if state is not None
                else {}
            ),
        },
    )
    rootfs_key = b.keys[rootfs]
    root_uuid = str(uuid.uuid5(_UUID_NAMESPACE, f"root:{cell.id}:{rootfs_key}"))
    finalise = b.add(
        "finalise",
        cell,
        (rootfs,),
        {
            "family": cell.distro.family,
            "release": cell.distro.release,
            "arch": cell.arch,
            "layouts": [lay.name for lay in layouts],
            "root_uuid": root_uuid,
            "filesystem": m.image.filesystem,
            "image_name": cell.id,
            "hooks": hooks,
            "manifest": f"{cell.id}/{cell.id}.manifest.json",
            "epoch": epoch,
        },
    )

    def publish(source: str, fmt: formats.Format, layout: str = "") -> None:
        b.add(
            "publish",
            cell,
            (source,),
            {
                "format": fmt.name,
                "source": "disk" if fmt.source == "disk" else "tree",
                "name": f"{cell.id}/{artifact_name(cell, fmt.name, layout)}",
                "qemu": fmt.qemu,
                **({"layout": layout} if layout else {}),
            },
            f"{fmt.name}-{layout}" if layout else fmt.name,
        )

    for layout in layouts if disk_formats or m.image.boot_test else ():
        # With several layouts, each disk's jobs and files carry its layout's name.
        named = layout.name if len(layouts) > 1 else ""
        assemble = b.add(
            "assemble",
            cell,
            (finalise,),
            {
                "arch": cell.arch,
                "layout": layout.name,
                "size": m.image.size,
                "extra_size": m.image.extra_size,
                "filesystem": m.image.filesystem,
                "root_uuid": root_uuid,
                "epoch": epoch,
            },
            named,
        )
        for fmt in disk_formats:
            if fmt.name == "raw":
                publish(assemble, fmt, named)
                continue
            convert = b.add(
                "convert",
                cell,
                (assemble,),
                {
                    "format": fmt.name,
                    "qemu": fmt.qemu,
                    "compression": m.image.qcow2_compression if fmt.name == "qcow2" else None,
                    "vhd_subformat": m.image.vhd_subformat if fmt.name == "vhd" else None,
                    "epoch": epoch,
                    "artifact": artifact_name(cell, fmt.name, named),
                },
                f"{fmt.name}-{named}" if named else fmt.name,
            )
            publish(convert, fmt, named)
        if m.image.boot_test:
            b.add(
                "boot",
                cell,
                (assemble,),
                {
                    "arch": cell.arch,
                    "layout": layout.name,
                    "timeout": m.image.boot_timeout,
                },
                named,
            )
    for fmt in tree_formats:
        pack = b.add(
            "pack",
            cell,
            (finalise,),
            {
                "format": fmt.name,
                "arch": cell.arch,
                "image_name": cell.id,
                "docker_tag": m.image.docker_tag
                or f"{m.name}/{cell.distro.family}:{cell.distro.release}-{cell.arch}",
                "epoch": epoch,
            },
            fmt.name,
        )
        publish(pack, fmt)


def make_plan(matrix: Matrix, archive: Mapping[str, CellArchive] | None = None) -> Plan:
    """The whole DAG for a matrix: one rootfs per cell, shared by all of its outputs.
    `archive` is each cell's archive state (factory.archive), read before planning."""
    hooks = [{"name": p.name, "digest": hook_digest(p), "path": str(p)} for p in matrix.image.hooks]
    b = _Builder(matrix)
    for cell in matrix.cells():
        _cell_jobs(b, cell, hooks, (archive or {}).get(cell.id))
    return Plan(matrix=matrix.name, jobs=tuple(b.jobs))


def describe(plan: Plan) -> Iterator[str]:
    """The plan for people: jobs grouped by cell, each with what it waits for."""
    jobs = plan.jobs
    yield f"plan {plan.matrix}: {len(jobs)} jobs in {len(plan.cells())} cells"
    for cell in plan.cells():
        yield ""
        yield cell
        for job in (j for j in jobs if j.cell == cell):
            after = ", ".join(d.replace(f":{cell}", "") for d in job.deps)
            tail = f"  ← {after}" if after else ""
            yield f"  {job.id.split(':', 1)[0]:<9} {job.id:<48} {job.key[:12]}{tail}"
