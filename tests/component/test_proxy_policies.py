"""The proxy's pure policies: rate limits, retry budget, API keys, header rewriting, metrics text."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vectorlay.core.model import RateLimit
from vectorlay.proxy import headers as hdr
from vectorlay.proxy.auth import authorize
from vectorlay.proxy.limits import parse_size
from vectorlay.proxy.metrics import Metrics
from vectorlay.proxy.ratelimit import ClusterLimiter
from vectorlay.proxy.retries import RetryBudget

times = st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=60)


@settings(max_examples=200)
@given(rate=st.floats(0.1, 50), burst=st.integers(1, 20), gaps=times, clients=st.lists(st.sampled_from("abc"),
                                                                                       min_size=60, max_size=60))
def test_per_client_limit_never_grants_more_than_burst_plus_rate_times_elapsed(
        rate: float, burst: int, gaps: list[float], clients: list[str]) -> None:
    limiter = ClusterLimiter(None, RateLimit(rate, burst))
    now = 0.0
    granted = {c: 0 for c in "abc"}
    for gap, client in zip(gaps, clients, strict=False):
        now += gap
        wait = limiter.admit(client, now)
        if wait is None:
            granted[client] += 1
        else:
            assert wait > 0
    for count in granted.values():
        assert count <= burst + rate * now + 1e-6


def test_retry_after_says_when_the_next_request_will_pass() -> None:
    limiter = ClusterLimiter(RateLimit(2.0, 2), None)
    assert limiter.admit("x", 0.0) is None
    assert limiter.admit("y", 0.0) is None
    wait = limiter.admit("z", 0.0)
    assert wait == pytest.approx(0.5)
    assert limiter.admit("z", 0.49) is not None
    assert limiter.admit("z", 0.5) is None


def test_a_request_refused_by_the_cluster_limit_does_not_spend_its_clients_share() -> None:
    limiter = ClusterLimiter(RateLimit(1.0, 1), RateLimit(1.0, 2))
    assert limiter.admit("a", 0.0) is None
    assert limiter.admit("b", 0.0) is not None  # the cluster's one token is gone
    assert limiter.admit("b", 1.0) is None
    assert limiter.admit("b", 2.0) is None  # b still had its second token: the refusal took none


def test_the_client_table_is_bounded() -> None:
    limiter = ClusterLimiter(None, RateLimit(1.0, 1), max_clients=100)
    for i in range(1000):
        limiter.admit(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._clients) == 100


@given(ratio=st.floats(0.0, 1.0), floor=st.floats(0.0, 20.0),
       steps=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 5)), max_size=80))
def test_retries_stay_within_the_ratio_plus_the_floor(ratio: float, floor: float,
                                                      steps: list[tuple[float, int]]) -> None:
    budget = RetryBudget(ratio, floor, 0.0)
    now = 0.0
    requests = retries = 0
    for gap, wanted in steps:
        now += gap
        budget.on_request()
        requests += 1
        retries += sum(budget.try_retry(now) for _ in range(wanted))
    assert retries <= ratio * requests + max(1.0, floor) + floor * now + 1e-6


def test_a_dead_cluster_gets_a_fifth_more_attempts_not_three_times() -> None:
    budget = RetryBudget(0.2, 0.0, 0.0)
    attempts = 0
    for _ in range(1000):
        budget.on_request()
        attempts += 1
        for _ in range(2):  # each request would like two retries
            if not budget.try_retry(0.0):
                break
            attempts += 1
    assert attempts <= 1201


def test_api_keys() -> None:
    key = "vk-abc.secretsecretsecretsecret"
    hashes = frozenset({hashlib.sha256(key.encode()).hexdigest()})
    assert authorize("none", frozenset(), b"").allowed
    allowed = authorize("api-key", hashes, b"Bearer " + key.encode())
    assert allowed.allowed and allowed.key_hash in hashes
    assert authorize("api-key", hashes, b"bearer  " + key.encode() + b" ").allowed
    assert not authorize("api-key", hashes, b"").allowed
    assert not authorize("api-key", hashes, b"Basic " + key.encode()).allowed
    assert not authorize("api-key", hashes, b"Bearer other").allowed
    assert not authorize("api-key", hashes, b"Bearer " + b"x" * 10_000).allowed
    assert not authorize("oauth", hashes, b"Bearer " + key.encode()).allowed  # unknown mode: closed, not open


def test_upstream_headers() -> None:
    given_headers = [(b"host", b"h"), (b"connection", b"x-a, keep-alive"), (b"x-a", b"1"), (b"authorization", b"k"),
                     (b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2"), (b"upgrade", b"ws")]
    out = dict(hdr.upstream_request_headers(given_headers, b"9.9.9.9", b"https", b"rid", strip_authorization=True))
    assert out == {b"host": b"h", b"x-forwarded-for": b"1.1.1.1, 2.2.2.2, 9.9.9.9", b"x-forwarded-proto": b"https",
                   b"x-request-id": b"rid"}
    kept = dict(hdr.upstream_request_headers(given_headers, b"9.9.9.9", b"http", b"r", strip_authorization=False))
    assert kept[b"authorization"] == b"k"
    framing = [(b"host", b"h"), (b"content-length", b"5"), (b"transfer-encoding", b"chunked")]
    assert dict(hdr.upstream_request_headers(framing, b"9.9.9.9", b"http", b"r", False)).keys() == {
        b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"}  # framing is set anew


def test_response_headers_lose_hop_by_hop_ones_and_carry_our_request_id() -> None:
    given = [(b"content-type", b"text/plain"), (b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"),
             (b"keep-alive", b"timeout=5"), (b"transfer-encoding", b"chunked"), (b"x-request-id", b"theirs")]
    assert hdr.client_response_headers(given, b"ours") == [(b"content-type", b"text/plain"), (b"x-request-id", b"ours")]
    # One Connection header (no name repeated): plain keep-alive, and one that names another header.
    plain = [(b"content-length", b"2"), (b"connection", b"Keep-Alive")]
    assert hdr.client_response_headers(plain, b"r") == [(b"content-length", b"2"), (b"x-request-id", b"r")]
    naming = [(b"x-hop", b"1"), (b"connection", b"X-Hop"), (b"x-kept", b"2")]
    assert hdr.client_response_headers(naming, b"r") == [(b"x-kept", b"2"), (b"x-request-id", b"r")]
    # Two Connection headers: both are read.
    two = [(b"connection", b"x-a"), (b"x-a", b"1"), (b"connection", b"x-b"), (b"x-b", b"2"), (b"x-c", b"3")]
    assert hdr.client_response_headers(two, b"r") == [(b"x-c", b"3"), (b"x-request-id", b"r")]


def test_body_framing() -> None:
    buffered: list[tuple[bytes, bytes]] = []
    hdr.add_body_framing(buffered, 5, b"5", had_body=True)
    assert buffered == [(b"content-length", b"5")]
    none: list[tuple[bytes, bytes]] = []
    hdr.add_body_framing(none, 0, b"", had_body=False)
    assert none == []
    empty: list[tuple[bytes, bytes]] = []
    hdr.add_body_framing(empty, 0, b"", had_body=True)  # an empty chunked body: said explicitly
    assert empty == [(b"content-length", b"0")]
    declared: list[tuple[bytes, bytes]] = []
    hdr.add_body_framing(declared, None, b"5000000", had_body=True)
    assert declared == [(b"content-length", b"5000000")]
    streamed: list[tuple[bytes, bytes]] = []
    hdr.add_body_framing(streamed, None, b"", had_body=True)
    assert streamed == [(b"transfer-encoding", b"chunked")]


def test_request_ids() -> None:
    given = [(b"x-request-id", b"abc-1.2:3"), (b"x-request-id", b"second")]
    assert hdr.request_id(hdr.first_values(given)) == b"abc-1.2:3"  # the first one counts
    for bad in (b"", b"a b", b"x" * 200, b"<script>"):
        assert re.fullmatch(rb"[0-9a-f]{32}", hdr.request_id(hdr.first_values([(b"x-request-id", bad)])))
    assert re.fullmatch(rb"[0-9a-f]{32}", hdr.request_id({}))


def test_sizes() -> None:
    assert parse_size("16MiB") == 16 * 1024 * 1024
    assert parse_size("512k") == 512 * 1024
    assert parse_size("100") == 100
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")


def test_metrics_text_format() -> None:
    metrics = Metrics()
    cluster = metrics.clusters["echo"]
    cluster.observe(200, 0.003)
    cluster.observe(200, 0.2)
    cluster.observe(503, 7.0)
    cluster.retries = 2
    text = metrics.render().decode()
    assert 'vectorlay_proxy_requests_total{cluster="echo",code="200"} 2' in text
    assert 'vectorlay_proxy_requests_total{cluster="echo",code="503"} 1' in text
    assert 'vectorlay_proxy_retries_total{cluster="echo"} 2' in text
    buckets = [int(v) for v in re.findall(r'_bucket\{cluster="echo",le="[^"]+"\} (\d+)', text)]
    assert buckets == sorted(buckets) and buckets[0] == 1 and buckets[-1] == 3
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line
