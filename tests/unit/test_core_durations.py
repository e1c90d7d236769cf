"""core.durations: what people write (500ms, 2s, 1m30s, 24h) to seconds and back."""

from __future__ import annotations

import math

import pytest
from core_strategies import CHEAP
from hypothesis import given
from hypothesis import strategies as st

from vectorlay.core.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m30s", 90.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("1h1m1s", 3661.0),
        ("1.5s", 1.5),
        ("0.25h", 900.0),
        ("  2s\n", 2.0),
        ("0", 0.0),
        ("3", 3.0),
        ("2.5", 2.5),
        (7, 7.0),
        (0.1, 0.1),
    ],
)
def test_parse_duration_accepts_the_documented_forms(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_returns_a_float_for_an_int() -> None:
    value = parse_duration(5)
    assert type(value) is float and value == 5.0


@pytest.mark.parametrize(
    "text",
    ["", "   ", "abc", "5x", "2s3", "s", "ms", "-1", "-1s", "1m 30s", "1.5.5s", "2S", "1 s", "s2", "2s!", "1,5s"],
)
def test_parse_duration_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5, True, False])
def test_parse_duration_rejects_negative_numbers_and_booleans(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", float("nan")])
def test_parse_duration_rejects_nan(value: str | float) -> None:
    # NaN is not a duration: every comparison with it is false, so a NaN timeout never fires
    # and `timeout > interval` style checks cannot catch it.
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (0.001, "1ms"), (0, "0ms"), (2, "2s"), (1.5, "1.5s"), (90, "1m30s"), (3600, "1h"),
     (3661, "1h1m1s"), (86400 + 60, "1d1m")],
)
def test_format_duration_examples(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@CHEAP
@given(st.integers(min_value=0, max_value=10**7))
def test_whole_seconds_round_trip_exactly(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@CHEAP
@given(st.integers(min_value=0, max_value=999))
def test_whole_milliseconds_round_trip(milliseconds: int) -> None:
    text = format_duration(milliseconds / 1000)
    assert text.endswith("ms")
    assert parse_duration(text) == pytest.approx(milliseconds / 1000, abs=1e-12)


@CHEAP
@given(st.floats(min_value=0, max_value=10**7, allow_nan=False))
def test_any_duration_round_trips_to_within_its_display_precision(seconds: float) -> None:
    back = parse_duration(format_duration(seconds))
    assert math.isfinite(back)
    if seconds < 1:
        assert back == pytest.approx(seconds, abs=0.0005 + 1e-12)
    elif seconds < 59.5:
        assert back == pytest.approx(seconds, rel=1e-5)
    else:
        assert abs(back - seconds) <= 0.5 + 1e-9


@CHEAP
@given(st.text(max_size=12))
def test_parse_duration_only_raises_value_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert isinstance(value, float)
    assert not value < 0
