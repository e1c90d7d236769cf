"""The shipped example manifests stay valid."""

from pathlib import Path

from vectorlay.core.manifest import parse_manifest
from vectorlay.core.model import Runtime

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_tinylm_example_runs_on_the_process_runtime_without_a_gpu() -> None:
    (spec,) = parse_manifest((EXAMPLES / "tinylm.yaml").read_text())
    assert spec.name == "tinylm" and spec.replicas == 2
    assert spec.runtime is Runtime.PROCESS and spec.gpu.count == 0
    assert "${PORT}" in spec.command


def test_vllm_example_asks_for_a_real_gpu_and_a_container() -> None:
    (spec,) = parse_manifest((EXAMPLES / "vllm.yaml").read_text())
    assert spec.runtime is Runtime.CONTAINER and spec.image
    assert spec.gpu.count == 1 and spec.gpu.min_memory_gb == 20
