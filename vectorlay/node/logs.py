"""Replica log files: bounded on disk, read back as a tail and followed as they grow.

Workloads write straight into `<replica>.log` (opened with O_APPEND, so they keep writing at the
end whatever happens to the file). When it grows past its limit the agent copies it to
`<replica>.log.1` and truncates it in place, like logrotate's copytruncate: the workload never
needs to reopen anything, which is what lets it outlive the agent.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from vectorlay.node import log_times

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
FOLLOW_POLL_S = 0.2
MAX_LINES_PER_BATCH = 500
MAX_LINE_CHARS = 16 * 1024


def rotate_if_large(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Keep at most about 2 x max_bytes per replica: the live file and one rotated copy (and the
    notes on when their lines were written, see log_times)."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    shutil.copyfile(path, _rotated(path))
    notes = log_times.times_path(path)
    if notes.exists():
        notes.replace(log_times.times_path(_rotated(path)))  # they date the rotated copy's lines now
    os.truncate(path, 0)
    return True


async def note_log_times(log_of: Callable[[str], Path], replica_ids: Callable[[], list[str]]) -> None:
    """Every second, note how far each running replica's log has grown (see log_times)."""
    while True:
        await trio.sleep(log_times.MARK_INTERVAL_S)
        paths = [log_of(replica_id) for replica_id in replica_ids()]
        await trio.to_thread.run_sync(_mark_all, paths, time.time())


def _mark_all(paths: list[Path], now: float) -> None:
    for path in paths:
        try:
            log_times.mark(path, now)
        except OSError:
            pass  # a replica's log directory going away must not stop the others' notes


def _rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def tail_dated(path: Path, count: int, since: float | None, now: float) -> tuple[list[tuple[float, str]], int]:
    """The last `count` lines written at or after `since` (wall time; None: any), each with the time
    it was written (see log_times), from the rotated copy too if needed; and the offset after them."""
    lines, end, reached_start = _dated_from_end(path, count, since, now)
    if len(lines) < count and reached_start:
        older, _, _ = _dated_from_end(_rotated(path), count - len(lines), since, now)
        lines = older + lines
    return lines, end


def _dated_from_end(path: Path, count: int, since: float | None, now: float
                    ) -> tuple[list[tuple[float, str]], int, bool]:
    """Up to `count` dated lines from the end of `path`, none older than `since`; whether the search
    reached the file's start (so older lines may be in the rotated copy)."""
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            if count <= 0:
                return [], end, False
            dater = log_times.Dater(path, log_times.load(log_times.times_path(path)), now)
            position, newlines, data = end, 0, b""
            while position > 0 and newlines <= count:
                if since is not None and dater.time_of(position) < since and data:
                    break  # everything before here is older than `since`
                step = min(64 * 1024, position)
                position -= step
                handle.seek(position)
                chunk = handle.read(step)
                data = chunk + data
                newlines += chunk.count(b"\n")
    except FileNotFoundError:
        return [], 0, True
    pieces = data.split(b"\n")
    offset = position
    dated: list[tuple[float, str]] = []
    for index, piece in enumerate(pieces):
        offset += len(piece) + 1
        if index == 0 and position > 0:
            continue  # the end of a line that began before what was read
        if index == len(pieces) - 1 and not piece:
            break  # the file ends with a newline
        time = dater.time_of(min(offset, end))
        if since is None or time >= since:
            dated.append((time, piece[:MAX_LINE_CHARS * 4].decode("utf-8", errors="replace")[:MAX_LINE_CHARS]))
    return dated[-count:], end, position == 0


def _decode(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", errors="replace")
    return [line[:MAX_LINE_CHARS] for line in text.splitlines()]


def tail_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` lines (from the rotated copy too, if needed) and the offset after them."""
    dated, end = tail_dated(path, count, None, time.time())
    return [line for _, line in dated], end


def read_from(path: Path, offset: int, limit: int = 1024 * 1024) -> tuple[bytes, int]:
    """Bytes after `offset` (at most `limit`) and the new offset; from 0 if the file shrank."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return b"", 0
    if size < offset:
        offset = 0
    if size == offset:
        return b"", offset
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read(min(limit, size - offset))
    return data, offset + len(data)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _read_new(path: Path, offset: int, rotated_seen: tuple[int, int, int] | None
              ) -> tuple[bytes, int, tuple[int, int, int] | None]:
    """New bytes since the last look, across a rotation: when the rotated copy changed, the live
    file was truncated, so finish the old content from the copy and continue from the start."""
    rotated = path.with_name(path.name + ".1")
    signature = _signature(rotated)
    prefix = b""
    if signature != rotated_seen and signature is not None:
        prefix, _ = read_from(rotated, offset, limit=64 * 1024 * 1024)
        offset = 0
    data, offset = read_from(path, offset)
    return prefix + data, offset, signature


async def follow(path: Path, offset: int) -> AsyncIterator[list[str]]:
    """Yield batches of new complete lines appended after `offset`, forever (cancel to stop)."""
    pending = b""
    rotated_seen = await trio.to_thread.run_sync(_signature, path.with_name(path.name + ".1"))
    while True:
        data, offset, rotated_seen = await trio.to_thread.run_sync(_read_new, path, offset, rotated_seen)
        if data:
            pending += data
            complete, _, pending = pending.rpartition(b"\n")
            if complete:
                lines = _decode(complete)
                for start in range(0, len(lines), MAX_LINES_PER_BATCH):
                    yield lines[start:start + MAX_LINES_PER_BATCH]
                continue
        await trio.sleep(FOLLOW_POLL_S)
