"""KVM only where a guest really runs under it; the verdict is kept per host kernel."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import anyio
import pytest

from factory.stages import boot

ARGS = ["qemu-system-x86_64", "-accel", "tcg", "-m", "64"]


def choose(verdicts: Path) -> tuple[str, list[str]]:
    said: list[str] = []
    accel = anyio.run(boot.choose_accel, ARGS, "amd64", verdicts, said.append)
    return accel, said


def test_a_known_bad_kvm_means_tcg_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boot, "kvm_usable", lambda: True)
    verdicts = tmp_path / "kvm.json"
    verdicts.write_text(json.dumps({platform.release(): False}))
    accel, said = choose(verdicts)
    assert accel == "tcg"
    assert len(said) == 1 and "using TCG" in said[0]


def test_a_known_good_kvm_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot, "kvm_usable", lambda: True)
    verdicts = tmp_path / "kvm.json"
    verdicts.write_text(json.dumps({platform.release(): True}))
    assert choose(verdicts) == ("kvm", [])


def test_no_kvm_device_means_tcg_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot, "kvm_usable", lambda: False)
    assert choose(tmp_path / "kvm.json") == ("tcg", [])
    assert not (tmp_path / "kvm.json").exists()


def test_other_arches_never_use_kvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot, "kvm_usable", lambda: True)
    said: list[str] = []
    assert anyio.run(boot.choose_accel, ARGS, "ppc64el", tmp_path / "v", said.append) == "tcg"


def test_the_accelerator_reaches_the_command_line() -> None:
    args = boot.qemu_args(Path("d.raw"), "raw", "amd64", "bios", None, "kvm")
    assert args[args.index("-accel") + 1] == "kvm"
