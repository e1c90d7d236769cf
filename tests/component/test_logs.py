"""Replica log files: tail across rotation, follow across truncation, bounded size."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from vectorlay.node import log_times, logs


def test_tail_reads_the_last_lines_and_reaches_into_the_rotated_copy(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_text("".join(f"old {i}\n" for i in range(10)))
    assert logs.rotate_if_large(path, max_bytes=10)
    assert path.stat().st_size == 0 and (tmp_path / "r.log.1").exists()
    path.write_text("new 0\nnew 1\n")
    lines, offset = logs.tail_lines(path, 4)
    assert lines == ["old 8", "old 9", "new 0", "new 1"]
    assert offset == path.stat().st_size
    assert logs.tail_lines(path, 0) == ([], offset)
    assert logs.tail_lines(tmp_path / "missing.log", 5) == ([], 0)


def test_rotation_keeps_the_log_bounded(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    for _ in range(20):
        with path.open("a") as handle:
            handle.write("x" * 1000 + "\n")
        logs.rotate_if_large(path, max_bytes=4000)
    total = path.stat().st_size + (tmp_path / "r.log.1").stat().st_size
    assert total <= 2 * 4000 + 2002


def test_long_lines_and_bad_bytes_do_not_break_reading(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_bytes(b"\xff\xfe broken utf8\n" + b"y" * (logs.MAX_LINE_CHARS * 2) + b"\n")
    lines, _ = logs.tail_lines(path, 10)
    assert lines[0].endswith("broken utf8") and len(lines[1]) == logs.MAX_LINE_CHARS


async def test_follow_yields_new_complete_lines_and_survives_truncation(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_text("before\n")
    _, offset = logs.tail_lines(path, 1)
    got: list[str] = []

    async def reader() -> None:
        async for batch in logs.follow(path, offset):
            got.extend(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        with path.open("a") as handle:
            handle.write("one\ntw")
        await trio.sleep(0.5)
        assert got == ["one"]  # "tw" is not a complete line yet
        with path.open("a") as handle:
            handle.write("o\n")
        await trio.sleep(0.5)
        assert got == ["one", "two"]
        logs.rotate_if_large(path, max_bytes=1)
        with path.open("a") as handle:
            handle.write("after rotation\n")
        await trio.sleep(0.5)
        assert got[-1] == "after rotation"
        nursery.cancel_scope.cancel()


def test_lines_are_dated_by_the_notes_taken_as_the_log_grew(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_text("a1\na2\n")
    log_times.mark(path, 100.0)
    log_times.mark(path, 150.0)  # no growth: no note
    with path.open("a") as handle:
        handle.write("b1\nb2\n")
    log_times.mark(path, 200.0)
    with path.open("a") as handle:
        handle.write("c1\n")  # not noted yet: dated by the file's modification time
    os.utime(path, (300.0, 300.0))
    assert log_times.load(log_times.times_path(path)) == [(6, 100.0), (12, 200.0)]
    lines, end = logs.tail_dated(path, 10, None, now=400.0)
    assert lines == [(100.0, "a1"), (100.0, "a2"), (200.0, "b1"), (200.0, "b2"), (300.0, "c1")]
    assert end == 15
    assert logs.tail_dated(path, 10, since=150.0, now=400.0)[0] == [(200.0, "b1"), (200.0, "b2"), (300.0, "c1")]
    assert logs.tail_dated(path, 2, since=150.0, now=400.0)[0] == [(200.0, "b2"), (300.0, "c1")]
    assert logs.tail_dated(path, 10, since=350.0, now=400.0)[0] == []


def test_the_notes_rotate_with_the_log_and_date_the_rotated_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_text("old\n" * 10)
    log_times.mark(path, 100.0)
    assert logs.rotate_if_large(path, max_bytes=10)
    path.write_text("new\n")
    log_times.mark(path, 200.0)
    lines, _ = logs.tail_dated(path, 3, None, now=300.0)
    assert lines == [(100.0, "old"), (100.0, "old"), (200.0, "new")]
    assert logs.tail_dated(path, 3, since=150.0, now=300.0)[0] == [(200.0, "new")]


def test_a_note_taken_as_the_log_was_truncated_does_not_stop_later_ones(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_text("x" * 100 + "\n")
    log_times.mark(path, 100.0)
    path.write_text("y\n")  # truncated behind the notes' back
    log_times.mark(path, 200.0)
    assert log_times.load(log_times.times_path(path)) == [(2, 200.0)]
