"""`scripts/gpu-check` and its probe replica, on whatever this machine has: with no NVIDIA GPU the
script says so and exits 2; with one, its whole check must pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

from vectorlay.node.supervisor import pick_free_port

REPO = Path(__file__).resolve().parents[2]


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_probe_serve", REPO / "examples" / "gpu-probe" / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_here() -> None:
    result = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=600)
    if "no NVIDIA GPU here" in result.stdout:
        assert result.returncode == 2
        assert result.stdout.splitlines()[0].startswith("no NVIDIA driver found") or "0 GPU(s)" in result.stdout
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "PASS  a process replica sees exactly its assigned GPU" in result.stdout


def test_the_gpu_inventory_runs_from_the_installed_package_outside_a_checkout(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vectorlay.node.gpu_check"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    if "no NVIDIA GPU here" in result.stdout:
        assert result.returncode == 2
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "  GPU 0: " in result.stdout
    assert "Traceback" not in result.stderr


def test_the_probe_replica_reports_what_cuda_shows_it() -> None:
    port = pick_free_port("127.0.0.1")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "GPU-1234", "VECTORLAY_REPLICA": "probe-1"}
    process = subprocess.Popen([sys.executable, str(REPO / "examples" / "gpu-probe" / "serve.py"), "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        answer = None
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/gpus", timeout=5) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.05)
        assert answer is not None
        assert (answer["cuda_visible_devices"], answer["replica"]) == ("GPU-1234", "probe-1")
        if answer["cuda_devices"] is None:  # no CUDA driver on this machine
            assert answer["cuda_error"].startswith("no CUDA driver library")
        else:  # with one, it honours CUDA_VISIBLE_DEVICES: no device is named GPU-1234
            assert answer["cuda_devices"] == []
    finally:
        process.terminate()
        process.wait(10)


def test_cuda_uuids_are_spelled_like_nvmls() -> None:
    raw = bytes.fromhex("8e1c4f2a0b3d4c5e9f60718293a4b5c6")
    assert load_probe().format_uuid(raw) == "GPU-8e1c4f2a-0b3d-4c5e-9f60-718293a4b5c6"


def test_the_gpu_check_manifests_are_valid() -> None:
    from testsupport.gpu_check import CONTAINER_MANIFEST, PROBE_MANIFEST
    from vectorlay.core.manifest import parse_manifest
    from vectorlay.core.model import Runtime

    (probe,) = parse_manifest(PROBE_MANIFEST)
    assert (probe.runtime, probe.gpu.count) == (Runtime.PROCESS, 1)
    (container,) = parse_manifest(CONTAINER_MANIFEST.format(image="localhost/vectorlay/busybox-httpd:test"))
    assert (container.runtime, container.gpu.count) == (Runtime.CONTAINER, 1)
    assert container.command[-1].endswith("exec /bin/start")
