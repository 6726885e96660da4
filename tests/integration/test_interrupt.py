"""Stopped at a bad moment, a run leaves nothing behind: no mount, no process, no partial
tree in the cache, no half-written artifact; killed outright, the next run cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FACTORY, ROOT, STARTED, wait_until
from tests.integration.conftest import CACHE, DATA, processes_ours

CELL = "debian-bookworm-amd64"


class Running:
    """A `factory run` in the background whose JSON events can be waited for."""

    def __init__(self, matrix: Path, out: Path, cache: Path, *args: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [
                *FACTORY,
                "run",
                str(matrix),
                "--out",
                str(out),
                "--cache",
                str(cache),
                "--events",
                "json",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        STARTED.add(self.proc.pid)

    def wait_for(
        self, kind: str, job_kind: str, message: str = "", timeout: float = 600
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            if (
                event["kind"] == kind
                and event["job_kind"] == job_kind
                and message in event["message"]
            ):
                return dict(event)
            assert time.monotonic() < deadline, f"no {kind} {job_kind} {message!r} in time"
        raise AssertionError(
            f"the run ended before {kind} {job_kind} {message!r}: "
            f"{self.proc.wait()} {self.proc.stderr.read() if self.proc.stderr else ''}"
        )

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        if self.proc.stdout:
            self.proc.stdout.read()
        return code

    def report(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.out / "report.json").read_text())
        return data


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(path))]


def processes(pattern: str, folder: Path) -> list[int]:
    """This session's live processes whose command line matches `pattern`: ours by
    descent, mark, or a working folder, chroot or argument in `folder` or in a run's own
    cache folder; not the machine's (another session's `sleep 600` is none of ours)."""
    return sorted(pid for pid, _ in processes_ours(folder, pattern))


def chroot_mounts(run: Running, cache: Path = CACHE) -> list[str]:
    """The mounts in the run's own tree folders in the cache (`tmp/KEY.PID/...`)."""
    return [m for m in mounts_under(cache / "tmp") if f".{run.proc.pid}/" in m]


def in_the_chroot(run: Running) -> None:
    """Wait until the slow hook holds the chroot: its mounts are up and its sleep runs."""
    wait_until(
        "the hook running inside a bound chroot",
        lambda: chroot_mounts(run) and processes("^sleep 600$", run.out.parent),
        timeout=120,
    )


@pytest.fixture
def private_cache(tmp_path: Path) -> Iterator[Path]:
    cache = tmp_path / "cache"
    yield cache
    assert mounts_under(cache) == []


