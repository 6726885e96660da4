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


def probing(counter: Path, says: str) -> list[str]:
    """A stand-in for QEMU (a real process, for the KVM this machine may not have): it
    counts its runs in `counter` and prints `says` as the guest's console would. The probe
    is this command with the word after -accel set to kvm (it gets `-accel kvm` as $0 $1)."""
    script = f'echo "$1" >> {counter}; printf "%s\\n" "{says}"; sleep 600'
    return ["sh", "-c", script, "-accel", "tcg"]


@pytest.mark.parametrize(
    ("console", "accel"),
    [("[    0.000000] Linux version 6.1.0-28-amd64", "kvm"), ("nothing from the kernel", "tcg")],
)
def test_the_probe_runs_once_and_its_verdict_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, console: str, accel: str
) -> None:
    monkeypatch.setattr(boot, "kvm_usable", lambda: True)  # /dev/kvm: not ours to give
    monkeypatch.setattr(boot, "KVM_PROBE", 1.0)  # a probe that hears nothing gives up
    counter, verdicts = tmp_path / "probes", tmp_path / "kvm.json"
    args = probing(counter, console)
    said: list[str] = []
    first = anyio.run(boot.choose_accel, args, "amd64", verdicts, said.append)
    assert counter.read_text() == "kvm\n"  # probed once, with KVM asked for
    assert json.loads(verdicts.read_text()) == {platform.release(): accel == "kvm"}
    second = anyio.run(boot.choose_accel, args, "amd64", verdicts, said.append)
    assert (first, second) == (accel, accel)
    assert counter.read_text() == "kvm\n"  # the second call did not probe: the verdict was kept
    assert len(said) == (2 if accel == "tcg" else 0)


def test_a_verdict_for_another_kernel_is_no_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boot, "kvm_usable", lambda: True)
    counter, verdicts = tmp_path / "probes", tmp_path / "kvm.json"
    verdicts.write_text(json.dumps({"0.0.0-another-kernel": False}))
    args = probing(counter, "[    0.000000] Linux version 6.1.0-28-amd64")
    assert anyio.run(boot.choose_accel, args, "amd64", verdicts, print) == "kvm"
    assert counter.read_text() == "kvm\n"
    assert json.loads(verdicts.read_text()) == {
        "0.0.0-another-kernel": False,
        platform.release(): True,
    }
