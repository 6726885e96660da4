"""Matrix → Plan: the DAG of jobs, each with a content key.

Pure: no I/O but hashing the hook folders and the boot test's user-data (and, once, the
stages' code). Each job's params are its stage's typed `Params`; its key is the sha256 of
its kind, its stage's recipe and code fingerprint, its params and its dependencies' keys,
so the same inputs and code give the same key on every run and machine, and the cache
knows what it has.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from factory import distros, formats, layouts
from factory.archive import CellArchive
from factory.publish import stage as upload
from factory.spec import Cell, Distro, Matrix, Publish
from factory.stages import (
    StageParams,
    assemble,
    boot,
    convert,
    finalise,
    pack,
    publish,
    registry,
    rootfs,
)

Kind = Literal["rootfs", "finalise", "assemble", "convert", "pack", "publish", "boot", "upload"]
KINDS: tuple[Kind, ...] = (
    "rootfs", "finalise", "assemble", "convert", "pack", "publish", "boot", "upload"
)  # fmt: skip

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
        """The cells; an OCI upload job, one per distro, is none of them."""
        return list(dict.fromkeys(job.cell for job in self.jobs if job.kind != "upload"))

    def select(self, ids: Iterable[str], given: Iterable[str] = ()) -> Plan:
        """The sub-plan of `ids` and everything they depend on, in plan order; without
        the `given` jobs (done already: OUT holds their artifacts) and what only they need.
        The scheduler takes a dependency outside its plan as done."""
        jobs = self.by_id()
        done = set(given)
        keep: set[str] = set()
        stack = list(ids)
        while stack:
            jid = stack.pop()
            if jid not in keep and jid not in done:
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


def job_key(kind: str, params: Mapping[str, Any], dep_keys: Iterable[str]) -> str:
    stage = registry.get(kind)
    blob = json.dumps(
        {
            "kind": kind,
            "recipe": stage.recipe,
            "code": registry.fingerprint(kind),
            "params": _strip_locations(dict(params)),
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
        self,
        kind: Kind,
        cell: Cell | tuple[str, str],
        deps: Iterable[str],
        typed: StageParams,
        suffix: str = "",
    ) -> str:
        """A job of `cell` (or of a (name, arch) that is no one cell: an OCI upload)."""
        cell_id, arch = (cell.id, cell.arch) if isinstance(cell, Cell) else cell
        jid = f"{kind}:{cell_id}" + (f":{suffix}" if suffix else "")
        dep_ids = tuple(deps)
        params = typed.model_dump(mode="json")
        key = job_key(kind, params, (self.keys[d] for d in dep_ids))
        self.jobs.append(
            Job(
                id=jid,
                kind=kind,
                cell=cell_id,
                arch=arch,
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


def fs_uuid(filesystem: str, drawn: uuid.UUID) -> str:
    """A filesystem's UUID as blkid and fstab name it: a FAT has only a 32-bit serial,
    written XXXX-XXXX."""
    if filesystem == "vfat":
        return f"{drawn.hex[:4]}-{drawn.hex[4:8]}".upper()
    return str(drawn)


def user_volumes(
    m: Matrix, cell: Cell, rootfs_key: str, root_uuid: str
) -> tuple[layouts.Volume, ...]:
    """The user's partitions with their filesystems' UUIDs, drawn like the root's: from the
    cell and its tree's key, so fstab (finalise) and mkfs (assemble) agree."""
    return tuple(
        layouts.Volume(
            mountpoint=p.mountpoint,
            filesystem=p.filesystem,
            size=p.size,
            empty=p.empty,
            uuid=root_uuid
            if p.mountpoint == "/"
            else fs_uuid(
                p.filesystem,
                uuid.uuid5(_UUID_NAMESPACE, f"part:{p.mountpoint or i}:{cell.id}:{rootfs_key}"),
            ),
        )
        for i, p in enumerate(m.image.partitions)
    )


