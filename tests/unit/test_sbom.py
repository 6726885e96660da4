"""factory.sbom: a valid, deterministic SPDX 2.3 document from a dpkg manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from spdx_tools.spdx.model.actor import Actor, ActorType
from spdx_tools.spdx.model.spdx_no_assertion import SpdxNoAssertion

from factory import sbom
from factory.fsutil import write_if_changed

CELL = "debian-bookworm-amd64"
KW: dict[str, Any] = {"arch": "amd64", "distro_version": "12", "epoch": 1700000000, "key": "k1"}

ROWS = [
    {
        "package": "bash",
        "version": "5.2.15-2+b7",
        "arch": "amd64",
        "status": "installed",
        "source": "bash",
        "source_version": "5.2.15-2",
        "maintainer": "Matthias Klose <doko@debian.org>",
    },
    {
        "package": "libc6",
        "version": "2.36-9+deb12u4",
        "arch": "amd64",
        "status": "installed",
        "source": "glibc",
        "source_version": "2.36-9+deb12u4",
        "maintainer": "GNU Libc Maintainers <debian-glibc@lists.debian.org>",
    },
    {
        "package": "tzdata",
        "version": "2024a-0+deb12u1",
        "arch": "all",
        "status": "installed",
        "source": "tzdata",
        "source_version": "2024a-0+deb12u1",
        "maintainer": "GNU Libc Maintainers <debian-glibc@lists.debian.org>",
    },
    # An older manifest's row: no source, source_version nor maintainer.
    {"package": "libstdc++6", "version": "12.2.0-14", "arch": "amd64", "status": "installed"},
    # Removed, conffiles kept: not on the image.
    {"package": "gone", "version": "1.0", "arch": "amd64", "status": "config-files"},
]


def _json(rows: list[dict[str, str]] | None = None, **kw: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sbom.json_bytes(CELL, rows or ROWS, **{**KW, **kw}))
    return data


def _pkg(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [p for p in doc["packages"] if p["name"] == name]
    return found


def test_document_validates_with_the_library() -> None:
    doc = sbom.document(CELL, ROWS, **KW)
    assert sbom.problems(doc) == []


def test_written_file_validates_with_pyspdxtools(tmp_path: Path) -> None:
    path = tmp_path / CELL / f"{CELL}.spdx.json"
    write_if_changed(path, sbom.json_bytes(CELL, ROWS, **KW))  # as a run writes it
    tool = shutil.which("pyspdxtools") or str(Path(sys.executable).with_name("pyspdxtools"))
    done = subprocess.run([tool, "-i", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (done.stdout + done.stderr).strip()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_pyspdxtools_rejects_a_broken_file(tmp_path: Path) -> None:
    """The command above really validates: a file with a bad relationship fails."""
    data = _json()
    data["relationships"][1]["relatedSpdxElement"] = "SPDXRef-nowhere"
    path = tmp_path / "bad.spdx.json"
    path.write_text(json.dumps(data))
    tool = shutil.which("pyspdxtools") or str(Path(sys.executable).with_name("pyspdxtools"))
    done = subprocess.run([tool, "-i", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0


def test_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    a = sbom.json_bytes(CELL, ROWS, **KW)
    b = sbom.json_bytes(CELL, list(reversed(ROWS)), **KW)  # row order does not matter
    assert a == b
    write_if_changed(tmp_path / "x.json", sbom.json_bytes(CELL, ROWS, **KW))
    assert (tmp_path / "x.json").read_bytes() == a
    assert a != sbom.json_bytes(CELL, ROWS, **{**KW, "epoch": KW["epoch"] + 1})


def test_document_header() -> None:
    doc = _json()
    assert doc["spdxVersion"] == "SPDX-2.3"
    assert doc["dataLicense"] == "CC0-1.0"
    assert doc["name"] == CELL
    assert doc["documentNamespace"] == f"https://spdx.org/spdxdocs/factory-{CELL}-k1"
    assert doc["creationInfo"]["created"] == "2023-11-14T22:13:20Z"
    assert doc["creationInfo"]["creators"] == [f"Tool: factory-{sbom.__version__}"]


def test_namespace_quotes_odd_keys() -> None:
    assert sbom.namespace("c", "a b/c") == "https://spdx.org/spdxdocs/factory-c-a%20b%2Fc"


def test_image_is_described_and_contains_every_installed_deb() -> None:
    doc = _json()
    image = _pkg(doc, CELL)
    assert image["versionInfo"] == "k1"
    assert image["SPDXID"] == f"SPDXRef-image-{CELL}"
    rels = {
        (r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"])
        for r in doc["relationships"]
    }
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", image["SPDXID"]) in rels
    debs = [p for p in doc["packages"] if p is not image and p["name"] != CELL]
    assert sorted(p["name"] for p in debs) == ["bash", "libc6", "libstdc++6", "tzdata"]
    for p in debs:
        assert (image["SPDXID"], "CONTAINS", p["SPDXID"]) in rels
        assert p["downloadLocation"] == "NOASSERTION"
        assert p["filesAnalyzed"] is False
    assert len(rels) == 1 + len(debs)


def test_deb_package_fields() -> None:
    bash = _pkg(_json(), "bash")
    assert bash["SPDXID"] == "SPDXRef-deb-bash-amd64"
    assert bash["versionInfo"] == "5.2.15-2+b7"
    assert bash["supplier"] == "Person: Matthias Klose (doko@debian.org)"
    assert bash["sourceInfo"] == "built from source package bash version 5.2.15-2"
    assert bash["externalRefs"] == [
        {
            "referenceCategory": "PACKAGE_MANAGER",
            "referenceType": "purl",
            "referenceLocator": (
                "pkg:deb/debian/bash@5.2.15-2%2Bb7"
                "?arch=amd64&distro=debian-12&upstream=bash%405.2.15-2"
            ),
        }
    ]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        # Same source name and version: no upstream qualifier.
        (ROWS[2], "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all&distro=debian-12"),
        # Another source name, same version: upstream=SRC.
        (
            ROWS[1],
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12&upstream=glibc",
        ),
        # No source fields (older manifests): name, version, arch, distro only.
        (ROWS[3], "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14?arch=amd64&distro=debian-12"),
        # An epoch in the version and no arch in the row: the cell's arch.
        (
            {"package": "e2fsprogs", "version": "1:1.47.0-2"},
            "pkg:deb/debian/e2fsprogs@1:1.47.0-2?arch=amd64&distro=debian-12",
        ),
    ],
)
def test_purl_format(row: dict[str, str], expected: str) -> None:
    assert sbom.purl(row, arch="amd64", distro_version="12") == expected


def test_purl_distro_follows_the_version() -> None:
    got = sbom.purl(ROWS[2], arch="arm64", distro_version="13")
    assert got == "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all&distro=debian-13"


@pytest.mark.parametrize(
    ("maintainer", "expected"),
    [
        (
            "Matthias Klose <doko@debian.org>",
            Actor(ActorType.PERSON, "Matthias Klose", "doko@debian.org"),
        ),
        (
            "GNU Libc Maintainers <debian-glibc@lists.debian.org>",
            Actor(ActorType.ORGANIZATION, "GNU Libc Maintainers", "debian-glibc@lists.debian.org"),
        ),
        (
            "Debian Python Team <team+python@tracker.debian.org>",
            Actor(ActorType.ORGANIZATION, "Debian Python Team", "team+python@tracker.debian.org"),
        ),
        (
            "Someone <pkg-foo-devel@lists.alioth.debian.org>",
            Actor(ActorType.ORGANIZATION, "Someone", "pkg-foo-devel@lists.alioth.debian.org"),
        ),
        (
            "  Jane Doe   <jane@example.org> ",
            Actor(ActorType.PERSON, "Jane Doe", "jane@example.org"),
        ),
        ("Jane Doe", Actor(ActorType.PERSON, "Jane Doe", None)),
        ("<jane@example.org>", Actor(ActorType.PERSON, "jane@example.org", "jane@example.org")),
        (
            "Jane (JD) Doe <jane@example.org>",
            Actor(ActorType.PERSON, "Jane JD Doe", "jane@example.org"),
        ),
        ("", SpdxNoAssertion()),
        ("   ", SpdxNoAssertion()),
        (None, SpdxNoAssertion()),
    ],
)
def test_supplier_parsing(maintainer: str | None, expected: Actor | SpdxNoAssertion) -> None:
    assert sbom.supplier(maintainer) == expected


def test_rows_without_source_fields() -> None:
    old = [{"package": p["package"], "version": p["version"], "arch": p["arch"]} for p in ROWS[:4]]
    doc = _json(old)
    for name in ("bash", "libc6", "tzdata", "libstdc++6"):
        p = _pkg(doc, name)
        assert p["supplier"] == "NOASSERTION"
        assert "sourceInfo" not in p
        assert "upstream=" not in p["externalRefs"][0]["referenceLocator"]
    assert sbom.problems(sbom.document(CELL, old, **KW)) == []


def test_ids_are_sanitised_and_unique() -> None:
    rows = [
        {"package": "a+b", "version": "1", "arch": "amd64"},
        {"package": "a-b", "version": "1", "arch": "amd64"},
        {"package": "libc6", "version": "2.36-9", "arch": "amd64"},
        {"package": "libc6", "version": "2.36-9", "arch": "i386"},  # multiarch
    ]
    doc = _json(rows)
    ids = [p["SPDXID"] for p in doc["packages"][1:]]
    assert ids == [
        "SPDXRef-deb-a-b-amd64",
        "SPDXRef-deb-a-b-amd64-2",
        "SPDXRef-deb-libc6-amd64",
        "SPDXRef-deb-libc6-i386",
    ]
    assert sbom.problems(sbom.document(CELL, rows, **KW)) == []


def test_empty_manifest_is_still_a_valid_document() -> None:
    doc = sbom.document(CELL, [], **KW)
    assert sbom.problems(doc) == []
    assert [p.name for p in doc.packages] == [CELL]


def test_invalid_document_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sbom, "problems", lambda doc: ["a", "b", "c", "d"])
    with pytest.raises(
        ValueError, match=r"^debian-bookworm-amd64: invalid SBOM: a; b; c \(and 1 more\)$"
    ):
        write_if_changed(tmp_path / "x.json", sbom.json_bytes(CELL, ROWS, **KW))
    assert not (tmp_path / "x.json").exists()
