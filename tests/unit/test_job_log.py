"""Job logs through aiofiles: lines in order from sync and async writers, whole when the
job is cancelled, a tail read from the end, and never an exception on a full disk."""

from __future__ import annotations

import errno
from pathlib import Path

import anyio

from factory import proc


async def test_log_lines_keep_their_order(tmp_path: Path) -> None:
    with proc.logging_to(tmp_path / "j.log") as log:
        log.write("# first")
        await log.put(["two", "three\n"])
        proc.note("four")
        await log.put([])
        await log.put(["five"])
    assert (tmp_path / "j.log").read_text() == "# first\ntwo\nthree\n# four\nfive\n"


async def test_a_cancelled_put_still_lands(tmp_path: Path) -> None:
    with proc.logging_to(tmp_path / "j.log") as log, anyio.CancelScope() as scope:
        scope.cancel()
        await log.put(["written"])
    assert (tmp_path / "j.log").read_text() == "written\n"


async def test_tail_async_reads_the_end_of_a_long_log(tmp_path: Path) -> None:
    path = tmp_path / "j.log"
    path.write_text("".join(f"line {i} {'x' * 50}\n" for i in range(100_000)))
    log = proc.JobLog(path)
    assert await log.tail_async(5) == log.tail(5)
    assert await log.tail_async(5, window=100) == log.tail(1)  # a cut first line is dropped
    assert await proc.JobLog(tmp_path / "none.log").tail_async() == []


async def test_a_log_on_a_full_disk_never_raises_from_put() -> None:
    log = proc.JobLog(Path("/dev/full"))
    log.open()
    await log.put(["x" * 10000])
    await log.put(["more"])
    log.write("and more")
    log.close()
    assert log.error is not None and log.error.errno == errno.ENOSPC
