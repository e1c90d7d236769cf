"""A replica that says which GPUs it can see, for `scripts/gpu-check`.

`GET /gpus` answers JSON: the `CUDA_VISIBLE_DEVICES` it was given and the UUIDs of the devices the
CUDA driver API enumerates for it (through libcuda, which honours `CUDA_VISIBLE_DEVICES`, unlike
NVML and nvidia-smi). Standard library only, so any `python3` runs it:

    python3 examples/gpu-probe/serve.py --port 12345
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def format_uuid(raw: bytes) -> str:
    """CUDA's 16 raw bytes in NVML's spelling: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def cuda_devices() -> dict[str, Any]:
    """The UUIDs of the devices CUDA shows this process, or why they cannot be read."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return {"cuda_devices": None, "cuda_error": f"no CUDA driver library: {error}"}
    status = cuda.cuInit(0)
    if status != 0:
        return {"cuda_devices": [], "cuda_error": f"cuInit failed with CUDA error {status}"}
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return {"cuda_devices": [], "cuda_error": "cuDeviceGetCount failed"}
    found = []
    get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid
    for ordinal in range(count.value):
        device = ctypes.c_int()
        raw = (ctypes.c_ubyte * 16)()
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0 or get_uuid(raw, device) != 0:
            return {"cuda_devices": found, "cuda_error": f"cannot read device {ordinal}"}
        found.append(format_uuid(bytes(raw)))
    return {"cuda_devices": found, "cuda_error": None}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            self._send(200, {"ok": True})
        elif self.path == "/gpus":
            self._send(200, {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "replica": os.environ.get("VECTORLAY_REPLICA"), **cuda_devices()})
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    options = parser.parse_args()
    server = ThreadingHTTPServer((options.host, options.port), Handler)
    print(f"gpu-probe listening on {options.host}:{options.port}; "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
