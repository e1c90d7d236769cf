"""core.spec_diff: what changes between two versions of a cluster, field by field."""

from __future__ import annotations

from dataclasses import replace

from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.model import ClusterSpec, HealthCheck, Isolation, Resources
from vectorlay.core.spec_diff import MAX_VALUE_CHARS, spec_changes

BASE = ClusterSpec("chat", 2, image="vllm:1", env={"MAX_MODEL_LEN": "4096"})


def test_nothing_changed_is_no_lines() -> None:
    assert spec_changes(BASE, BASE) == []


def test_each_changed_field_is_one_line_in_the_manifests_own_words() -> None:
    new = replace(BASE, env={"MAX_MODEL_LEN": "8192", "LOG": "debug"}, health=HealthCheck(interval_s=5.0),
                  resources=Resources(memory_mb=4096), isolation=Isolation.SANDBOX, reschedule_after_s=60.0,
                  replicas=3)
    assert spec_changes(BASE, new) == [
        "spec.env.LOG: (none) → debug",
        "spec.env.MAX_MODEL_LEN: 4096 → 8192",
        "spec.health.interval: 2s → 5s",
        "spec.isolation: container → sandbox",
        "spec.replicas: 2 → 3",
        "spec.reschedule_after: 30s → 1m",
        "spec.resources.memory: (none) → 4096Mi",
    ]


def test_removed_keys_and_cleared_values_show_none() -> None:
    assert spec_changes(BASE, replace(BASE, env={})) == ["spec.env.MAX_MODEL_LEN: 4096 → (none)"]
    [cleared] = spec_changes(BASE, replace(BASE, health=None))
    assert cleared.startswith('spec.health: {"path":"/healthz",') and cleared.endswith(" → (none)")


@CHEAP
@given(st.text(max_size=500), st.text(max_size=500))
def test_lines_stay_short_whatever_the_values(a: str, b: str) -> None:
    lines = spec_changes(replace(BASE, image=a or "x"), replace(BASE, image=b or "y"))
    assert all(len(line) <= len("spec.image: ") + 2 * MAX_VALUE_CHARS + 3 for line in lines)
    assert (a or "x") == (b or "y") or len(lines) == 1
