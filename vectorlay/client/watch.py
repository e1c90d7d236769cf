"""`get -w`: what changed between two listings, with no I/O.

The watch polls the API (one `get` a second on one link: WATCH_INTERVAL_S) rather than asking the
server to push: every server already answers `get`, whichever one holds the cluster's news, and
a second of delay is what a person watching a table notices least. Two listings are compared
row by row on what the row means, not on what ticks by itself: a node's "last seen 0.4s ago" or
a crash loop's "next try in 40s" change every second and would reprint the table forever.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vectorlay.core import codec
from vectorlay.core.api_views import ClusterView, NodeView

WATCH_INTERVAL_S = 1.0
# Fields that move with the clock alone (see the docstring), per JSON path.
_VOLATILE = frozenset({"last_seen_s", "seen_s_ago", "next_try_in_s"})


def identity(item: Any) -> str:
    """The row's key, as a user names it: a cluster's key, a node's name, a replica's or server's id."""
    if isinstance(item, ClusterView):
        return item.key
    if isinstance(item, NodeView):
        return item.name
    return str(item.id)


def stable_form(item: Any) -> str:
    """The row as JSON without the fields that tick by themselves: equal when nothing changed."""
    return json.dumps(_without_volatile(codec.dump(item)), sort_keys=True)


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


@dataclass(frozen=True)
class Changes:
    changed: tuple[Any, ...]  # new rows and rows that changed, in listing order
    removed: tuple[str, ...]  # identities of rows that are gone, in their old order

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed)


class Differ:
    """Remembers the last listing; `update` says what changed since."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def update(self, items: Sequence[Any]) -> Changes:
        current = {identity(item): stable_form(item) for item in items}
        changed = tuple(item for item in items if self._seen.get(identity(item)) != current[identity(item)])
        removed = tuple(key for key in self._seen if key not in current)
        self._seen = current
        return Changes(changed, removed)
