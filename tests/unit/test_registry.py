"""The stage registry: typed params for every job a plan makes, one-line errors for
params that do not fit, and qemu-img options that reach the real qemu-img."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from factory import proc
from factory.cache import Cache
from factory.plan import Job, make_plan
from factory.results import Output, StageError
from factory.spec import load_matrix
from factory.stages import Context, Workspace, convert, registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("matrix", ["default.toml", "nightly.toml", "layouts.toml"])
def test_every_planned_job_has_params_its_stage_accepts(matrix: str) -> None:
    plan = make_plan(load_matrix(ROOT / "matrix" / matrix))
    for job in plan.jobs:
        typed = registry.get(job.kind).params.model_validate(job.params)
        assert typed.model_dump(mode="json") == job.params  # the wire form round-trips


@pytest.mark.parametrize(
    ("kind", "params", "says"),
    [
        ("convert", {"format": "qcow2"}, "convert:x: malformed params: qemu: Field required"),
        ("boot", {"arch": "amd64", "boot": "floppy", "layout": "mbr", "timeout": 1},
         "boot:x: malformed params: boot: Input should be 'bios-mbr', 'bios-gpt', 'uefi' or"),
        ("pack", {"format": "tar", "arch": "amd64", "image_name": "i", "docker_tag": "t",
                  "epoch": 1, "rm": "-rf /"}, "pack:x: malformed params: rm: Extra inputs"),
        ("sing", {}, "no stage for job kind 'sing'"),
    ],
)  # fmt: skip
def test_params_that_do_not_fit_are_one_line(
    kind: str, params: dict[str, object], says: str
) -> None:
    with pytest.raises(registry.ParamsError) as err:
        registry.validate(kind, params, f"{kind}:x")
    assert str(err.value).startswith(says)
    assert "\n" not in str(err.value)


def test_a_stage_given_malformed_params_fails_its_job_in_one_line(tmp_path: Path) -> None:
    params = {"format": "qcow2", "qemu": "qcow2", "epoch": "soon", "artifact": "a"}
    job = Job(id="convert:c:qcow2", kind="convert", cell="c", arch="amd64", deps=(), key="k",
              params=params)  # fmt: skip
    ctx = Context(job, {}, Workspace(tmp_path, Cache(tmp_path / "cache")), lambda _: None)
    with pytest.raises(StageError, match=r"^convert:c:qcow2: malformed params: epoch: Input "):
        anyio.run(convert.run, ctx)


def test_qemu_img_options_reach_the_plan_and_the_key(tmp_path: Path) -> None:
    text = (ROOT / "matrix/default.toml").read_text()
    plain = make_plan(load_matrix(ROOT / "matrix/default.toml"))
    table = '[image.qemu_img_options]\nqcow2 = { compat = "0.10" }\n\n[mirrors]'
    (tmp_path / "m.toml").write_text(text.replace("[mirrors]", table))
    opts = make_plan(load_matrix(tmp_path / "m.toml"))
    key = {j.id: j.key for j in plain.jobs}
    qcow2 = [j for j in opts.jobs if j.kind == "convert" and j.params["format"] == "qcow2"]
    assert len(qcow2) == 1 and qcow2[0].params["options"] == {"compat": "0.10"}
    assert qcow2[0].key != key[qcow2[0].id]
    others = [j for j in opts.jobs if j.kind in ("rootfs", "finalise", "assemble", "convert")]
    assert [j.id for j in others if j.key != key[j.id]] == [qcow2[0].id]


@pytest.mark.parametrize(
    ("fmt", "options", "field", "want"),
    [
        ("qcow2", {"compat": "0.10"}, "compat", "0.10"),
        ("qcow2", {"cluster_size": "131072"}, "cluster-size", 131072),
        ("vmdk", {"adapter_type": "lsilogic"}, None, "lsilogic"),
    ],
)
def test_qemu_img_options_reach_the_file(
    tmp_path: Path, fmt: str, options: dict[str, str], field: str | None, want: object
) -> None:
    """The convert stage with the real qemu-img on a small raw disk: the file carries
    what the options asked for (qemu-img info reads it back)."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
        fh.seek(1024 * 1024)
        fh.write(b"factory" * 1000)
    params = convert.Params(format=fmt, qemu=fmt, compression="zlib" if fmt == "qcow2" else None,
                            options=options, epoch=1_700_000_000, artifact=f"d.{fmt}")  # fmt: skip
    job = Job(id=f"convert:c:{fmt}", kind="convert", cell="c", arch="amd64", deps=("assemble:c",),
              key="1" * 64, params=params.model_dump(mode="json"))  # fmt: skip
    inputs = {"assemble:c": Output(raw, {"virtual_size": 64 * 1024 * 1024})}
    ctx = Context(job, inputs, Workspace(tmp_path, Cache(tmp_path / "cache")), lambda _: None)
    out = anyio.run(convert.run, ctx)
    path = out.path
    assert path is not None

    async def info() -> dict[str, object]:
        text = (await proc.run(["qemu-img", "info", "--output=json", path], capture=True)).text
        return dict(json.loads(text))

    data = anyio.run(info)
    specific = dict(data["format-specific"]["data"])  # type: ignore[index]
    if field is not None:
        got = specific.get(field, data.get(field))
        assert got == want, data
    else:
        descriptor = path.read_bytes()[:65536]
        assert f'ddb.adapterType = "{want}"'.encode() in descriptor
