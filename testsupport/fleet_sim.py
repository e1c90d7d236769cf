"""Many simulated nodes in one process, speaking the real node protocol over real WebSockets.

Each simulated node is the real agent (`Agent` + `Supervisor`) with a `FakeRuntime`: it joins,
heartbeats, receives its desired state, and reports replicas starting and ready without running
anything. `bench/fleet.py` starts a few of these processes against a real server.

    python -m testsupport.fleet_sim --server ws://127.0.0.1:7070 --token JOIN_TOKEN \\
        --count 1250 --prefix sim-a- --state-dir /tmp/fleet-a

It prints progress lines (`joined N`, `connected N`) on stdout and reads commands on stdin:
`freeze` blackholes the first node's link (through a relay: it goes silent without closing),
`thaw` heals it.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
from pathlib import Path

import trio

from testsupport.processes import REPO_ROOT
from testsupport.relay import Relay
from vectorlay.core.model import Gpu
from vectorlay.node.agent import Agent, join
from vectorlay.node.state_dir import Credentials, NodeStateDir
from vectorlay.node.supervisor import NodeIdentity, Supervisor
from vectorlay.testing.fakes import FakeRuntime

JOIN_CONCURRENCY = 32
GPUS = [Gpu("declared-0", "RTX 4090", 24.0, 0)]


async def _start_node(nursery: trio.Nursery, index: int, args: argparse.Namespace, runtime: FakeRuntime,
                      server_url: str, limiter: trio.CapacityLimiter) -> Agent:
    name = f"{args.prefix}{index}"
    state_dir = Path(args.state_dir) / name
    files = NodeStateDir(state_dir)
    if files.is_joined():
        creds = files.load_credentials()
    else:
        async with limiter:
            creds = await join(server_url, args.token, name, GPUS, "127.0.0.1", ("process",), state_dir)
    creds = Credentials(server_url, creds.node_id, creds.name, creds.credential, creds.address)
    supervisor = Supervisor(runtime, state_dir, NodeIdentity(creds.node_id, creds.name, "127.0.0.1"),
                            on_report=lambda report: None, probe=runtime.probe)
    agent = Agent(creds, supervisor, GPUS, ("process",))
    supervisor.on_report = agent.on_report
    await supervisor.reattach()
    await nursery.start(supervisor.run)
    await nursery.start(agent.run)
    return agent


async def main(args: argparse.Namespace) -> None:
    runtime = FakeRuntime()
    limiter = trio.CapacityLimiter(JOIN_CONCURRENCY)
    relay = Relay(int(args.server.split(",")[0].rsplit(":", 1)[1]))  # to the first server of a list
    relay.start()
    agents: list[Agent] = []
    async with trio.open_nursery() as nursery:

        async def start(index: int) -> None:
            # The first node reaches the server through a relay, so it can be made to go silent.
            url = f"ws://127.0.0.1:{relay.port}" if index == 0 else args.server
            agents.append(await _start_node(nursery, index, args, runtime, url, limiter))
            if len(agents) % 250 == 0 or len(agents) == args.count:
                print(f"joined {len(agents)}", flush=True)

        async with trio.open_nursery() as starting:
            for index in range(args.count):
                starting.start_soon(start, index)
        nursery.start_soon(_report_connected, agents)
        nursery.start_soon(_commands, relay)


async def _report_connected(agents: list[Agent]) -> None:
    last = -1
    while True:
        connected = sum(1 for a in agents if a.connected)
        if connected != last:
            print(f"connected {connected}", flush=True)
            last = connected
        await trio.sleep(0.5)


async def _commands(relay: Relay) -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while True:
        data = await stdin.receive_some(4096)
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = line.decode().strip()
            if command == "freeze":
                relay.set_mode("blackhole")
            elif command == "thaw":
                relay.set_mode("pass")
            print(f"ok {command}", flush=True)


class SimProcess:
    """One fleet_sim process started from a test or benchmark, and the progress it printed."""

    def __init__(self, server_url: str, token: str, count: int, prefix: str, state_dir: Path, log: Path) -> None:
        self.count = count
        self.connected = 0
        self.joined = 0
        with log.open("wb") as errors:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "testsupport.fleet_sim", "--server", server_url, "--token", token,
                 "--count", str(count), "--prefix", prefix, "--state-dir", str(state_dir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, bufsize=1,
                cwd=REPO_ROOT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            kind, _, value = line.strip().partition(" ")
            if kind == "connected":
                self.connected = int(value)
            elif kind == "joined":
                self.joined = int(value)

    def command(self, text: str) -> None:
        """`freeze` or `thaw` the first node's link."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True, help="a node join token with enough uses")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    trio.run(main, args)


if __name__ == "__main__":
    cli()
