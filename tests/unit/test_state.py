"""Loop devices are found by their backing file's device and inode, never by its path:
another container on the host may attach a file whose path is the same as ours."""

from __future__ import annotations

import json
import os

from factory.state import loops_backed_by

DEV = os.makedev(254, 0)


def listing(*devices: tuple[str, int, str]) -> str:
    return json.dumps(
        {
            "loopdevices": [
                {"name": n, "back-ino": ino, "back-maj:min": f"   {mm}  "} for n, ino, mm in devices
            ]
        }
    )


def test_found_by_device_and_inode() -> None:
    text = listing(("/dev/loop0", 42, "254:0"), ("/dev/loop1", 43, "254:0"))
    assert loops_backed_by(text, DEV, 42) == ["/dev/loop0"]


def test_the_same_inode_on_another_filesystem_is_not_ours() -> None:
    text = listing(("/dev/loop0", 42, "253:1"), ("/dev/loop3", 42, "254:0"))
    assert loops_backed_by(text, DEV, 42) == ["/dev/loop3"]


def test_no_devices_or_garbage_means_none() -> None:
    assert loops_backed_by("", DEV, 42) == []
    assert loops_backed_by("not json", DEV, 42) == []
    assert loops_backed_by(json.dumps({"loopdevices": []}), DEV, 42) == []