def _cell_jobs(
    b: _Builder, cell: Cell, hooks: list[finalise.Hook], state: CellArchive | None
) -> None:
    m = b.matrix
    epoch = cell_epoch(m, state)
    family = distros.get(cell.distro.family)
    layouts = m.layouts_for(cell.arch)
    # What boots each disk; the tree carries the boot loaders of them all.
    methods = {lay.name: lay.boot_methods(cell.arch) for lay in layouts}
    every_method = tuple(dict.fromkeys(x for ms in methods.values() for x in ms))
    wanted = [formats.get(f) for f in m.formats]
    disk_formats = [f for f in wanted if f.source == "disk"]
    tree_formats = [f for f in wanted if f.source == "tree"]

    extra = (*m.image.packages, *(family.cloud_init_packages if m.image.cloud_init else ()))
    rootfs_job = b.add(
        "rootfs",
        cell,
        (),
        rootfs.Params(
            family=cell.distro.family,
            release=cell.distro.release,
            arch=cell.arch,
            packages=tuple(
                family.packages(cell.distro.release, cell.arch, every_method, extra)
            ),
            mirror=m.mirrors.debian,
            updates=m.mirrors.updates,
            security=m.mirrors.security,
            epoch=epoch,
            **(
                {
                    "sources": state.sources,
                    "archive": tuple(
                        rootfs.SuiteState.model_validate(s.to_json()) for s in state.suites
                    ),
                }
                if state is not None
                else {}
            ),
        ),
    )
    rootfs_key = b.keys[rootfs_job]
    root_uuid = str(uuid.uuid5(_UUID_NAMESPACE, f"root:{cell.id}:{rootfs_key}"))
    volumes = user_volumes(m, cell, rootfs_key, root_uuid)
    finalise_job = b.add(
        "finalise",
        cell,
        (rootfs_job,),
        finalise.Params(
            family=cell.distro.family,
            release=cell.distro.release,
            arch=cell.arch,
            boot=every_method,
            root_uuid=root_uuid,
            filesystem=m.image.root_filesystem(),
            volumes=volumes,
            image_name=cell.id,
            hooks=tuple(hooks),
            manifest=f"{cell.id}/{cell.id}.manifest.json",
            epoch=epoch,
            datasources=m.image.datasource_list(),
        ),
    )

    def publish_job(source: str, fmt: formats.Format, layout: str = "") -> None:
        b.add(
            "publish",
            cell,
            (source,),
            publish.Params(
                format=fmt.name,
                source="disk" if fmt.source == "disk" else "tree",
                name=f"{cell.id}/{artifact_name(cell, fmt.name, layout)}",
                qemu=fmt.qemu,
                layout=layout,
            ),
            f"{fmt.name}-{layout}" if layout else fmt.name,
        )

    user_data = (
        boot.UserData(
            path=str(m.image.boot_test_user_data),
            digest=hashlib.sha256(m.image.boot_test_user_data.read_bytes()).hexdigest(),
        )
        if m.image.boot_test_user_data is not None
        else None
    )
    for layout in layouts if disk_formats or m.image.boot_test else ():
        # With several layouts, each disk's jobs and files carry its layout's name.
        named = layout.name if len(layouts) > 1 else ""
        assemble_job = b.add(
            "assemble",
            cell,
            (finalise_job,),
            assemble.Params(
                family=cell.distro.family,
                arch=cell.arch,
                layout=layout,
                boot=methods[layout.name],
                size=m.image.size,
                extra_size=m.image.extra_size,
                filesystem=m.image.root_filesystem(),
                root_uuid=root_uuid,
                volumes=volumes,
                epoch=epoch,
            ),
            named,
        )
        for fmt in disk_formats:
            if fmt.name == "raw":
                publish_job(assemble_job, fmt, named)
                continue
            convert_job = b.add(
                "convert",
                cell,
                (assemble_job,),
                convert.Params(
                    format=fmt.name,
                    qemu=fmt.qemu,
                    compression=m.image.qcow2_compression if fmt.name == "qcow2" else None,
                    vhd_subformat=m.image.vhd_subformat if fmt.name == "vhd" else None,
                    options=m.image.qemu_img_options.get(fmt.name, {}),
                    epoch=epoch,
                    artifact=artifact_name(cell, fmt.name, named),
                ),
                f"{fmt.name}-{named}" if named else fmt.name,
            )
            publish_job(convert_job, fmt, named)
        if m.image.boot_test:
            # UEFI where the disk has it (the arch's preferred method comes first).
            b.add(
                "boot",
                cell,
                (assemble_job,),
                boot.Params(
                    arch=cell.arch,
                    boot=methods[layout.name][0],
                    layout=layout.name,
                    timeout=m.image.boot_timeout,
                    user_data=user_data,
                ),
                named,
            )
    for fmt in tree_formats:
        pack_job = b.add(
            "pack",
            cell,
            (finalise_job,),
            pack.Params(
                format=fmt.name,
                arch=cell.arch,
                image_name=cell.id,
                docker_tag=m.image.docker_tag
                or f"{m.name}/{cell.distro.family}:{cell.distro.release}-{cell.arch}",
                epoch=epoch,
            ),
            fmt.name,
        )
        publish_job(pack_job, fmt)


