"""`factory ci gitlab|github MATRIX`: the matrix as a CI pipeline, one job per cell.

factory fits into the CI its users already run instead of becoming one: each cell is a
job `factory run MATRIX --only CELL --out shards/CELL` on a runner picked by the cell's
arch (GitLab `tags`, GitHub `runs-on` labels), its OUT is the job's artifact (uploaded
even when the cell failed), and a last `merge` job joins the shards with `factory merge`.

A pipeline is generated from one matrix file by one factory version, and it names both.
Its cell jobs pass them back to `factory run` (`--pipeline VERSION/SHA256`), which refuses
to start when the matrix file or factory changed since: a stale pipeline would otherwise
build another matrix's cells, or miss new ones, without a word.
The matrix's digest is the sha256 of the matrix file's bytes: the simplest honest choice
(a comment changed is a change; hook files it names are not covered).
"""

from __future__ import annotations

import hashlib
import shlex
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from factory import __version__
from factory.spec import Matrix

SHARDS = "shards"  # where each cell job writes its OUT: shards/CELL
MERGED = "merged"  # the merge job's OUT
# scripts/setup installs factory into .venv; the job's later commands find it on PATH
# (a GitLab before_script shares the script's shell; a GitHub step does not, so the
# folder goes into $GITHUB_PATH for the steps after it).
DEFAULT_SETUP = {
    "gitlab": 'scripts/setup && export PATH="$PWD/.venv/bin:$PATH"',
    "github": 'scripts/setup && echo "$PWD/.venv/bin" >> "$GITHUB_PATH"',
}


class CiError(ValueError):
    """A pipeline that cannot be made or run; the message is one line."""


def matrix_digest(path: Path) -> str:
    """The matrix's digest as pipelines and reports name it: sha256 of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def about(matrix: Matrix, digest: str = "") -> dict[str, Any]:
    """What a run's report.json says made it, for `factory merge` to check shards
    against each other: factory's version, the matrix digest, the host (which a merged
    report names for each job run there) and the [sign] key that signs the merge."""
    return {
        "factory_version": __version__,
        "matrix_sha256": digest or matrix_digest(matrix.path),
        "host": socket.gethostname(),
        "sign": matrix.sign.gpg_key if matrix.sign is not None else None,
    }


def check_pipeline(path: Path, pinned: str) -> None:
    """Raise CiError (one line) when a pipeline's `VERSION/SHA256` (factory's version,
    the matrix digest) is not this factory's and this matrix file's: it is stale."""
    again = f"run `factory ci gitlab|github {path}` again and commit the new pipeline"
    version, sep, digest = pinned.strip().partition("/")
    if not sep or not version or len(digest) != 64:
        raise CiError(f"--pipeline {pinned}: give VERSION/SHA256 (as factory ci writes it)")
    if version != __version__:
        raise CiError(
            f"{path}: the pipeline was made by factory {version}, this is factory "
            f"{__version__} ({again})"
        )
    actual = matrix_digest(path)
    if actual != digest.lower():
        raise CiError(
            f"{path}: the matrix changed since the pipeline was made (sha256 "
            f"{actual[:12]}…, the pipeline's {digest[:12]}…; {again})"
        )


def parse_tags(items: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """`ARCH=TAG[,TAG...]` options → arch → its runner tags; CiError if malformed."""
    tags: dict[str, tuple[str, ...]] = {}
    for item in items:
        arch, sep, text = item.partition("=")
        values = tuple(t.strip() for t in text.split(",") if t.strip())
        if not sep or not arch.strip() or not values:
            raise CiError(f"--tag {item}: give ARCH=TAG[,TAG...] (e.g. ppc64el=power9)")
        tags[arch.strip()] = values
    return tags


@dataclass(frozen=True)
class Pipeline:
    """What both CI flavours need: the matrix, its cells and how each job runs factory."""

    matrix: Path  # as the jobs name it: relative to the repository's root
    name: str
    digest: str
    cells: tuple[tuple[str, str], ...]  # (cell id, arch)
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    setup: str = DEFAULT_SETUP["gitlab"]
    run_args: tuple[str, ...] = ()
    merge_tags: tuple[str, ...] = ()
    version: str = __version__

    @classmethod
    def of(
        cls,
        matrix: Matrix,
        path: Path,
        *,
        tags: Mapping[str, tuple[str, ...]] | None = None,
        setup: str = DEFAULT_SETUP["gitlab"],
        run_args: Sequence[str] = (),
        merge_tags: Sequence[str] = (),
    ) -> Pipeline:
        unknown = sorted(set(tags or {}) - set(matrix.arches))
        if unknown:
            raise CiError(
                f"--tag {unknown[0]}=...: the matrix has no arch {unknown[0]} "
                f"(its arches: {', '.join(matrix.arches)})"
            )
        return cls(
            matrix=path,
            name=matrix.name,
            digest=matrix_digest(matrix.path),
            cells=tuple((c.id, c.arch) for c in matrix.cells()),
            tags=dict(tags or {}),
            setup=setup,
            run_args=tuple(run_args),
            merge_tags=tuple(merge_tags),
        )

    def labels(self, arch: str) -> list[str]:
        """The runner tags (GitLab) or labels (GitHub) of an arch's cells."""
        return list(self.tags.get(arch, (arch,)))

    def merge_labels(self) -> list[str]:
        """Where the merge runs: any runner can (it only copies and hashes); by default
        one of the first cell's, since those exist."""
        if self.merge_tags:
            return list(self.merge_tags)
        return self.labels(self.cells[0][1]) if self.cells else []

    def run_command(self, cell: str) -> str:
        argv = ["factory", "run", str(self.matrix), "--only", cell]
        argv += ["--out", f"{SHARDS}/{cell}", *self.run_args]
        return f"{shlex.join(argv)} --pipeline $FACTORY_VERSION/$FACTORY_MATRIX_SHA256"

    def merge_command(self, shards: str) -> str:
        return f"factory merge {shards} --matrix {shlex.quote(str(self.matrix))} --out {MERGED}"

    def header(self, flavour: str) -> str:
        return (
            f"# Made by factory {self.version} (`factory ci {flavour} {self.matrix}`) from\n"
            f"# {self.matrix}, sha256 {self.digest}.\n"
            f"# A cell job refuses to run when the matrix file or factory's version differs:\n"
            f"# after changing either, run `factory ci {flavour} {self.matrix}` again.\n"
        )

    def variables(self) -> dict[str, str]:
        return {
            "FACTORY_VERSION": self.version,
            "FACTORY_MATRIX": str(self.matrix),
            "FACTORY_MATRIX_SHA256": self.digest,
        }


