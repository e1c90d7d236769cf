"""core.launch_inputs: what the OS can take as an argument, an environment entry or a path; and the
node's own check of an assignment before it launches it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from core_strategies import CHEAP
from hypothesis import example, given
from hypothesis import strategies as st

from vectorlay.core.launch_inputs import (
    MAX_ARG_BYTES,
    argument_problem,
    encoding_problem,
    env_problem,
    launch_problem,
    path_problem,
    secret_value_problem,
)
from vectorlay.core.model import Assignment, ClusterSpec, HealthCheck, Runtime

SPEC = ClusterSpec("web", 1, runtime=Runtime.PROCESS, command=("python3", "serve.py", "--port", "${PORT}"),
                   env={"MODEL": "tiny"}, workdir="/srv", health=HealthCheck(path="/healthz?full=1"))
GOOD = Assignment("web-abcde", "web", 3, SPEC, gpus=("GPU-1234",), secret_env={"HF_TOKEN": "hf_x"})


@CHEAP
@given(st.text())
@example("a\x00b")
@example("\ud800")
@example("\udcff")  # what surrogateescape makes of a byte that is not UTF-8: still not encodable
@example("é\n\t")
def test_an_encoding_problem_is_exactly_what_utf8_or_c_strings_cannot_hold(text: str) -> None:
    try:
        encoded: bytes | None = text.encode("utf-8")
    except UnicodeEncodeError:
        encoded = None
    can_pass = encoded is not None and b"\x00" not in encoded
    assert (encoding_problem(text) is None) is can_pass


@CHEAP
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=8),
       st.integers(min_value=MAX_ARG_BYTES // 4 - 4, max_value=MAX_ARG_BYTES + 4))
def test_the_argument_limit_counts_utf8_bytes(chunk: str, size: int) -> None:
    text = ("é" * size)[: size // 2] + chunk  # two bytes a character, then whatever follows
    fits = len(text.encode("utf-8")) <= MAX_ARG_BYTES
    assert (argument_problem(text) is None) is fits


def test_a_good_assignment_can_be_launched() -> None:
    assert launch_problem(GOOD) is None


@pytest.mark.parametrize(
    ("assignment", "words"),
    [
        (replace(GOOD, spec=replace(SPEC, command=("sh", "-c", "sleep 100 # \x00"))),
         "spec.command[2]: contains a NUL byte"),
        (replace(GOOD, spec=replace(SPEC, env={"A": "x\x00"})), "spec.env.A: contains a NUL byte"),
        (replace(GOOD, spec=replace(SPEC, env={"A=B": "x"})), "spec.env.<invalid name>: 'A=B' is not a valid"),
        (replace(GOOD, spec=replace(SPEC, env={"A\x00": "x"})), "'A\\x00' is not a valid environment"),
        (replace(GOOD, secret_env={"HF_TOKEN": "hf\x00"}), "spec.env_from_secret.HF_TOKEN: contains a NUL byte"),
        (replace(GOOD, secret_env={"HF_TOKEN": "\ud800"}), "HF_TOKEN: contains U+D800, a lone surrogate"),
        (replace(GOOD, spec=replace(SPEC, workdir="/srv\x00")), "spec.workdir: contains a NUL byte"),
        (replace(GOOD, spec=replace(SPEC, workdir="/" + "a" * 300)), "spec.workdir: has a component longer"),
        (replace(GOOD, spec=replace(SPEC, image="busybox\x1b[31m")), "spec.image: 'busybox\\x1b[31m' is not"),
        (replace(GOOD, spec=replace(SPEC, health=HealthCheck(path="/a b"))), "spec.health.path: '/a b' is not"),
        (replace(GOOD, spec=replace(SPEC, health=HealthCheck(path="/\udc80"))), "spec.health.path: contains U+DC80"),
        (replace(GOOD, spec=replace(SPEC, command=("x" * (MAX_ARG_BYTES + 1),))), "spec.command[0]: is longer"),
        (replace(GOOD, replica_id="../../etc/cron.d/x"), "replica id '../../etc/cron.d/x' is not a valid file name"),
        (replace(GOOD, replica_id=""), "replica id '' is not a valid file name"),
        (replace(GOOD, replica_id="web-\x00"), "replica id 'web-\\x00' is not a valid file name"),
        (replace(GOOD, gpus=("GPU-\x00",)), "gpus[0]: contains a NUL byte"),
        (replace(GOOD, cluster="web\ud800"), "cluster: contains U+D800"),
    ],
)
def test_what_cannot_be_launched_is_named_by_field(assignment: Assignment, words: str) -> None:
    problem = launch_problem(assignment)
    assert problem is not None and words in problem
    # The reason travels to the server and into its database: it never carries what broke it.
    assert encoding_problem(problem) is None and len(problem) < 300


@pytest.mark.parametrize(
    ("check", "ok", "bad"),
    [
        (argument_problem, "echo a\nb\t$PORT", "a\x00"),
        (lambda v: env_problem("PEM", v), "-----BEGIN-----\nMII\n", "\udcff"),
        (path_problem, "/srv/models/llama 3", "/srv\x00/x"),
        (secret_value_problem, "hf_abc\n", "hf\x00"),
    ],
)
def test_each_check_takes_what_a_process_can_take(check: Callable[[str], str | None], ok: str, bad: str) -> None:
    assert check(ok) is None
    assert check(bad) is not None
