"""What changes between two versions of a cluster, field by field, as `kubectl diff` and
`nomad job plan` show it: `spec.env.MAX_MODEL_LEN: 4096 → 8192`.

Paths use the manifest's own names (`reschedule_after`, not the model's `reschedule_after_s`),
values are shown as they would be written (durations as `30s`, memory as `512Mi`), and long
values are cut, so the lines fit a terminal and an audit record.
"""

from __future__ import annotations

import json
from typing import Any

from vectorlay.core.codec import dump
from vectorlay.core.durations import format_duration
from vectorlay.core.model import ClusterSpec

MAX_VALUE_CHARS = 60
NONE = "(none)"
# Model fields that the manifest names differently, or that are not part of the spec a user writes.
_RENAMED = {"memory_mb": "memory", "per_client_rate_limit": "rate_limit.per_client"}
_HIDDEN = frozenset({"name", "project"})


def spec_changes(old: ClusterSpec, new: ClusterSpec) -> list[str]:
    """One line per changed field, in a stable order; [] when nothing changed."""
    lines: list[str] = []
    _diff(dump(old), dump(new), "spec", lines)
    return lines


class _Missing:
    pass


_MISSING = _Missing()


def _diff(old: Any, new: Any, path: str, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if path == "spec" and key in _HIDDEN:
                continue
            name = _RENAMED.get(key, key[:-2] if key.endswith("_s") else key)
            _diff(old.get(key, _MISSING), new.get(key, _MISSING), f"{path}.{name}", lines)
    elif old != new:  # a value, or a whole section set or cleared (`health: null`)
        lines.append(f"{path}: {_show(path, old)} → {_show(path, new)}")


def _show(path: str, value: Any) -> str:
    if isinstance(value, _Missing) or value is None:
        return NONE
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float) and _is_duration(path):
        text = format_duration(float(value))
    elif isinstance(value, int) and path.endswith(".memory"):
        text = f"{value}Mi"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 3] + "..."


def _is_duration(path: str) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    return leaf in {"interval", "timeout", "startup_timeout", "unready_timeout", "reschedule_after"}
