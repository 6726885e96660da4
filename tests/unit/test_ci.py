"""`factory ci gitlab|github`: the pipelines' structure, their published schemas (the real
check-jsonschema on the real output), and `factory run --pipeline` refusing a stale one."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from factory import __version__, ci, cli

MATRIX = """\
name = "three"
arches = ["amd64", "arm64", "ppc64el"]
distros = ["debian/bookworm"]
formats = ["tar"]
"""
CELLS = ["debian-bookworm-amd64", "debian-bookworm-arm64", "debian-bookworm-ppc64el"]
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


@pytest.fixture
def matrix(tmp_path: Path) -> Path:
    path = tmp_path / "three.toml"
    path.write_text(MATRIX)
    return path


def factory(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (a busy machine takes seconds to start each `factory`)."""
    argv = [str(a) for a in args]
    result = CliRunner().invoke(cli.app, argv)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def emit(flavour: str, matrix: Path, *args: str) -> tuple[str, dict[str, Any]]:
    result = factory("ci", flavour, matrix, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout, yaml.safe_load(result.stdout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gitlab_pipeline_has_a_tagged_job_per_cell_and_a_merge(matrix: Path) -> None:
    text, doc = emit("gitlab", matrix, "--tag", "ppc64el=power9,big-endian-not")
    assert doc["stages"] == ["build", "merge"]
    assert doc["variables"] == {
        "FACTORY_VERSION": __version__,
        "FACTORY_MATRIX": str(matrix),
        "FACTORY_MATRIX_SHA256": digest(matrix),
    }
    header = text.split("\n\n", 1)[0]
    assert f"factory {__version__}" in header and digest(matrix) in header
    assert doc["default"]["before_script"] == [ci.DEFAULT_SETUP["gitlab"]]
    assert [k for k in doc if k.startswith("debian-")] == CELLS
    tags = {cell: doc[cell]["tags"] for cell in CELLS}
    assert tags == {
        CELLS[0]: ["amd64"],
        CELLS[1]: ["arm64"],
        CELLS[2]: ["power9", "big-endian-not"],
    }
    for cell in CELLS:
        job = doc[cell]
        assert job["stage"] == "build" and job["needs"] == []
        (script,) = job["script"]
        assert script.startswith(f"factory run {matrix} --only {cell} --out shards/{cell} ")
        assert script.endswith("--pipeline $FACTORY_VERSION/$FACTORY_MATRIX_SHA256")
        assert job["artifacts"] == {"name": cell, "paths": [f"shards/{cell}/"], "when": "always"}
    merge = doc["merge"]
    assert merge["stage"] == "merge" and merge["when"] == "always"
    assert merge["needs"] == [{"job": c, "artifacts": True} for c in CELLS]
    assert merge["script"] == [f"factory merge shards/* --matrix {matrix} --out merged"]
    assert merge["artifacts"] == {"name": "merged", "paths": ["merged/"], "when": "always"}
    assert merge["tags"] == ["amd64"]


def test_github_workflow_has_a_matrix_uploads_and_a_merge(matrix: Path) -> None:
    text, doc = emit(
        "github", matrix, "--tag", "arm64=self-hosted,arm64", "--merge-tag", "ubuntu-latest"
    )
    assert digest(matrix) in text.split("\n\n", 1)[0]
    assert doc["env"]["FACTORY_MATRIX_SHA256"] == digest(matrix)
    assert doc["env"]["FACTORY_VERSION"] == __version__
    cell = doc["jobs"]["cell"]
    assert cell["strategy"]["fail-fast"] is False
    assert cell["strategy"]["matrix"]["include"] == [
        {"cell": CELLS[0], "runs-on": ["amd64"]},
        {"cell": CELLS[1], "runs-on": ["self-hosted", "arm64"]},
        {"cell": CELLS[2], "runs-on": ["ppc64el"]},
    ]
    assert cell["runs-on"] == "${{ matrix.runs-on }}"
    steps = cell["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@")
    assert "--only '${{ matrix.cell }}'" in steps[2]["run"]
    upload = steps[3]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    assert upload["with"]["name"] == "shard-${{ matrix.cell }}"
    merge = doc["jobs"]["merge"]
    assert merge["needs"] == "cell" and merge["if"] == "always()"
    assert merge["runs-on"] == ["ubuntu-latest"]
    uses = [s.get("uses", "").split("@")[0] for s in merge["steps"]]
    assert "actions/download-artifact" in uses and uses[-1] == "actions/upload-artifact"
    download = merge["steps"][uses.index("actions/download-artifact")]
    assert download["with"] == {"pattern": "shard-*", "path": "shards"}
    command = f"factory merge shards/shard-* --matrix {matrix} --out merged"
    assert command in [s.get("run") for s in merge["steps"]]


def validate(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", schema, path],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("flavour", "schema"),
    [("gitlab", "vendor.gitlab-ci"), ("github", "vendor.github-workflows")],
)
def test_pipelines_pass_their_published_schemas(
    matrix: Path, tmp_path: Path, flavour: str, schema: str
) -> None:
    out = tmp_path / f"{flavour}.yml"
    result = factory("ci", flavour, matrix, "--output", out, "--run-arg=--cache=/tmp/c")
    assert result.returncode == 0 and result.stdout == "", result.stderr
    checked = validate(schema, out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The validator can say no: the same file with a job's tags made a number fails.
    doc = yaml.safe_load(out.read_text())
    if flavour == "gitlab":
        doc[CELLS[0]]["tags"] = 7
    else:
        doc["jobs"]["cell"]["strategy"] = "all"
    bad = tmp_path / f"bad-{flavour}.yml"
    bad.write_text(yaml.safe_dump(doc))
    assert validate(schema, bad).returncode != 0


def test_output_is_written_whole_and_unknown_arch_tag_refused(matrix: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.yml"
    assert factory("ci", "gitlab", matrix, "--output", out).returncode == 0
    assert out.read_text() == factory("ci", "gitlab", matrix).stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    for bad, why in (("s390x=z", "the matrix has no arch s390x"), ("ppc64el", "ARCH=TAG")):
        result = factory("ci", "gitlab", matrix, "--tag", bad)
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1 and why in result.stderr, result.stderr


def test_run_refuses_a_stale_pipeline_before_any_work(matrix: Path, tmp_path: Path) -> None:
    _, doc = emit("gitlab", matrix)
    pinned = f"{__version__}/{doc['variables']['FACTORY_MATRIX_SHA256']}"
    ci.check_pipeline(matrix, pinned)  # the matrix as it was: accepted
    matrix.write_text(MATRIX.replace('"tar"', '"tgz"'))
    out = tmp_path / "out"
    result = factory("run", matrix, "--out", out, "--pipeline", pinned)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{matrix}: the matrix changed since the pipeline was made")
    assert f"factory ci gitlab|github {matrix}` again" in line
    assert not out.exists()
    # Another factory version: refused the same way, naming both versions.
    result = factory("run", matrix, "--out", out, "--pipeline", f"9.9.9/{digest(matrix)}")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert (
        f"{matrix}: the pipeline was made by factory 9.9.9, this is factory {__version__}" in line
    )
    assert "again" in line and not out.exists()
    result = factory("run", matrix, "--out", out, "--pipeline", "nonsense")
    assert result.returncode == 2 and "VERSION/SHA256" in result.stderr
    assert not out.exists()


def test_check_pipeline_compares_the_file_bytes(matrix: Path) -> None:
    pinned = f"{__version__}/{digest(matrix)}"
    ci.check_pipeline(matrix, pinned)
    matrix.write_text(MATRIX + "# a comment is a change\n")
    with pytest.raises(ci.CiError, match="the matrix changed"):
        ci.check_pipeline(matrix, pinned)
