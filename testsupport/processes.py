"""Run real `vectorlay` processes on loopback: a server, nodes and a proxy, like a user would.

Used by the integration tests and the benchmarks. Every process logs to a file under the
stack's directory; `Stack.close()` stops them all and kills the replicas their nodes started
(an agent that exits leaves its replicas running on purpose, which a test must not).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vectorlay.node.state_dir import NodeStateDir

T = TypeVar("T")

# The checkout this harness runs from: processes start there, so `python -m` finds its modules.
REPO_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
START_TIMEOUT_S = 20.0


def wait_for(predicate: Callable[[], T | None], timeout_s: float = 20.0, interval_s: float = 0.05,
             message: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; AssertionError after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {message} (last value: {last!r})")


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            return regex.search(self.log())

        return wait_for(found, timeout_s, message=f"{pattern!r} in the log of {self.name}")

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Signal the process and anything it runs in its group (a wrapper such as faketime and
        its child); replicas are in sessions of their own and are not touched."""
        if self.alive:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.alive:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.alive:
            self.signal(signal.SIGKILL)
            self.popen.wait()


@dataclass
class NodeProc(Proc):
    state_dir: Path = Path()

    @property
    def files(self) -> NodeStateDir:
        return NodeStateDir(self.state_dir)

    @property
    def node_id(self) -> str:
        return self.files.load_credentials().node_id


