"""When each part of a replica's log was written, to within about a second.

Workloads write straight into their log file (so their output outlives the agent), and nothing
stamps their lines. To merge the logs of several replicas in time order and answer `--since
10m`, the agent notes every second how far each log has grown: a line of `<replica>.log.times`
says "the file had SIZE bytes at TIME" (wall time). A line then dates from the first note that
covers its end. The notes rotate with the log (see logs.rotate_if_large).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from pathlib import Path

MARK_INTERVAL_S = 1.0  # how precisely lines are dated; one stat() per replica per interval
MAX_MARKS_BYTES = 512 * 1024  # past this the notes are thinned to every other one (older lines get coarser)


def times_path(log: Path) -> Path:
    return log.with_name(log.name + ".times")


def mark(log: Path, now: float) -> None:
    """Note the log's size at `now`, if it grew since the last note (called every MARK_INTERVAL_S)."""
    try:
        size = log.stat().st_size
    except FileNotFoundError:
        return
    notes = times_path(log)
    marks = load(notes)
    if marks and size < marks[-1][0]:
        # Truncated by a rotation that these notes missed (a note raced it): they are stale.
        notes.unlink(missing_ok=True)
        marks = []
    if marks and marks[-1][0] == size:
        return  # no new output
    with notes.open("a") as handle:
        handle.write(f"{size} {now:.3f}\n")
    if notes.stat().st_size > MAX_MARKS_BYTES:
        _thin(notes, marks + [(size, now)])


def _thin(notes: Path, marks: list[tuple[int, float]]) -> None:
    kept = marks[::2] if marks[-1] in marks[::2] else [*marks[::2], marks[-1]]
    tmp = notes.with_name(notes.name + ".tmp")
    tmp.write_text("".join(f"{size} {time:.3f}\n" for size, time in kept))
    os.replace(tmp, notes)


def load(notes: Path) -> list[tuple[int, float]]:
    """(size, time) notes in file order; a torn last line is skipped."""
    try:
        text = notes.read_text()
    except FileNotFoundError:
        return []
    marks = []
    for line in text.splitlines():
        parts = line.split()
        try:
            marks.append((int(parts[0]), float(parts[1])))
        except (IndexError, ValueError):
            continue
    return marks


class Dater:
    """Dates lines of one log file by the byte offset where each ends."""

    def __init__(self, log: Path, marks: list[tuple[int, float]], now: float) -> None:
        self.sizes = [size for size, _ in marks]
        self.times = [time for _, time in marks]
        try:
            self.latest = log.stat().st_mtime  # for lines written after the last note
        except FileNotFoundError:
            self.latest = now

    def time_of(self, end: int) -> float:
        index = bisect.bisect_left(self.sizes, end)
        return self.times[index] if index < len(self.times) else self.latest


def dated_lines(log: Path, lines: Iterable[tuple[int, str]], now: float) -> list[tuple[float, str]]:
    """`lines` as (end offset, text) of `log`, each with the time it was written."""
    dater = Dater(log, load(times_path(log)), now)
    return [(dater.time_of(end), text) for end, text in lines]