def assert_clean(out: Path, cache: Path, pid: int) -> None:
    """Nothing of run `pid` is left (other runs may share the cache)."""
    ours = [p for p in (cache / "tmp").iterdir() if p.name.endswith(f".{pid}")]
    assert ours == []
    assert [m for m in mounts_under(cache / "tmp") if f".{pid}/" in m] == []
    wait_until(
        "the hook's processes gone", lambda: processes("^sleep 600$", out.parent) == [], timeout=30
    )
    assert not (out / ".work").exists()
    assert [p for p in out.rglob("*") if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_inside_the_chroot_undoes_everything(tmp_path: Path, sig: signal.Signals) -> None:
    run = Running(DATA / "slow-hook.toml", tmp_path / "out", CACHE)
    run.wait_for("progress", "finalise", "hook")
    in_the_chroot(run)
    assert run.stop(sig) == 130
    report = run.report()
    assert report["status"] == "interrupted"
    jobs = {j["id"]: j for j in report["jobs"]}  # type: ignore[attr-defined]
    assert jobs[f"finalise:{CELL}"]["status"] == "cancelled"
    assert jobs[f"assemble:{CELL}"]["status"] == "skipped"
    assert not (CACHE / "trees" / jobs[f"finalise:{CELL}"]["key"]).exists()
    assert_clean(tmp_path / "out", CACHE, run.proc.pid)
    assert report["artifacts"] == []


def test_signal_during_mmdebstrap_leaves_no_partial_tree(
    tmp_path: Path, private_cache: Path
) -> None:
    run = Running(DATA / "slow-hook.toml", tmp_path / "out", private_cache)
    run.wait_for("progress", "rootfs", "mmdebstrap")
    # Into package installation: mmdebstrap (--mode=root) has mounted /proc, /sys and
    # /dev in the tree it builds, and is still running.
    mounted = wait_until(
        "mmdebstrap's mounts in its tree",
        lambda: chroot_mounts(run, private_cache),
        timeout=600,
        every=0.05,
    )
    assert processes(f"mmdebstrap.*{private_cache}", tmp_path), mounted
    assert run.stop(signal.SIGTERM) == 130
    assert processes(f"mmdebstrap.*{private_cache}", tmp_path) == []
    assert mounts_under(private_cache) == []
    assert list((private_cache / "trees").iterdir()) == []
    assert_clean(tmp_path / "out", private_cache, run.proc.pid)


def test_after_sigkill_factory_clean_removes_what_was_left(tmp_path: Path) -> None:
    state_dir = Path(os.environ.get("FACTORY_STATE_DIR", "/run/factory"))
    run = Running(DATA / "slow-hook.toml", tmp_path / "out", CACHE)
    run.wait_for("progress", "finalise", "hook")
    in_the_chroot(run)
    # What clean undoes is what the run wrote down: wait until its state file lists the
    # hook's process group (factory records a group just after starting it, with fsync).
    (sleeper,) = processes("^sleep 600$", tmp_path)
    group = os.getpgid(sleeper)
    state_file = state_dir / f"run-{run.proc.pid}.json"
    wait_until(
        "the hook's process group in the run's state file",
        lambda: group in json.loads(state_file.read_text())["groups"],
        timeout=30,
    )
    run.proc.kill()  # the factory process alone: its children and mounts stay
    run.proc.wait()
    assert chroot_mounts(run)
    assert processes("^sleep 600$", tmp_path)
    assert list(state_dir.glob(f"run-{run.proc.pid}.json"))
    done = subprocess.run(
        [*FACTORY, "clean", "--cache", str(CACHE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "unmounted" in done.stdout, done.stdout
    assert f"killed process group {group}" in done.stdout, done.stdout
    assert not list(state_dir.glob(f"run-{run.proc.pid}.json"))
    assert_clean(tmp_path / "out", CACHE, run.proc.pid)


def assert_only_whole_artifacts(out: Path) -> None:
    """Every file under a final name in OUT is whole: it matches its .sha256."""
    for sums in out.glob(f"{CELL}/*.sha256"):
        digest, name = sums.read_text().split()
        artifact = sums.parent / name
        if artifact.exists():
            got = subprocess.run(
                ["sha256sum", artifact], capture_output=True, text=True, check=True
            ).stdout.split()[0]
            assert got == digest, artifact
    for path in out.glob(f"{CELL}/*"):
        if not path.name.endswith((".sha256", ".manifest.json", ".spdx.json")):
            assert path.with_name(path.name + ".sha256").exists(), path


@pytest.mark.parametrize("stage", ["assemble", "convert", "pack", "publish"])
def test_interrupt_at_each_disk_stage(tmp_path: Path, stage: str) -> None:
    """SIGINT as soon as a job of `stage` starts (trees come from the cache)."""
    run = Running(DATA / "raw-qcow2.toml", tmp_path / "out", CACHE)
    run.wait_for("start", stage)
    assert run.stop(signal.SIGINT) == 130
    report = run.report()
    assert report["status"] == "interrupted"
    statuses = {j["status"] for j in report["jobs"]}  # type: ignore[attr-defined]
    assert "cancelled" in statuses
    assert_clean(tmp_path / "out", CACHE, run.proc.pid)
    assert_only_whole_artifacts(tmp_path / "out")
    assert processes("^qemu-img ", tmp_path) == []


def test_a_second_signal_does_not_break_the_clean_up(tmp_path: Path) -> None:
    """Impatient users press Ctrl-C twice: the clean-up the first one started finishes."""
    run = Running(DATA / "slow-hook.toml", tmp_path / "out", CACHE)
    run.wait_for("progress", "finalise", "hook")
    in_the_chroot(run)
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    assert run.stop(signal.SIGTERM) == 130
    assert "Traceback" not in (run.proc.stderr.read() if run.proc.stderr else "")
    assert run.report()["status"] == "interrupted"
    assert_clean(tmp_path / "out", CACHE, run.proc.pid)
