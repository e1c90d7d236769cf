"""Replica log files: bounded on disk, read back as a tail and followed as they grow.

Workloads write straight into `<replica>.log` (opened with O_APPEND, so they keep writing at the
end whatever happens to the file). When it grows past its limit the agent copies it to
`<replica>.log.1` and truncates it in place, like logrotate's copytruncate: the workload never
needs to reopen anything, which is what lets it outlive the agent.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import trio

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
FOLLOW_POLL_S = 0.2
MAX_LINES_PER_BATCH = 500
MAX_LINE_CHARS = 16 * 1024


def rotate_if_large(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Keep at most about 2 x max_bytes per replica: the live file and one rotated copy."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    shutil.copyfile(path, path.with_name(path.name + ".1"))
    os.truncate(path, 0)
    return True


def _decode(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", errors="replace")
    return [line[:MAX_LINE_CHARS] for line in text.splitlines()]


def tail_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` lines (from the rotated copy too, if needed) and the offset after them."""
    if count <= 0:
        try:
            return [], path.stat().st_size
        except FileNotFoundError:
            return [], 0
    chunks: list[bytes] = []
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            position = end
            lines_seen = 0
            while position > 0 and lines_seen <= count:
                step = min(64 * 1024, position)
                position -= step
                handle.seek(position)
                chunk = handle.read(step)
                chunks.insert(0, chunk)
                lines_seen += chunk.count(b"\n")
    except FileNotFoundError:
        return [], 0
    lines = _decode(b"".join(chunks))[-count:]
    if len(lines) < count:
        rotated = path.with_name(path.name + ".1")
        if rotated.exists():
            older, _ = tail_lines(rotated, count - len(lines))
            lines = older + lines
    return lines, end


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
