"""An SPDX 2.3 JSON SBOM per cell, built from its dpkg manifest.

The image is the document's root package: the document DESCRIBES it and it CONTAINS one
package per installed deb, each with its supplier (the Maintainer), its source package and
a purl. The model, its validation and its JSON form come from spdx-tools, the purls from
packageurl-python, so the file is what `pyspdxtools -i` and other SPDX readers expect.

Everything is derived from the inputs (creation time = the cell's SOURCE_DATE_EPOCH, ids
from names, lists and keys sorted): the same manifest gives the same bytes, so an SBOM
does not spoil a reproducible build.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

from packageurl import PackageURL
from spdx_tools.spdx.jsonschema.document_converter import DocumentConverter
from spdx_tools.spdx.model.actor import Actor, ActorType  # submodules: mypy strict
from spdx_tools.spdx.model.document import CreationInfo, Document
from spdx_tools.spdx.model.package import (
    ExternalPackageRef,
    ExternalPackageRefCategory,
    Package,
    PackagePurpose,
)
from spdx_tools.spdx.model.relationship import Relationship, RelationshipType
from spdx_tools.spdx.model.spdx_no_assertion import SpdxNoAssertion
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from factory import __version__

SPDX_VERSION = "SPDX-2.3"
DOCUMENT_ID = "SPDXRef-DOCUMENT"
NAMESPACE_BASE = "https://spdx.org/spdxdocs/"  # the SPDX spec's form for tools without a site

# Maintainer names or addresses that stand for a team, not a person (Debian's own habits:
# "GNU Libc Maintainers <debian-glibc@lists.debian.org>", "<team+python@tracker...>").
_TEAM_NAME = re.compile(
    r"\b(team|group|maintainers|developers|project|packagers|committee)\b", re.IGNORECASE
)
_TEAM_EMAIL = re.compile(r"(^team\+)|(@lists\.)|(@.*\blists\b)", re.IGNORECASE)
_MAINTAINER = re.compile(r"^\s*(?P<name>[^<]*?)\s*<(?P<email>[^>]*)>\s*$")
_NOT_ID = re.compile(r"[^A-Za-z0-9.-]+")


def installed(rows: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """Rows of packages really on the image: dpkg also lists removed ones whose conffiles
    stay (status config-files); a row without a status (hand-written) counts as installed."""
    return [r for r in rows if r.get("status", "installed") == "installed"]


def supplier(maintainer: str | None) -> Actor | SpdxNoAssertion:
    """The Maintainer field as an SPDX actor: an Organization for a team, else a Person;
    NOASSERTION when the manifest has no maintainer (older manifests)."""
    text = (maintainer or "").strip()
    if not text:
        return SpdxNoAssertion()
    m = _MAINTAINER.match(text)
    name, email = (m["name"], m["email"].strip() or None) if m else (text, None)
    # The SPDX actor string is "Name (email)": parentheses in a name would be misread.
    name = " ".join(name.replace("(", " ").replace(")", " ").split()) or (email or "")
    if email is not None:
        email = email.replace("(", "").replace(")", "") or None
    if not name:
        return SpdxNoAssertion()
    team = bool(_TEAM_NAME.search(name) or (email and _TEAM_EMAIL.search(email)))
    return Actor(ActorType.ORGANIZATION if team else ActorType.PERSON, name, email)


def purl(
    row: Mapping[str, str], *, arch: str, distro_version: str, family: str = "debian",
    purl_type: str = "deb",
) -> str:
    """pkg:deb/debian/NAME@VERSION?arch=..&distro=debian-N (the family's purl type and
    name), with `upstream=SRC` (or SRC@VERSION when the source version differs) as the
    purl spec's deb type allows, so a vulnerability scanner can match source-package
    advisories."""
    qualifiers = {"arch": row.get("arch") or arch, "distro": f"{family}-{distro_version}"}
    source, source_version = _source(row)
    if source and (source != row["package"] or source_version != row["version"]):
        same_version = source_version in ("", row["version"])
        qualifiers["upstream"] = source if same_version else f"{source}@{source_version}"
    return PackageURL(
        type=purl_type,
        namespace=family,
        name=row["package"],
        version=row["version"],
        qualifiers=qualifiers,
    ).to_string()


def namespace(cell: str, key: str) -> str:
    """A unique URI per (cell, content key), on no mirror's or builder's host."""
    return f"{NAMESPACE_BASE}factory-{quote(cell, safe='')}-{quote(key, safe='')}"


def document(
    cell: str,
    packages: list[dict[str, str]],
    *,
    arch: str,
    distro_version: str,
    epoch: int,
    key: str,
    family: str = "debian",
    purl_type: str = "deb",
) -> Document:
    """The SPDX document of one cell; `packages` are its manifest rows, `key` names the
    build (the run's content key, or the epoch's date) and is the image's version."""
    image_id = "SPDXRef-image-" + _id_part(cell)
    image = Package(
        spdx_id=image_id,
        name=cell,
        download_location=SpdxNoAssertion(),
        version=key,
        files_analyzed=False,
        primary_package_purpose=PackagePurpose.OPERATING_SYSTEM,
        comment=f"Bootable {family.capitalize()} image {cell} built by factory",
    )
    debs: list[Package] = []
    used: set[str] = {image_id}
    rows = sorted(
        installed(packages), key=lambda r: (r["package"], r.get("arch", ""), r["version"])
    )
    for row in rows:
        row_arch = row.get("arch") or arch
        spdx_id = _unique(f"SPDXRef-deb-{_id_part(row['package'])}-{_id_part(row_arch)}", used)
        source, source_version = _source(row)
        debs.append(
            Package(
                spdx_id=spdx_id,
                name=row["package"],
                download_location=SpdxNoAssertion(),
                version=row["version"],
                supplier=supplier(row.get("maintainer")),
                files_analyzed=False,
                source_info=(
                    f"built from source package {source} version {source_version or row['version']}"
                    if source
                    else None
                ),
                external_references=[
                    ExternalPackageRef(
                        ExternalPackageRefCategory.PACKAGE_MANAGER,
                        "purl",
                        purl(
                            row,
                            arch=arch,
                            distro_version=distro_version,
                            family=family,
                            purl_type=purl_type,
                        ),
                    )
                ],
            )
        )
    relationships = [Relationship(DOCUMENT_ID, RelationshipType.DESCRIBES, image_id)] + [
        Relationship(image_id, RelationshipType.CONTAINS, deb.spdx_id) for deb in debs
    ]
    info = CreationInfo(
        spdx_version=SPDX_VERSION,
        spdx_id=DOCUMENT_ID,
        name=cell,
        document_namespace=namespace(cell, key),
        creators=[Actor(ActorType.TOOL, f"factory-{__version__}")],
        created=datetime.fromtimestamp(epoch, UTC),
    )
    return Document(info, packages=[image, *debs], relationships=relationships)