@dataclass
class Stack:
    """A server with nodes and proxies, each a real process, all under `root`."""

    root: Path
    db_url: str | None = None
    heartbeat: str = "1s"
    extra_server_args: Sequence[str] = ()
    server_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    server_port: int = 0
    admin_token: str = ""
    server: Proc | None = None
    tls: bool = False  # the server makes its own CA (--tls auto); every link is wss://, tokens pinned
    # More servers on the same PostgreSQL database and state dir (`start_another_server`).
    others: list[tuple[Proc, int]] = field(default_factory=list)
    listen_host: str = "127.0.0.1"  # where the server listens (the CLI always uses 127.0.0.1)

    @property
    def server_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.server_port}"

    @property
    def server_urls(self) -> str:
        """Every server started, as the comma list clients, nodes and proxies take."""
        scheme = "wss" if self.tls else "ws"
        return ",".join([self.server_url, *(f"{scheme}://127.0.0.1:{port}" for _, port in self.others)])

    def start_another_server(self) -> tuple[Proc, int]:
        """One more server of the same control plane (PostgreSQL: several may run)."""
        assert self.db_url is not None, "several servers need PostgreSQL"
        args = ["server", "--listen", "127.0.0.1:0", "--state-dir", str(self.root / "server"),
                "--heartbeat-interval", self.heartbeat, "--db", self.db_url, *self.extra_server_args]
        if self.tls:
            args += ["--tls", "auto"]
        proc = self._spawn(f"server-{len(self.others) + 2}", args, env=self.server_env)
        self.procs.append(proc)
        match = wait_for(lambda: re.search(r"listening on wss?://127\.0\.0\.1:(\d+)", proc.log()) if proc.alive
                         else _exited(proc), START_TIMEOUT_S, message="another server to listen")
        self.others.append((proc, int(match.group(1))))
        return proc, int(match.group(1))

    @property
    def ca_path(self) -> Path:
        return self.root / "server" / "tls" / "ca.pem"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VECTORLAY_CONFIG"] = str(self.root / "client-config.json")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("VECTORLAY_SERVER", None)
        env.pop("VECTORLAY_TOKEN", None)
        if self.server_port:
            env["VECTORLAY_SERVER"] = self.server_urls
            env["VECTORLAY_TOKEN"] = self.admin_token
        return env

    def _spawn(self, name: str, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
               prefix: Sequence[str] = ()) -> Proc:
        log_path = self.root / f"{name}.log"
        handle = log_path.open("ab")
        argv = [*prefix, sys.executable, "-m", "vectorlay", *args]
        popen = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**self.env(), **(env or {})},
                                 cwd=cwd or REPO_ROOT, start_new_session=True)
        handle.close()
        return Proc(name, argv, log_path, popen)

    def start_server(self, port: int | None = None, env: dict[str, str] | None = None) -> Proc:
        """Start (or restart, keeping the state dir and port) the server."""
        listen_port = self.server_port if port is None else port
        args = ["server", "--listen", f"{self.listen_host}:{listen_port}", "--state-dir", str(self.root / "server"),
                "--heartbeat-interval", self.heartbeat, *self.extra_server_args]
        if self.db_url:
            args += ["--db", self.db_url]
        if self.tls:
            args += ["--tls", "auto"]
        offset = len(self.server.log()) if self.server is not None else 0
        proc = self._spawn("server", args, env={**self.server_env, **(env or {})})
        self.procs.append(proc)
        regex = re.compile(rf"listening on wss?://{re.escape(self.listen_host)}:(\d+)")
        match = wait_for(lambda: regex.search(proc.log()[offset:]) if proc.alive else _exited(proc),
                         START_TIMEOUT_S, message="the server to listen")
        self.server_port = int(match.group(1))
        self.admin_token = (self.root / "server" / "admin.token").read_text().strip()
        self.server = proc
        return proc

    def cli_argv(self) -> list[str]:
        return [sys.executable, "-m", "vectorlay"]

    def cli(self, *args: str, check: bool = True, input_text: str | None = None,
            timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "vectorlay", *args], capture_output=True, text=True,
                                env=self.env(), cwd=REPO_ROOT, input=input_text, timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"vectorlay {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def token(self, role: str = "node", *extra: str) -> str:
        return self.cli("token", "create", "--role", role, *extra).stdout.strip()

    def join_node(self, name: str, gpus: Sequence[str] = (), extra: Sequence[str] = (), server_url: str | None = None,
                  prefix: Sequence[str] = (), env: dict[str, str] | None = None,
                  allow_process: bool = True, cwd: Path | None = None) -> NodeProc:
        """Join a node; it allows process replicas (what most tests deploy) unless told otherwise.
        `cwd`: the directory it is started from (default: the repository)."""
        state_dir = self.root / name
        url = server_url or self.server_urls
        args = ["node", "join", "--server", url, "--token", self.token("node"), "--name", name,
                "--state-dir", str(state_dir), *extra]
        if allow_process:
            args.append("--allow-process-runtime")
        for gpu in gpus:
            args += ["--gpu", gpu]
        proc = self._spawn(name, args, prefix=prefix, env=env, cwd=cwd)
        node = NodeProc(proc.name, proc.args, proc.log_path, proc.popen, state_dir=state_dir)
        self.procs.append(node)
        dialled = "|".join(re.escape(u) for u in url.split(","))  # with several servers: any of them
        node.wait_log(rf"connected to ({dialled}) as {name}")
        return node

    def start_node(self, name: str, *extra: str, env: dict[str, str] | None = None) -> NodeProc:
        """Run the agent from credentials already in `root/name` (written by a stand-in server such
        as `testsupport.node_server`, not by joining); wait until it has connected."""
        state_dir = self.root / name
        proc = self._spawn(name, ["node", "--state-dir", str(state_dir), *extra], env=env)
        node = NodeProc(proc.name, proc.args, proc.log_path, proc.popen, state_dir=state_dir)
        self.procs.append(node)
        node.wait_log(r"connected to \S+ as ")
        return node

    def restart_node(self, node: NodeProc, wait_connected: bool = True, extra: Sequence[str] = ()) -> NodeProc:
        """Run the agent again from its saved credentials and options (`vectorlay node --state-dir`)."""
        node.stop()
        offset = len(node.log())
        proc = self._spawn(node.name, ["node", "--state-dir", str(node.state_dir), *extra])
        fresh = NodeProc(proc.name, proc.args, proc.log_path, proc.popen, state_dir=node.state_dir)
        self.procs.append(fresh)
        if wait_connected:
            wait_for(lambda: "connected to" in fresh.log()[offset:], START_TIMEOUT_S,
                     message=f"{node.name} to reconnect")
        return fresh

    def start_proxy(self, *extra: str, server_url: str | None = None) -> tuple[Proc, int]:
        """A proxy accepting tunnels on a free loopback port (unless `extra` says otherwise), fed
        by any server of the control plane (or `server_url`'s)."""
        token = self.token("proxy", "--ttl", "0")
        tunnel = [] if any(arg.startswith("--tunnel-listen") for arg in extra) else ["--tunnel-listen", "127.0.0.1:0"]
        url = server_url or self.server_urls
        proc = self._spawn(f"proxy-{len(self.procs)}", ["proxy", "--server", url, "--token", token,
                                                        "--listen", "127.0.0.1:0", *tunnel, *extra])
        self.procs.append(proc)
        match = proc.wait_log(r"proxy listening on http://127\.0\.0\.1:(\d+)")
        return proc, int(match.group(1))

    def close(self) -> None:
        node_ids = []
        for proc in self.procs:
            if isinstance(proc, NodeProc):
                try:
                    node_ids.append(proc.node_id)
                except (OSError, ValueError, KeyError):
                    pass
        for proc in reversed(self.procs):
            proc.stop()
        for node_id in set(node_ids):
            for pid in replica_pids(node_id):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            remove_containers(node_id)


