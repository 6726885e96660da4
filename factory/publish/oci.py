"""The OCI registry publish target: docker images and KubeVirt containerDisks, pushed
with skopeo, one multi-arch manifest list per distro.

skopeo (1.9 on Debian 12) has no command that joins images into a list, so each call
builds an OCI image layout in its own folder: one image per arch, tagged by arch, and
when there are several, an image index naming each with its platform, tagged `all`.
`skopeo copy --all` pushes the index and every image it lists in one go; the first ref
gets it from the layout, the others are copied registry to registry, so every tag names
the same digest. A docker archive goes into the layout through skopeo itself; a
containerDisk is written here (one deterministic layer tar, its config and manifest),
so the same qcow2 and epoch always give the same digests.

Credentials go to skopeo in an auth file (mode 0600, in the call's folder, removed with
it), never on a command line, in the job's log or in an error.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.from_thread

from factory import arches, proc
from factory.results import StageError
from factory.stages.pack import rfc3339

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TAG = "all"  # the layout's tag of the multi-arch index

# KubeVirt's virt-launcher reads a containerDisk as qemu (uid and gid 107); its own
# builds (kubevirt/containerdisks) make the folder 0555 and the disk 0444, 107:107.
DISK_OWNER = 107
DISK_DIR_MODE = 0o555
DISK_MODE = 0o444
DISK_DIR = "disk"

CHUNK = 1 << 20

Descriptor = dict[str, Any]


@dataclass(frozen=True)
class OciAuth:
    """A registry login. Its repr hides the password (it ends up in tracebacks)."""

    username: str
    password: str = field(repr=False)


def platform(arch: str) -> dict[str, str]:
    """An arch's platform as an image index entry names it: GOARCH, os, variant."""
    try:
        a = arches.get(arch)
    except arches.UnknownArch as exc:
        raise StageError(str(exc)) from None
    if not a.oci:
        raise StageError(f"arch {arch!r} has no OCI name")
    return {
        "architecture": a.oci,
        "os": "linux",
        **({"variant": a.oci_variant} if a.oci_variant else {}),
    }