def make_plan(matrix: Matrix, archive: Mapping[str, CellArchive] | None = None) -> Plan:
    """The whole DAG for a matrix: one rootfs per cell, shared by all of its outputs.
    `archive` is each cell's archive state (factory.archive), read before planning."""
    hooks = [
        finalise.Hook(name=p.name, digest=hook_digest(p), path=str(p)) for p in matrix.image.hooks
    ]
    b = _Builder(matrix)
    for cell in matrix.cells():
        _cell_jobs(b, cell, hooks, (archive or {}).get(cell.id))
    for target in matrix.publish:
        _upload_jobs(b, target, archive or {})
    return Plan(matrix=matrix.name, jobs=tuple(b.jobs))


def _upload_jobs(b: _Builder, target: Publish, archive: Mapping[str, CellArchive]) -> None:
    """A target's jobs, after the publish jobs of the formats it takes: one per cell for
    SFTP (the cell's files, its own sums), one per distro for OCI (one manifest list of
    every arch; see factory/publish/stage.py for when an arch failed)."""
    m = b.matrix
    wanted = target.wanted(m.formats)
    published = [j for j in b.jobs if j.kind == "publish" and j.params["format"] in wanted]
    common = {"target": target.name, "kind": target.kind, "retries": target.retries}
    if target.kind == "sftp":
        assert target.address is not None and target.path is not None
        where = upload.Sftp(
            address=target.address,
            port=target.port,
            user=target.user,
            folder=target.path.rstrip("/") or "/",
            key=str(target.key) if target.key else None,
            known_hosts=str(target.known_hosts),
            trust_unknown_hosts=target.trust_unknown_hosts,
            password_env=target.password_env,
        )
        for cell in m.cells():
            mine = [j for j in published if j.cell == cell.id]
            files = tuple(
                upload.File(name=j.params["name"], format=j.params["format"], arch=cell.arch)
                for j in mine
            )
            epoch = cell_epoch(m, archive.get(cell.id))
            params = upload.Params(**common, epoch=epoch, sftp=where, files=files)
            b.add("upload", cell, (j.id for j in mine), params, target.name)
        return
    assert target.registry is not None and target.repository is not None
    for distro in m.distros:
        cells = [c for c in m.cells() if c.distro == distro]
        if not cells:
            continue
        epoch = max(cell_epoch(m, archive.get(c.id)) for c in cells)
        pushes, deps = [], []
        for fmt in wanted:
            layouts = dict.fromkeys(
                j.params["layout"] for j in published if j.params["format"] == fmt
            )
            for layout in layouts:
                mine = [
                    j for j in published
                    if j.params["format"] == fmt and j.params["layout"] == layout
                    and j.cell in {c.id for c in cells}
                ]  # fmt: skip
                refs = oci_refs(target, distro, fmt, layout, epoch)
                files = tuple(
                    upload.File(name=j.params["name"], format=fmt, arch=j.arch) for j in mine
                )
                pushes.append(upload.Push(format=fmt, refs=refs, files=files))
                deps += [j.id for j in mine]
        oci = upload.Oci(
            registry=target.registry,
            tls_verify=target.tls_verify,
            username_env=target.username_env,
            password_env=target.password_env,
            authfile=str(target.authfile) if target.authfile else None,
            pushes=tuple(pushes),
        )
        params = upload.Params(**common, epoch=epoch, oci=oci)
        b.add("upload", (distro.id, ""), deps, params, target.name)


def oci_refs(
    target: Publish, distro: Distro, fmt: str, layout: str, epoch: int
) -> tuple[str, ...]:
    """REGISTRY/REPOSITORY/FAMILY-RELEASE[-disk[-LAYOUT]]:TAG for the date tag and latest:
    the image (docker) under the distro's name, its KubeVirt containerDisk (qcow2) beside
    it with -disk (and the layout's name when a cell has several disks)."""
    name = f"{target.registry}/{target.repository}/{distro.id}"
    if fmt != "docker":
        name += "-disk" + (f"-{layout}" if layout else "")
    return tuple(f"{name}:{tag}" for tag in (upload.date_tag(epoch), "latest"))


def describe(plan: Plan) -> Iterator[str]:
    """The plan for people: jobs grouped by cell, each with what it waits for."""
    jobs = plan.jobs
    cells = plan.cells()
    yield f"plan {plan.matrix}: {len(jobs)} jobs in {len(cells)} cells"
    groups = [*cells, *dict.fromkeys(j.cell for j in jobs if j.cell not in cells)]
    for cell in groups:
        yield ""
        yield cell if cell in cells else f"{cell} (every arch)"
        for job in (j for j in jobs if j.cell == cell):
            after = ", ".join(d.replace(f":{cell}", "") if cell in cells else d for d in job.deps)
            tail = f"  ← {after}" if after else ""
            yield f"  {job.id.split(':', 1)[0]:<9} {job.id:<48} {job.key[:12]}{tail}"