class _Dumper(yaml.SafeDumper):
    """No anchors and aliases: a step used twice is written out twice, as people do."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(header: str, doc: Mapping[str, Any]) -> str:
    body = yaml.dump(
        dict(doc), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000
    )
    return header + "\n" + body


def gitlab(p: Pipeline) -> str:
    """A GitLab CI pipeline: a job per cell in stage `build`, then `merge`. Both upload
    their OUT `when: always`, and merge runs `when: always`: a failed cell's report and
    logs still reach the merged OUT, whose report says it failed."""
    doc: dict[str, Any] = {
        "stages": ["build", "merge"],
        "variables": p.variables(),
        "default": {"before_script": [p.setup]},
    }
    for cell, arch in p.cells:
        doc[cell] = {
            "stage": "build",
            "tags": p.labels(arch),
            "needs": [],
            "script": [p.run_command(cell)],
            "artifacts": {
                "name": cell,
                "paths": [f"{SHARDS}/{cell}/"],
                "when": "always",
            },
        }
    doc["merge"] = {
        "stage": "merge",
        "tags": p.merge_labels(),
        "when": "always",
        "needs": [{"job": cell, "artifacts": True} for cell, _ in p.cells],
        # A glob: a cell job that died before writing its OUT has no folder, and the
        # merge (given the matrix) reports that cell as missing.
        "script": [p.merge_command(f"{SHARDS}/*")],
        "artifacts": {"name": MERGED, "paths": [f"{MERGED}/"], "when": "always"},
    }
    return _dump(p.header("gitlab"), doc)


def github(p: Pipeline) -> str:
    """A GitHub Actions workflow: a matrix strategy over the cells (each with its
    `runs-on` labels), each shard uploaded as artifact `shard-CELL` even when it failed,
    and a merge job that downloads them all and uploads the merged OUT."""
    checkout = {"uses": "actions/checkout@v4"}
    setup = {"name": "Set up factory", "run": p.setup}
    include = [{"cell": cell, "runs-on": p.labels(arch)} for cell, arch in p.cells]
    doc: dict[str, Any] = {
        "name": f"factory {p.name}",
        "on": {"workflow_dispatch": {}},
        "env": p.variables(),
        "jobs": {
            "cell": {
                "name": "${{ matrix.cell }}",
                "runs-on": "${{ matrix.runs-on }}",
                "strategy": {"fail-fast": False, "matrix": {"include": include}},
                "steps": [
                    checkout,
                    setup,
                    {"name": "Build the cell", "run": p.run_command("${{ matrix.cell }}")},
                    {
                        "name": "Upload the shard",
                        "if": "always()",
                        "uses": "actions/upload-artifact@v4",
                        "with": {
                            "name": "shard-${{ matrix.cell }}",
                            "path": f"{SHARDS}/${{{{ matrix.cell }}}}/",
                            "if-no-files-found": "warn",
                        },
                    },
                ],
            },
            "merge": {
                "needs": "cell",
                "if": "always()",
                "runs-on": p.merge_labels(),
                "steps": [
                    checkout,
                    setup,
                    {
                        "name": "Download the shards",
                        "uses": "actions/download-artifact@v4",
                        "with": {"pattern": "shard-*", "path": SHARDS},
                    },
                    {"name": "Merge the shards", "run": p.merge_command(f"{SHARDS}/shard-*")},
                    {
                        "name": "Upload the merged output",
                        "if": "always()",
                        "uses": "actions/upload-artifact@v4",
                        "with": {"name": MERGED, "path": f"{MERGED}/"},
                    },
                ],
            },
        },
    }
    return _dump(p.header("github"), doc)