def canonical(doc: Mapping[str, Any]) -> bytes:
    """JSON with sorted keys and no spaces: the same document, the same bytes and digest."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, data: bytes) -> Descriptor:
    return {
        "mediaType": media_type,
        "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
        "size": len(data),
    }


def image_index(manifests: Sequence[tuple[str, Descriptor]]) -> bytes:
    """The index that joins one image per arch: each manifest with its platform."""
    return canonical(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {**{k: d[k] for k in ("mediaType", "digest", "size")}, "platform": platform(arch)}
                for arch, d in manifests
            ],
        }
    )


class Layout:
    """An OCI image layout folder (image-spec's layout.md): blobs by digest, and
    index.json naming each image by a ref-name annotation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"

    def create(self) -> Layout:
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
        if not (self.root / "index.json").exists():
            self._write_index([])
        return self

    def _write_index(self, manifests: list[Descriptor]) -> None:
        (self.root / "index.json").write_bytes(
            canonical({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests})
        )

    def entries(self) -> list[Descriptor]:
        doc = json.loads((self.root / "index.json").read_bytes())
        return list(doc.get("manifests", []))

    def put(self, media_type: str, data: bytes) -> Descriptor:
        d = descriptor(media_type, data)
        (self.blobs / d["digest"].removeprefix("sha256:")).write_bytes(data)
        return d

    def read(self, d: Descriptor) -> bytes:
        return (self.blobs / str(d["digest"]).removeprefix("sha256:")).read_bytes()

    def tag(self, d: Descriptor, name: str) -> None:
        kept = [e for e in self.entries() if e.get("annotations", {}).get(REF_NAME) != name]
        self._write_index([*kept, {**d, "annotations": {REF_NAME: name}}])

    def find(self, name: str) -> Descriptor:
        for e in self.entries():
            if e.get("annotations", {}).get(REF_NAME) == name:
                return {k: v for k, v in e.items() if k != "annotations"}
        raise StageError(f"{self.root}: no image tagged {name!r}")


class _HashingWriter:
    """A file that hashes and counts what goes through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


def disk_members(name: str, size: int, epoch: int) -> tuple[tarfile.TarInfo, tarfile.TarInfo]:
    """The containerDisk layer's two entries: `disk/` and the disk in it, 107:107,
    read-only, numeric owners only, at the epoch."""
    folder = tarfile.TarInfo(f"{DISK_DIR}/")
    folder.type = tarfile.DIRTYPE
    disk = tarfile.TarInfo(f"{DISK_DIR}/{name}")
    disk.size = size
    for info, mode in ((folder, DISK_DIR_MODE), (disk, DISK_MODE)):
        info.mode = mode
        info.uid = info.gid = DISK_OWNER
        info.uname = info.gname = ""
        info.mtime = epoch
    return folder, disk


def write_disk_layer(
    qcow2: Path, out: IO[bytes], epoch: int, *, cancellable: bool = False
) -> tuple[str, int]:
    """The containerDisk's one layer, an uncompressed tar, into `out`; its sha256 (the
    layer's digest and diff_id) and size. The tar is written by hand, as tarfile would
    (pax format, records padded to 10240 bytes), so that a long copy can notice a cancel
    between chunks when run in a worker thread (`cancellable`)."""
    w = _HashingWriter(out)
    size = qcow2.stat().st_size
    for info in disk_members(qcow2.name, size, epoch):
        w.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    copied = 0
    with open(qcow2, "rb") as src:
        while chunk := src.read(CHUNK):
            if cancellable:
                anyio.from_thread.check_cancelled()
            copied += len(chunk)
            w.write(chunk)
    if copied != size:
        raise StageError(f"{qcow2}: changed while it was read ({size} bytes, then {copied})")
    w.write(b"\0" * (-size % tarfile.BLOCKSIZE))
    w.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    w.write(b"\0" * (-w.size % tarfile.RECORDSIZE))
    return w.sha.hexdigest(), w.size


def disk_config(arch: str, layer_digest: str, epoch: int) -> bytes:
    """The containerDisk's image config: its platform, the one layer, no command (KubeVirt
    only reads the file)."""
    created = rfc3339(epoch)
    return canonical(
        {
            **platform(arch),
            "created": created,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
            "history": [{"created": created, "created_by": "factory containerDisk"}],
        }
    )


def image_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    return canonical(
        {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config, "layers": list(layers)}
    )


def add_container_disk(
    layout: Layout, arch: str, qcow2: Path, epoch: int, *, cancellable: bool = False
) -> Descriptor:
    """One arch's containerDisk into the layout, tagged by its arch; its manifest."""
    tmp = layout.blobs / f".layer-{arch}"
    try:
        with open(tmp, "wb") as fh:
            digest, size = write_disk_layer(qcow2, fh, epoch, cancellable=cancellable)
        os.replace(tmp, layout.blobs / digest)
    finally:
        tmp.unlink(missing_ok=True)
    layer = {"mediaType": MEDIA_LAYER, "digest": f"sha256:{digest}", "size": size}
    config = layout.put(MEDIA_CONFIG, disk_config(arch, digest, epoch))
    manifest = layout.put(MEDIA_MANIFEST, image_manifest(config, [layer]))
    layout.tag(manifest, arch)
    return manifest


def archive_platform(archive: Path) -> dict[str, str]:
    """The platform a `docker load` archive's image config names (read from the tar's
    small members only: the layer is skipped, not read)."""
    try:
        with tarfile.open(archive, "r:") as tar:

            def member(name: str) -> Any:
                fh = tar.extractfile(name)
                if fh is None:
                    raise KeyError(name)
                return json.loads(fh.read())

            (image,) = member("manifest.json")
            config = member(image["Config"])
    except (OSError, tarfile.TarError, KeyError, ValueError, TypeError) as exc:
        raise StageError(f"{archive}: not a docker archive of one image ({exc})") from None
    return {k: str(config[k]) for k in ("architecture", "os", "variant") if config.get(k)}


