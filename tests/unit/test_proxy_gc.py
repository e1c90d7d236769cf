"""`vectorlay proxy` tunes the cyclic collector for serving; the tuning must keep collecting cycles."""

from __future__ import annotations

import gc
import weakref

from vectorlay.proxy.app import GC_YOUNG_THRESHOLD, tune_gc_for_serving


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_tuning_freezes_startup_objects_and_still_collects_new_cycles() -> None:
    saved = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, saved[1], saved[2])
        assert gc.get_freeze_count() > 0  # what existed before serving is out of the scans
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle made while serving: reference counting alone cannot free it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
