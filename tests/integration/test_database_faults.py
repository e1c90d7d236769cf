"""The control plane outlives a bad minute of its database and converges after its own crash:
a fault relay between the server and the real PostgreSQL, SQLite on a full disk, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests_support import missing_service

from testsupport.load import SteadyClient
from testsupport.processes import Stack, replica_pids, tinylm_manifest, wait_for
from testsupport.relay import Relay

pytestmark = pytest.mark.slow

ECHO = tinylm_manifest("echo", replicas=2, gpu="{count: 0}")
OTHER = tinylm_manifest("other", replicas=1, gpu="{count: 0}")


def status(stack: Stack) -> subprocess.CompletedProcess[str]:
    return stack.cli("status", check=False, timeout_s=30)


def kill_one_replica(stack: Stack) -> None:
    """A replica process dies: its node restarts it and reports it (writes the server must keep)."""
    [replica, *_] = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "echo"]
    for pid in replica_pids(replica=replica["id"]):
        os.killpg(pid, signal.SIGKILL)


def test_a_postgres_outage_is_weather_and_the_server_catches_up(stack: Stack, postgres_url: str) -> None:
    with Relay(5432) as relay:
        relay.start()
        stack.db_url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        stack.start_server()
        for name in ("n1", "n2"):
            stack.join_node(name)
        _, proxy_port = stack.start_proxy()
        stack.cli("apply", "-", input_text=ECHO)

        with SteadyClient(proxy_port, "echo.localhost", rate_hz=10) as client:
            relay.set_mode("reject")  # the database refuses every connection
            kill_one_replica(stack)
            began = time.monotonic()
            refused = stack.cli("apply", "-", "--no-wait", input_text=OTHER, check=False, timeout_s=60)
            assert refused.returncode == 1
            assert "database unavailable" in refused.stderr and "nothing was changed" in refused.stderr
            assert time.monotonic() - began < 15  # an answer, not a hang
            report = status(stack)
            assert report.returncode == 1
            assert "database:  unavailable since" in report.stdout, report.stdout
            assert "traceback" not in (stack.server.log() if stack.server else "").lower()

            time.sleep(20)  # a long minute: nothing dies
            assert stack.server is not None and stack.server.alive
            relay.set_mode("pass")
            wait_for(lambda: status(stack).returncode == 0, 30, interval_s=1.0, message="the database to be back")
        assert client.samples and client.failures() == []  # the data plane never noticed

        stack.cli("apply", "-", input_text=OTHER)  # decisions are made again, no restart needed
        echo = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "echo"]
        assert len(echo) == 2 and {r["state"] for r in echo} == {"ready"}

        # Nothing was lost: a restarted server reads back what it knew.
        assert stack.server is not None
        stack.server.stop()
        stack.start_server()
        clusters = {c["name"]: c for c in stack.cli_json("get", "clusters")}
        assert clusters["echo"]["ready"] == 2 and clusters["other"]["ready"] == 1


def test_a_stalled_postgres_turns_into_fast_clear_errors(stack: Stack, postgres_url: str) -> None:
    with Relay(5432) as relay:
        relay.start()
        stack.db_url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        stack.start_server()
        stack.join_node("n1")
        stack.cli("apply", "-", input_text=ECHO)

        relay.set_mode("stall")  # bytes pile up, nothing answers
        try:
            began = time.monotonic()
            replicas = stack.cli_json("get", "replicas")  # served from memory
            assert len(replicas) == 2
            result = stack.cli("apply", "-", "--no-wait", input_text=OTHER, check=False, timeout_s=60)
            waited = time.monotonic() - began
            assert result.returncode == 1 and waited < 30, (waited, result.stderr)
            assert "timed out after 5s" in result.stderr
            in_doubt = "may or may not have been stored" in result.stderr
            assert in_doubt or "nothing was changed" in result.stderr
        finally:
            relay.set_mode("pass")
        wait_for(lambda: status(stack).returncode == 0, 40, interval_s=1.0, message="the database to be back")
        names = {c["name"] for c in stack.cli_json("get", "clusters")}
        assert in_doubt or "other" not in names  # "nothing was changed" must be true
        stack.cli("apply", "-", input_text=OTHER)  # and once more, exactly once
        assert [c["name"] for c in stack.cli_json("get", "clusters")].count("other") == 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs (root may mount one), unmounted afterwards.

    Large enough for the database and its write-ahead log to grow before the test fills it; the filler
    file is created up front, because once the disk is full not even an empty file can be made.
    """
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        missing_service(f"a tmpfs mount (needs root): {done.stderr.strip()}")
    try:
        (mount / "filler").touch()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"  # made by the small_disk fixture
    with filler.open("ab") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_sqlite_on_a_full_disk_keeps_serving_and_catches_up(small_disk: Path, tmp_path: Path) -> None:
    stack = Stack(tmp_path / "stack")
    stack.root.mkdir()
    (small_disk / "server").mkdir()
    (stack.root / "server").symlink_to(small_disk / "server")  # the server's state (SQLite) on the small disk
    try:
        stack.start_server()
        stack.join_node("n1")
        stack.cli("apply", "-", input_text=ECHO)
        filler = fill(small_disk)
        for _ in range(3):  # replicas churn: reports the server cannot store
            kill_one_replica(stack)
            time.sleep(2)
        def unavailable() -> subprocess.CompletedProcess[str] | None:
            report = status(stack)
            return report if report.returncode == 1 else None

        report = wait_for(unavailable, 30, interval_s=1.0, message="the full disk in `vectorlay status`")
        assert "database or disk is full" in report.stdout, report.stdout
        assert stack.server is not None and stack.server.alive
        filler.unlink()
        wait_for(lambda: status(stack).returncode == 0, 30, interval_s=1.0, message="the database to be back")
        stack.cli("apply", "-", input_text=OTHER)
        echo = [r for r in stack.cli_json("get", "replicas") if r["cluster"] == "echo"]
        assert {r["state"] for r in echo} == {"ready"} and len(echo) == 2
    finally:
        stack.close()


