"""Progress that moves: the tools' output read as fractions (real captured samples), the
job's meter and its rate, proc.run feeding it, the sinks showing it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from factory import proc
from factory.distros.debian import mmdebstrap_progress
from factory.events import Event, PlainSink, fraction
from factory.executors.placement import _listener
from factory.fsutil import sha256_file
from factory.progress import RichSink
from factory.stages import pack
from factory.stages.convert import qemu_img_progress

# `qemu-img convert -p -f raw -O vmdk -o subformat=streamOptimized r o.vmdk` (7.2), stdout.
QEMU_IMG = b"    (0.00/100%)\r    (1.07/100%)\r    (2.15/100%)\r    (100.00/100%)\r\n"
# `mksquashfs t s.sqfs -noappend -quiet -comp zstd ... | cat` (4.5.1), stdout: a pipe too.
SQUASHFS = (
    b"\r[\\" + b" " * 61 + b"]   100/9736   1%"
    b"\r[=\\" + b" " * 60 + b"]   300/9736   3%"
    b"\r[" + b"=" * 62 + b"] 5046/5046 100%\n"
)
# mmdebstrap 1.3.5 at the default verbosity, stderr a pipe (a rootfs job's log).
MMDEBSTRAP = """\
I: chroot architecture amd64 is equal to the host's architecture
I: finding correct signed-by value...
I: running apt-get update...
I: downloading packages with apt...
I: extracting archives...
I: installing essential packages...
Adding 'local diversion of /usr/sbin/update-initramfs to /usr/sbin/update-initramfs.factory'
I: installing remaining packages inside the chroot...
I: running --customize-hook in shell: sh -c 'rm -f "$1/usr/sbin/update-initramfs"' exec /x
I: cleaning package lists and apt cache...
I: success in 97.9745 seconds"""


def pieces(raw: bytes) -> list[str]:
    return raw.decode().replace("\n", "\r").split("\r")


def test_qemu_img_progress_reads_its_redraws() -> None:
    found = [qemu_img_progress(p) for p in pieces(QEMU_IMG)]
    assert found == [(0.0, 100.0), (1.07, 100.0), (2.15, 100.0), (100.0, 100.0), None, None]
    assert qemu_img_progress("qemu-img: Could not open 'x': No such file") is None


def test_mksquashfs_progress_reads_its_bar() -> None:
    found = [pack.mksquashfs_progress(p) for p in pieces(SQUASHFS)]
    assert found == [None, (100.0, 9736.0), (300.0, 9736.0), (5046.0, 5046.0), None]
    assert pack.mksquashfs_progress("Parallel mksquashfs: Using 2 processors") is None
    assert "-no-progress" not in pack.mksquashfs_args(Path("/t"), Path("/o"), 1)


def test_tar_checkpoints_count_records_against_the_tree(tmp_path: Path) -> None:
    parse = pack.tar_progress(50 * 1024 * 1024)
    # `tar --checkpoint=1024 --checkpoint-action='echo=#%u\r' -cf x.tar ...`, stderr.
    assert parse("tar: #1") == (1024 * 10240, 50 * 1024 * 1024)  # 1024 records of 10 KiB
    assert parse("tar: #9") == (50 * 1024 * 1024, 50 * 1024 * 1024)  # an estimate: capped
    assert parse("tar: ./x: file changed as we read it") is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a").write_bytes(b"x" * 1000)
    (tmp_path / "d/b").hardlink_to(tmp_path / "d/a")
    (tmp_path / "d/l").symlink_to("a")
    # four names (d, a, b, l) at two blocks each, a's data once, the end's two zero blocks
    assert pack.tar_size(tmp_path) == 4 * 1024 + 1024 + 1024


def test_mmdebstrap_phases_rise() -> None:
    found = [f for f in map(mmdebstrap_progress, MMDEBSTRAP.splitlines()) if f is not None]
    assert len(found) == 7
    assert [d for d, _ in found] == sorted(d for d, _ in found)
    assert all(t == 1.0 and 0 < d < 1 for d, t in found)


def test_meter_passes_a_few_a_second() -> None:
    said: list[tuple[float, float]] = []
    meter = proc.Meter(lambda d, t: said.append((d, t)), every=0.2)
    for i in range(1000):
        meter(i, 1000)
    assert said == [(0.0, 1000.0)]
    time.sleep(0.25)
    meter(500, 1000)
    meter(1, 0)  # no total: nothing
    assert said == [(0.0, 1000.0), (500.0, 1000.0)]


async def test_run_feeds_the_meter_and_logs_no_redraws(tmp_path: Path) -> None:
    said: list[tuple[float, float]] = []
    script = (
        "import sys, time\n"
        "for i in range(6):\n"
        "    sys.stdout.write(f'    ({i * 20}.00/100%)\\r'); sys.stdout.flush(); time.sleep(0.15)\n"
        "print()\n"
        "print('written', file=sys.stderr)\n"
    )
    meter = proc.Meter(lambda d, t: said.append((d, t)), every=0.1)
    with proc.logging_to(tmp_path / "job.log") as log, proc.metering(meter):
        await proc.run(["python3", "-c", script], progress=qemu_img_progress)
    assert len(said) >= 3 and said == sorted(said), said
    assert all(t == 100.0 for _, t in said)
    text = log.path.read_text()
    assert "\nwritten\n# exit 0" in text  # stderr's line; not one of the redraws
    assert not [line for line in text.splitlines() if line.startswith("    (")]


async def test_run_without_a_meter_or_parser_is_as_before(tmp_path: Path) -> None:
    with proc.logging_to(tmp_path / "job.log") as log:
        await proc.run(["printf", "a\\r\\nb\\n"], progress=qemu_img_progress)
        await proc.run(["printf", "%s\\r\\n", "    (1.00/100%)"])
    assert log.path.read_text().splitlines()[1:3] == ["a", "b"]
    assert "    (1.00/100%)" in log.path.read_text()


async def test_sha256_reports_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("factory.fsutil.REPORT_EVERY", 0.0)
    f = tmp_path / "f"
    f.write_bytes(b"y" * (9 * 1024 * 1024))
    said: list[tuple[float, float]] = []
    digest = await sha256_file(f, lambda d, t: said.append((d, t)))
    assert digest == await sha256_file(f)
    assert said == [(4194304.0, 9437184.0), (8388608.0, 9437184.0), (9437184.0, 9437184.0)]


def progress(job: str, done: float, total: float, at: float = 0.0) -> Event:
    return Event("progress", job=job, job_kind="convert", data={"done": done, "total": total},
                 time=at or time.time())  # fmt: skip


def test_plain_sink_says_a_fraction_every_ten_seconds() -> None:
    out = io.StringIO()
    sink = PlainSink(out)
    for i in range(30):
        sink(progress("convert:x", i, 30, at=1000.0 + i))
    sink(Event("progress", job="convert:x", message="checking", time=1031.0))
    lines = out.getvalue().splitlines()
    assert [line.split(": ")[-1] for line in lines] == ["0%", "33%", "67%", "checking"]
    assert fraction(Event("progress", data={"done": 1, "total": 0})) is None


def test_rich_sink_shows_the_fraction_and_weighs_the_run_by_cost() -> None:
    console = Console(file=io.StringIO(), width=160, force_terminal=False)
    sink = RichSink(console)
    costs = {"convert:x": 30.0, "publish:x": 1.0, "pack:y": 9.0}
    sink(Event("run-start", data={"matrix": "m", "jobs": 3, "costs": costs}))
    sink(Event("start", job="convert:x"))
    sink(Event("progress", job="convert:x", message="qemu-img convert to vmdk"))
    job = sink.progress.tasks[sink.running["convert:x"]]
    assert job.total is None  # no fraction yet: a pulsing bar
    sink(progress("convert:x", 57.0, 100.0))
    assert (job.total, job.fields["count"]) == (100, " 57%")
    assert job.completed == pytest.approx(57.0)
    assert "qemu-img convert to vmdk" in job.description
    run = sink.progress.tasks[0]
    assert run.total == 40.0 and run.completed == pytest.approx(0.57 * 30)
    sink(Event("start", job="pack:y"))
    sink(Event("done", job="pack:y"))
    assert run.completed == pytest.approx(0.57 * 30 + 9) and run.fields["count"] == "1/3 jobs"


def test_a_workers_fraction_reaches_the_controllers_meter() -> None:
    said: list[object] = []
    meter = proc.Meter(lambda d, t: said.append((d, t)), every=0)
    listen = _listener(said.append, meter)
    listen(progress("convert:x", 12.5, 100))
    listen(Event("progress", job="convert:x", message="checking"))
    listen(Event("progress", job="convert:x", data={"done": "1", "total": 2}))  # not numbers
    assert said == [(12.5, 100.0), "checking"]


def test_a_fraction_event_crosses_the_wire() -> None:
    """Plain data: a worker's JSON line reads back as the same event."""
    event = progress("convert:x", 3.5, 7)
    assert Event.from_json(event.to_json()) == event