def container_ids(node_id: str | None = None, replica: str | None = None, running_only: bool = False) -> list[str]:
    """Ids of containers vectorlay nodes created (by their labels); [] where podman is missing."""
    import shutil

    if shutil.which("podman") is None:
        return []
    filters = ["--filter", f"label=vectorlay.node={node_id}" if node_id else "label=vectorlay.node"]
    if replica:
        filters += ["--filter", f"label=vectorlay.replica={replica}"]
    argv = ["podman", "ps", "--quiet", "--no-trunc", *filters, *([] if running_only else ["--all"])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return result.stdout.split()


def remove_containers(node_id: str) -> None:
    ids = container_ids(node_id)
    if ids:
        subprocess.run(["podman", "rm", "--force", "--time", "0", *ids], capture_output=True, timeout=120)


def _exited(proc: Proc) -> None:
    raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")


def replica_pids(node_id: str | None = None, replica: str | None = None) -> list[int]:
    """Pids of replica processes (session leaders) started by vectorlay nodes, found by their env."""
    found = []
    own_namespace = os.readlink("/proc/self/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if os.getpgid(int(entry.name)) != int(entry.name):
                continue
            if os.readlink(entry / "ns" / "pid") != own_namespace:
                continue  # inside a container: see container_ids
        except OSError:
            continue
        values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"VECTORLAY_REPLICA" not in values:
            continue
        if node_id is not None and values.get(b"VECTORLAY_NODE_ID") != node_id.encode():
            continue
        if replica is not None and values.get(b"VECTORLAY_REPLICA") != replica.encode():
            continue
        found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(port: int, host: str, path: str = "/", method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout_s: float = 10.0,
                 connection: http.client.HTTPConnection | None = None) -> HttpResult:
    """One request to 127.0.0.1:port with the given Host header (optionally on a kept-alive connection)."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return HttpResult(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        if connection is None:
            conn.close()


TINYLM_MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata:
  name: {name}
spec:
  replicas: {replicas}
  gpu: {gpu}
  runtime: process
  command: ["python3", "examples/tinylm/serve.py", "--port", "${{PORT}}"{extra_args}]
  port: 8000
  health: {{path: /healthz, interval: 500ms, timeout: 400ms}}
  reschedule_after: {reschedule_after}
"""


UPSTREAM_MANIFEST = """\
apiVersion: vectorlay.dev/v1
kind: Cluster
metadata:
  name: {name}
spec:
  replicas: {replicas}
  runtime: process
  command: [{python}, "-m", "testsupport.upstreams", "--port", "${{PORT}}", "--host", "{host}",
            "--name", "${{VECTORLAY_REPLICA}}"]
  port: 8000
  health: {{path: /healthz, interval: 500ms, timeout: 400ms}}
"""


def upstream_manifest(name: str = "up", replicas: int = 1, host: str = "${VECTORLAY_HOST}") -> str:
    """A cluster of scripted replicas (`testsupport.upstreams`): echoes with the request's
    body size, `/stream` (SSE), `/bytes?n=N` (a large body)."""
    return UPSTREAM_MANIFEST.format(name=name, replicas=replicas, python=json.dumps(sys.executable), host=host)


def tinylm_manifest(name: str = "echo", replicas: int = 2, gpu: str = '{type: "RTX 4090", count: 1}',
                    reschedule_after: str = "30s", extra_args: Sequence[str] = ()) -> str:
    extra = "".join(f', "{a}"' for a in extra_args)
    return TINYLM_MANIFEST.format(name=name, replicas=replicas, gpu=gpu, reschedule_after=reschedule_after,
                                  extra_args=extra)


def faketime_available() -> bool:
    import shutil

    return shutil.which("faketime") is not None