SCALED = tinylm_manifest("echo", replicas=2, gpu="{count: 0}")
FOUR = tinylm_manifest("echo", replicas=4, gpu="{count: 0}")
ROLLED = tinylm_manifest("echo", replicas=4, gpu="{count: 0}", extra_args=["--delay-ms", "1"])


@pytest.mark.parametrize(("operation", "delay_s"), [("roll", 0.5), ("roll", 2.0), ("scale-down", 0.5),
                                                    ("drain", 1.0)])
def test_a_server_killed_mid_operation_converges_after_restart(stack: Stack, operation: str, delay_s: float) -> None:
    """kill -9 of the server in the middle of a roll, a scale-down or a drain: once restarted, it
    finishes on its own: exactly the desired replicas, of the desired revision, no orphan process."""
    stack.start_server()
    nodes = [stack.join_node(name) for name in ("n1", "n2", "n3")]
    stack.cli("apply", "-", input_text=FOUR)
    if operation == "roll":
        stack.cli("apply", "-", "--no-wait", input_text=ROLLED)
        wanted, manifest = 4, ROLLED
    elif operation == "scale-down":
        stack.cli("apply", "-", "--no-wait", input_text=SCALED)
        wanted, manifest = 2, SCALED
    else:
        stack.cli("node", "drain", "n1", "--no-wait")
        wanted, manifest = 4, FOUR
    time.sleep(delay_s)
    assert stack.server is not None
    stack.server.kill()
    stack.start_server()

    applied = stack.cli("apply", "-", "--timeout", "90s", input_text=manifest)  # waits until it is so
    assert "cluster/echo unchanged" in applied.stdout and "cluster/echo ready" in applied.stdout

    def settled() -> list[dict[str, object]] | None:
        replicas = stack.cli_json("get", "replicas")
        live = [r for r in replicas if not r["stopping"]]
        return replicas if len(replicas) == wanted and all(r["state"] == "ready" for r in live) else None

    replicas = wait_for(settled, 60, interval_s=1.0, message=f"exactly {wanted} ready replicas")
    [cluster] = stack.cli_json("get", "clusters", "echo")
    assert cluster["ready"] == wanted and cluster["up_to_date"] == wanted
    assert len({r["revision"] for r in replicas}) == 1
    if operation == "drain":
        assert all(r["node"] != "n1" for r in replicas)
    running = {r["id"]: replica_pids(replica=str(r["id"])) for r in replicas}
    assert all(len(pids) == 1 for pids in running.values()), running
    owned = {pid for node in nodes for pid in replica_pids(node.node_id)}
    assert owned == {pid for pids in running.values() for pid in pids}  # nothing else runs: no orphan
