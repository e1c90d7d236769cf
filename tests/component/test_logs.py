"""Replica log files: tail across rotation, follow across truncation, bounded size."""

from __future__ import annotations

from pathlib import Path

import trio

from vectorlay.node import logs


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
