"""What a run holds on the machine (mounts, loop devices, process groups), written down
as it goes.

If factory itself is killed (SIGKILL, OOM, power to the container) its cleanup code never
runs; the next run, or `factory clean`, reads the state files of runs that are gone and
undoes what they left: kills their process groups, unmounts their mounts and detaches
their loop devices.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from factory.fsutil import atomic_write

STATE_DIR = Path(os.environ.get("FACTORY_STATE_DIR", "/run/factory"))


@dataclass
class RunState:
    path: Path
    info: dict[str, object] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)  # image files with loop devices on them

    def _save(self) -> None:
        data = {
            **self.info,
            "pid": os.getpid(),
            "mounts": self.mounts,
            "groups": self.groups,
            "loops": self.loops,
        }
        with contextlib.suppress(OSError):
            atomic_write(self.path, json.dumps(data))

    def add_mount(self, path: Path) -> None:
        self.mounts.append(str(path))
        self._save()

    def drop_mount(self, path: Path) -> None:
        with contextlib.suppress(ValueError):
            self.mounts.remove(str(path))
        self._save()

    def add_loop(self, image: str) -> None:
        self.loops.append(image)
        self._save()

    def drop_loop(self, image: str) -> None:
        with contextlib.suppress(ValueError):
            self.loops.remove(image)
        self._save()

    def add_group(self, pgid: int) -> None:
        self.groups.append(pgid)
        self._save()

    def drop_group(self, pgid: int) -> None:
        with contextlib.suppress(ValueError):
            self.groups.remove(pgid)
        self._save()


_current: RunState | None = None


def current() -> RunState | None:
    return _current


@contextlib.contextmanager
def recording(**info: object) -> Iterator[RunState]:
    """Keep this run's state file for as long as the run lasts; removed at a clean end."""
    global _current
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    run = RunState(STATE_DIR / f"run-{os.getpid()}.json", {**info, "started": time.time()})
    run._save()
    _current = run
    try:
        yield run
    finally:
        _current = None
        if not (run.mounts or run.groups or run.loops):  # else the next run cleans them
            run.path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below `prefix`, deepest first (the order to unmount them)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def loop_devices(image: str) -> list[str]:
    """The loop devices attached to `image` now (by the kernel's record of their file)."""
    real = os.path.realpath(image)
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)") == real:
            found.append(f"/dev/{entry.name}")
    return sorted(found)


def leftovers() -> list[dict[str, object]]:
    """State files of runs whose process is gone."""
    out = []
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("run-*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {"pid": -1}
            pid = data.get("pid")
            if not isinstance(pid, int) or not pid_alive(pid):
                out.append({**data, "file": str(path)})
    return out


def clean_leftovers() -> list[str]:
    """Undo what dead runs left: kill their process groups, unmount their mounts, detach
    their loop devices.
        Synchronous and quick; returns what it did, for the log and the user."""
    import subprocess

    done: list[str] = []
    for dead in leftovers():
        groups = dead.get("groups", [])
        for pgid in groups if isinstance(groups, list) else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pgid), signal.SIGKILL)
                done.append(f"killed process group {pgid}")
        mounts = dead.get("mounts", [])
        for mount in reversed(mounts if isinstance(mounts, list) else []):
            for point in mounts_under(str(mount)):
                subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
                done.append(f"unmounted {point}")
        loops = dead.get("loops", [])
        for image in loops if isinstance(loops, list) else []:
            for device in loop_devices(str(image)):
                subprocess.run(["partx", "-d", device], check=False, capture_output=True)
                subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
                done.append(f"detached {device} ({image})")
        Path(str(dead["file"])).unlink(missing_ok=True)
    return done