def problems(doc: Document) -> list[str]:
    """What the SPDX validator finds wrong with `doc` (empty when valid)."""
    return [m.validation_message for m in validate_full_spdx_document(doc, SPDX_VERSION)]


def json_bytes(
    cell: str,
    packages: list[dict[str, str]],
    *,
    arch: str,
    distro_version: str,
    epoch: int,
    key: str,
    family: str = "debian",
    purl_type: str = "deb",
) -> bytes:
    """The document as SPDX JSON with sorted keys; ValueError when it does not validate,
    so no invalid SBOM is ever written."""
    doc = document(
        cell, packages, arch=arch, distro_version=distro_version, epoch=epoch, key=key,
        family=family, purl_type=purl_type,
    )  # fmt: skip
    found = problems(doc)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise ValueError(f"{cell}: invalid SBOM: {'; '.join(found[:3])}{more}")
    data = DocumentConverter().convert(doc)  # type: ignore[no-untyped-call]
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _source(row: Mapping[str, str]) -> tuple[str, str]:
    """(source, source version) of a row; ("", "") in older manifests without them."""
    return (row.get("source") or "").strip(), (row.get("source_version") or "").strip()


def _id_part(name: str) -> str:
    """A name as SPDX id characters ([A-Za-z0-9.-]): `libstdc++6` → `libstdc-6`."""
    return _NOT_ID.sub("-", name).strip("-") or "x"


def _unique(spdx_id: str, used: set[str]) -> str:
    """Sanitising can map two names to one id (`a+b`, `a-b`): later ones get -2, -3, …
    in the rows' sorted order, so ids stay stable for the same manifest."""
    candidate, n = spdx_id, 1
    while candidate in used:
        n += 1
        candidate = f"{spdx_id}-{n}"
    used.add(candidate)
    return candidate