def check_platform(arch: str, archive: Path) -> None:
    """An archive's config names the arch it was given as: a cell's image pushed under
    another arch's platform would make every pull of that arch fail at its first exec."""
    want = platform(arch)
    got = archive_platform(archive)
    if got != want:
        raise StageError(f"{archive}: its image is for {show(got)}, not {arch} ({show(want)})")


def show(p: Mapping[str, str]) -> str:
    """A platform as docker writes it: linux/arm64/v8."""
    return "/".join(p[k] for k in ("os", "architecture", "variant") if p.get(k)) or "no platform"


def token(auth: OciAuth) -> str:
    """The auth file's form of a login: base64 of USER:PASSWORD."""
    return base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()


def auth_file(path: Path, refs: Sequence[str], auth: OciAuth) -> Path:
    """containers-auth.json(5) for the refs' registries, created 0600 before a byte of it
    is written."""
    doc = {"auths": {registry(ref): {"auth": token(auth)} for ref in refs}}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(canonical(doc))
    return path


def repository(ref: str) -> str:
    """A ref without its tag or digest: what `@DIGEST` is added to."""
    name = bare(ref).partition("@")[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.partition(':')[0]}"


def skopeo_message(line: str) -> str:
    """The msg="..." of skopeo's logrus line, else the line."""
    found = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
    return found.group(1).replace('\\"', '"') if found else line.strip()


def registry(ref: str) -> str:
    return bare(ref).partition("/")[0]


def bare(ref: str) -> str:
    return ref.removeprefix("docker://")


def check_sources(sources: Sequence[tuple[str, Path]], refs: Sequence[str]) -> None:
    if not sources:
        raise StageError("nothing to push: no image given")
    if not refs:
        raise StageError("nowhere to push: no ref given")
    names = [arch for arch, _ in sources]
    for arch in names:
        platform(arch)
    twice = sorted({a for a in names if names.count(a) > 1})
    if twice:
        raise StageError(f"two images for arch {', '.join(twice)}: one per arch in a list")
    for ref in refs:
        name = bare(ref)
        tagged = ":" in name.rpartition("/")[2] or "@" in name
        if "/" not in name or not tagged:
            raise StageError(f"{ref!r}: not a REGISTRY/REPO:TAG reference")


@dataclass
class _Push:
    """One call's folder (the layout, the auth file, skopeo's temporary files) and what
    every skopeo command in it takes."""

    folder: Path
    layout: Layout
    auth: OciAuth | None
    authfile: Path | None
    tls_verify: bool

    def _secret(self, text: str) -> str:
        """`text` without the password, plain or as the auth file's token."""
        if self.auth and self.auth.password:
            for secret in (token(self.auth), self.auth.password):
                text = text.replace(secret, "***")
        return text

    async def skopeo(self, *args: str, what: str) -> None:
        """skopeo in the call's folder (relative paths: `oci:` and `docker-archive:` take
        a colon as the end of the path), with its temporary files there too; a failure
        as one line that names `what`."""
        argv = ["skopeo", "--policy", "policy.json", *args]
        try:
            await proc.run(argv, cwd=self.folder, env={"TMPDIR": os.fspath(self.folder)})
        except proc.CommandError as exc:
            last = skopeo_message(exc.tail[-1]) if exc.tail else f"exit {exc.returncode}"
            raise StageError(self._secret(f"{what}: skopeo: {last}")) from None

    def dest(self) -> list[str]:
        return [
            f"--dest-tls-verify={str(self.tls_verify).lower()}",
            *(["--dest-authfile", os.fspath(self.authfile)] if self.authfile else []),
        ]

    def src(self) -> list[str]:
        return [
            f"--src-tls-verify={str(self.tls_verify).lower()}",
            *(["--src-authfile", os.fspath(self.authfile)] if self.authfile else []),
        ]


@contextlib.asynccontextmanager
async def _push(
    workdir: Path, refs: Sequence[str], auth: OciAuth | None, tls_verify: bool
) -> AsyncIterator[_Push]:
    """A fresh folder under `workdir`, removed on success, failure and cancel."""
    workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="oci-", dir=workdir))
    try:
        os.chmod(folder, 0o700)
        # The images are ours, from this run: no signature to ask of them.
        (folder / "policy.json").write_bytes(
            canonical({"default": [{"type": "insecureAcceptAnything"}]})
        )
        authfile = auth_file(folder / "auth.json", refs, auth) if auth else None
        yield _Push(folder, Layout(folder / "layout").create(), auth, authfile, tls_verify)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(folder, ignore_errors=True))


