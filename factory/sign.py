"""Signing what a run publishes: a detached, armored gpg signature of SHA256SUMS.

Debian's cloud images ship `SHA256SUMS.sign` beside `SHA256SUMS`; a user checks it with
`gpg --verify SHA256SUMS.sign SHA256SUMS`. The key is a secret key of the gpg home
(GNUPGHOME, else ~/.gnupg) named by `[sign] gpg_key`; `check_key` runs before a run
starts, so a missing key is said before any work is done.
"""

from __future__ import annotations

import os
from pathlib import Path

from factory import proc
from factory.fsutil import aside
from factory.proc import CommandError
from factory.results import StageError

SUFFIX = ".sign"
FIX = "import it with gpg --import, or fix [sign] gpg_key"
TIMEOUT = 120.0


def _env(gnupghome: Path | None) -> dict[str, str] | None:
    return None if gnupghome is None else {"GNUPGHOME": os.fspath(gnupghome)}


def _home(gnupghome: Path | None) -> str:
    if gnupghome is not None:
        return os.fspath(gnupghome)
    return os.environ.get("GNUPGHOME") or "~/.gnupg"


def _gpg() -> list[str]:
    # --pinentry-mode error: a key that needs a passphrase nobody cached fails at once
    # instead of waiting for a prompt that an unattended run never answers.
    return ["gpg", "--batch", "--no-tty", "--pinentry-mode", "error"]


def _why(exc: CommandError) -> str:
    last = exc.tail[-1].strip() if exc.tail else ""
    return last.removeprefix("gpg: ") or f"gpg exited {exc.returncode}"


async def check_key(key: str, *, gnupghome: Path | None = None) -> None:
    """Raise StageError (one line) unless `key` names a secret key that can sign."""
    if not key.strip() or key.startswith("-"):
        raise StageError(f"gpg key {key!r} is not a key id, fingerprint or user id: {FIX}")
    try:
        listed = await proc.run(
            [*_gpg(), "--with-colons", "--list-secret-keys", "--", key],
            capture=True,
            check=False,
            env=_env(gnupghome),
            timeout=TIMEOUT,
        )
    except FileNotFoundError as exc:
        raise StageError(f"gpg is not installed, needed to sign with key {key}") from exc
    records = [line.split(":") for line in listed.text.splitlines()]
    primaries = [r for r in records if r[0] == "sec"]
    if listed.returncode != 0 or not primaries:
        raise StageError(f"gpg key {key} is not a secret key in {_home(gnupghome)}: {FIX}")
    # Field 12 of a primary key's record: upper-case letters are what the whole key
    # (with its subkeys) can still do; a revoked or expired key has no "S".
    if not any(len(r) > 11 and "S" in r[11] for r in primaries):
        raise StageError(
            f"gpg key {key} in {_home(gnupghome)} cannot sign (expired, revoked or "
            f"without a signing subkey): {FIX}"
        )


async def sign_sums(sums: Path, key: str, *, gnupghome: Path | None = None) -> Path:
    """Write `SUMS.sign`, a detached armored signature of `sums` by `key`, beside it.

    Written under a temporary name and renamed, so the folder never holds a partial
    signature; returns the signature's path."""
    if not sums.is_file():
        raise StageError(f"{sums}: no such file to sign")
    target = sums.with_name(sums.name + SUFFIX)
    tmp = aside(target)
    try:
        await proc.run(
            [
                *_gpg(),
                "--yes",
                "--local-user",
                key,
                "--detach-sign",
                "--armor",
                "--output",
                tmp,
                "--",
                sums,
            ],
            env=_env(gnupghome),
            timeout=TIMEOUT,
        )
        os.replace(tmp, target)
    except CommandError as exc:
        raise StageError(
            f"signing {sums.name} with gpg key {key} failed ({_why(exc)}): {FIX}"
        ) from exc
    except FileNotFoundError as exc:
        raise StageError(f"gpg is not installed, needed to sign with key {key}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
