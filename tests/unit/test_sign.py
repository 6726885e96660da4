"""sign: SHA256SUMS.sign as Debian's cloud images have it, checked with the real gpg."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from factory.results import StageError
from factory.sign import check_key, sign_sums
from tests.conftest import have

pytestmark = pytest.mark.skipif(not have("gpg", "gpgconf"), reason="needs gpg")

SUMS = "0" * 64 + "  debian-bookworm-amd64/debian-bookworm-amd64.raw\n"


def gpg(
    home: Path, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gpg", "--batch", *args],
        input=input,
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, "GNUPGHOME": str(home)},
    )


def new_home(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def make_key(home: Path, uid: str = "factory test <test@example.invalid>") -> str:
    """A throwaway signing key without a passphrase; its fingerprint."""
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    listing = gpg(home, "--with-colons", "--list-secret-keys", uid).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))


def stop_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--kill", "gpg-agent"],
        env={**os.environ, "GNUPGHOME": str(home)},
        check=False,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A gpg home with one signing key (shared: making a key takes a moment)."""
    home = new_home(tmp_path_factory.mktemp("sign") / "g")
    yield home, make_key(home)
    stop_agent(home)


@pytest.fixture
def sums(tmp_path: Path) -> Path:
    path = tmp_path / "SHA256SUMS"
    path.write_text(SUMS)
    return path


async def test_signature_verifies_with_gpg(keyring: tuple[Path, str], sums: Path) -> None:
    home, fpr = keyring
    sig = await sign_sums(sums, fpr, gnupghome=home)
    assert sig == sums.parent / "SHA256SUMS.sign"
    assert sig.read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    checked = gpg(home, "--verify", str(sig), str(sums), check=False)
    assert checked.returncode == 0, checked.stderr
    assert "Good signature" in checked.stderr
    # only the two files: nothing written aside is left
    assert sorted(p.name for p in sums.parent.iterdir()) == ["SHA256SUMS", "SHA256SUMS.sign"]


async def test_gnupghome_from_the_environment(
    keyring: tuple[Path, str], sums: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, fpr = keyring
    monkeypatch.setenv("GNUPGHOME", str(home))
    await check_key(fpr)
    sig = await sign_sums(sums, fpr)
    assert gpg(home, "--verify", str(sig), str(sums), check=False).returncode == 0


async def test_signing_again_replaces_the_signature(keyring: tuple[Path, str], sums: Path) -> None:
    home, fpr = keyring
    old = await sign_sums(sums, fpr, gnupghome=home)
    inode = old.stat().st_ino
    sums.write_text(SUMS.replace("0", "1"))
    new = await sign_sums(sums, fpr, gnupghome=home)
    assert new.stat().st_ino != inode  # renamed into place, not rewritten
    assert gpg(home, "--verify", str(new), str(sums), check=False).returncode == 0


async def test_tampered_file_fails_verification(keyring: tuple[Path, str], sums: Path) -> None:
    home, fpr = keyring
    sig = await sign_sums(sums, fpr, gnupghome=home)
    sums.write_text(SUMS.replace("0", "f", 1))
    checked = gpg(home, "--verify", str(sig), str(sums), check=False)
    assert checked.returncode != 0
    assert "BAD signature" in checked.stderr


async def test_check_key_accepts_fingerprint_and_user_id(keyring: tuple[Path, str]) -> None:
    home, fpr = keyring
    await check_key(fpr, gnupghome=home)
    await check_key("test@example.invalid", gnupghome=home)


async def test_missing_key_is_one_line_with_the_fix(keyring: tuple[Path, str], sums: Path) -> None:
    home, _ = keyring
    missing = "0123456789ABCDEF0123456789ABCDEF01234567"
    with pytest.raises(StageError) as checked:
        await check_key(missing, gnupghome=home)
    text = str(checked.value)
    assert "\n" not in text
    assert missing in text
    assert "import it with gpg --import, or fix [sign] gpg_key" in text

    with pytest.raises(StageError) as signed:
        await sign_sums(sums, missing, gnupghome=home)
    text = str(signed.value)
    assert "\n" not in text
    assert missing in text
    assert "import it with gpg --import, or fix [sign] gpg_key" in text
    assert sorted(p.name for p in sums.parent.iterdir()) == ["SHA256SUMS"]


async def test_public_key_alone_cannot_sign(keyring: tuple[Path, str], tmp_path: Path) -> None:
    """A home that has only the public half (a verifier's keyring) is told apart."""
    home, fpr = keyring
    public = gpg(home, "--armor", "--export", fpr).stdout
    other = new_home(tmp_path / "g")
    try:
        gpg(other, "--import", input=public)
        with pytest.raises(StageError, match=r"not a secret key .* gpg --import"):
            await check_key(fpr, gnupghome=other)
    finally:
        stop_agent(other)


async def test_option_like_key_is_refused() -> None:
    with pytest.raises(StageError, match=r"fix \[sign\] gpg_key"):
        await check_key("--homedir=/")
    with pytest.raises(StageError, match=r"fix \[sign\] gpg_key"):
        await check_key("  ")


async def test_missing_sums_is_not_blamed_on_the_key(
    keyring: tuple[Path, str], tmp_path: Path
) -> None:
    home, fpr = keyring
    with pytest.raises(StageError, match="no such file to sign") as raised:
        await sign_sums(tmp_path / "SHA256SUMS", fpr, gnupghome=home)
    assert "gpg_key" not in str(raised.value)