async def _send(push: _Push, names: Sequence[str], refs: Sequence[str], what: str) -> str:
    """Push the layout's images (`names`, one per arch: a plain image for one, else the
    index over them) to every ref; the digest every ref now names."""
    if len(names) == 1:
        src, everything = f"oci:layout:{names[0]}", []
    else:
        src, everything = f"oci:layout:{INDEX_TAG}", ["--all"]
    first, *others = [f"docker://{bare(r)}" for r in refs]
    digestfile = push.folder / "digest"
    await push.skopeo(
        "copy", "--quiet", *everything, "--digestfile", "digest", *push.dest(), src, first,
        what=f"{what} to {bare(first)}",
    )  # fmt: skip
    digest = digestfile.read_text().strip()
    for ref in others:
        # Registry to registry: the same manifest bytes, so the same digest under each tag.
        pushed = f"docker://{repository(first)}@{digest}"
        await push.skopeo(
            "copy", "--quiet", *everything, *push.src(), *push.dest(), pushed, ref,
            what=f"{what} to {bare(ref)}",
        )  # fmt: skip
    return digest


def _join(layout: Layout, manifests: Sequence[tuple[str, Descriptor]]) -> list[str]:
    """Tag the index over several arches' images; the names to push."""
    if len(manifests) == 1:
        return [manifests[0][0]]
    index = layout.put(MEDIA_INDEX, image_index(manifests))
    layout.tag(index, INDEX_TAG)
    return [arch for arch, _ in manifests]


def _sorted(sources: Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """By arch: the index's bytes do not depend on the order the cells finished in."""
    return sorted(sources, key=lambda s: s[0])


async def push_images(
    sources: Sequence[tuple[str, Path]],
    refs: Sequence[str],
    *,
    auth: OciAuth | None,
    tls_verify: bool,
    workdir: Path,
) -> str:
    """Push one distro's docker archives (factory arch name, the cell's `docker load`
    .tar) as one manifest list (a plain manifest for one arch) to every ref
    ("127.0.0.1:5000/factory/debian-bookworm:20261202"); its digest. Raises StageError
    with a one-line reason."""
    check_sources(sources, refs)
    async with _push(workdir, refs, auth, tls_verify) as push:
        manifests = []
        for arch, archive in _sorted(sources):
            if not archive.is_file():
                raise StageError(f"{archive}: no such docker archive")
            await anyio.to_thread.run_sync(check_platform, arch, archive)
            link = push.folder / f"{arch}.docker.tar"
            link.symlink_to(archive.resolve())
            await push.skopeo(
                "copy", "--quiet", f"docker-archive:{link.name}", f"oci:layout:{arch}",
                what=f"{archive.name} into an OCI layout",
            )  # fmt: skip
            manifests.append((arch, push.layout.find(arch)))
        names = _join(push.layout, manifests)
        return await _send(push, names, refs, "push")


async def push_container_disks(
    sources: Sequence[tuple[str, Path]],
    refs: Sequence[str],
    *,
    auth: OciAuth | None,
    tls_verify: bool,
    workdir: Path,
    epoch: int,
) -> str:
    """Push one distro's qcow2 disks (factory arch name, the cell's .qcow2) as KubeVirt
    containerDisks joined in one manifest list, as push_images does; `epoch` is every
    time in them, so the same disks give the same digests."""
    check_sources(sources, refs)
    async with _push(workdir, refs, auth, tls_verify) as push:
        manifests = []
        for arch, disk in _sorted(sources):
            if not disk.is_file():
                raise StageError(f"{disk}: no such disk image")
            add = functools.partial(add_container_disk, cancellable=True)
            manifest = await anyio.to_thread.run_sync(add, push.layout, arch, disk, epoch)
            manifests.append((arch, manifest))
        names = _join(push.layout, manifests)
        return await _send(push, names, refs, "push containerDisk")
