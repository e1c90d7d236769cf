"""Fakes for code that drives a node without containers or GPUs: a replica runtime (`fakes.py`)
and NVML (`fake_nvml.py`). The repository's test harness lives in `testsupport/`, outside the package."""
