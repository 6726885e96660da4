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
    loops: list[dict[str, int]] = field(default_factory=list)  # {dev, ino} of backing files

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

    def add_loop(self, backing: dict[str, int]) -> None:
        self.loops.append(backing)
        self._save()

    def drop_loop(self, backing: dict[str, int]) -> None:
        with contextlib.suppress(ValueError):
            self.loops.remove(backing)
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


LOSETUP_LIST = ["losetup", "--list", "--json", "--output", "NAME,BACK-INO,BACK-MAJ:MIN"]


def loops_backed_by(listing: str, dev: int, ino: int) -> list[str]:
    """The loop devices in LOSETUP_LIST's output whose backing file is (dev, ino). By
    inode, not by path: loop devices are shared by every container on the host, and
    another container's file may have the same path as ours."""
    try:
        data = json.loads(listing) if listing.strip() else {}
    except ValueError:
        return []
    want = f"{os.major(dev)}:{os.minor(dev)}"
    return sorted(
        str(d.get("name"))
        for d in data.get("loopdevices", [])
        if str(d.get("back-ino")) == str(ino) and str(d.get("back-maj:min", "")).strip() == want
    )


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
    their loop devices. A state file is removed once nothing it lists is left; else it
    keeps what is, for the next try. Synchronous and quick; returns what it did."""
    import subprocess

    def losetup_list() -> str:
        return subprocess.run(LOSETUP_LIST, capture_output=True, text=True, check=False).stdout

    done: list[str] = []
    for dead in leftovers():
        groups = dead.get("groups", [])
        for pgid in groups if isinstance(groups, list) else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pgid), signal.SIGKILL)
                done.append(f"killed process group {pgid}")
        listed = dead.get("mounts", [])
        mounts = [str(m) for m in listed] if isinstance(listed, list) else []
        for mount in reversed(mounts):
            for point in mounts_under(mount):
                subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
                done.append(f"unmounted {point}")
        listed = dead.get("loops", [])
        loops = [b for b in listed if isinstance(b, dict)] if isinstance(listed, list) else []
        if loops:
            listing = losetup_list()
            for backing in loops:
                for device in loops_backed_by(listing, backing["dev"], backing["ino"]):
                    subprocess.run(["partx", "-d", device], check=False, capture_output=True)
                    subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
                    done.append(f"detached {device}")
        path = Path(str(dead["file"]))
        left_mounts = [m for m in mounts if mounts_under(m)]
        listing = losetup_list() if loops else ""
        left_loops = [b for b in loops if loops_backed_by(listing, b["dev"], b["ino"])]
        if left_mounts or left_loops:
            keep = {k: v for k, v in dead.items() if k != "file"}
            atomic_write(
                path, json.dumps({**keep, "groups": [], "mounts": left_mounts, "loops": left_loops})
            )
        else:
            path.unlink(missing_ok=True)
    return done
