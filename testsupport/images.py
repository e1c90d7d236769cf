"""A tiny OCI image built locally from busybox-static: no registry needed.

It serves `/www` with busybox `httpd` on `$PORT` (8000 unless told), logs each request to stderr,
answers `/healthz`, and `/cgi-bin/env` shows its environment (so tests can see what a replica got).
`python -m testsupport.images [TAG] [--cli docker]` builds it; `examples/busybox-httpd` uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

DEFAULT_TAG = "localhost/vectorlay/busybox-httpd:test"
APPLETS = ("sh", "httpd", "env", "sort", "echo", "cat", "sleep", "ls", "id", "ps")

START = """#!/bin/sh
echo "busybox httpd on port ${PORT:-8000} (replica ${VECTORLAY_REPLICA:-none})"
exec httpd -f -v -p "${PORT:-8000}" -h /www
"""

ENV_CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
env | sort
"""


def find_busybox() -> Path | None:
    """busybox-static's binary; a dynamically linked busybox would not run in an empty image."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _is_static(path):
            return path
    return None


def _is_static(path: Path) -> bool:
    """An ELF file without a program interpreter (PT_INTERP) is statically linked."""
    data = path.read_bytes()[:64 * 1024]
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data and b"/lib/ld-" not in data


def rootfs_tar(busybox: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add(name: str, data: bytes = b"", mode: int = 0o644, kind: bytes = tarfile.REGTYPE,
                link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.type = kind
            info.linkname = link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for directory in ("bin", "www", "www/cgi-bin", "tmp", "etc"):
            add(directory, mode=0o1777 if directory == "tmp" else 0o755, kind=tarfile.DIRTYPE)
        add("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in APPLETS:
            add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        add("bin/start", START.encode(), 0o755)
        add("www/index.html", b"hello from vectorlay busybox httpd\n")
        add("www/healthz", b"ok\n")
        add("www/cgi-bin/env", ENV_CGI.encode(), 0o755)
        add("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        add("etc/group", b"root:x:0:\n")
    return buffer.getvalue()


def build_image(tag: str = DEFAULT_TAG, cli: str = "podman") -> str:
    """Import the image under `tag`; returns its id. An image already built from the same files
    is kept (so repeated test runs do not pile up old copies); an outdated one is replaced."""
    busybox = find_busybox()
    if busybox is None:
        raise RuntimeError("busybox-static is not installed (apt-get install busybox-static)")
    if shutil.which(cli) is None:
        raise RuntimeError(f"{cli} is not installed")
    tar = rootfs_tar(busybox)
    content = hashlib.sha256(tar).hexdigest()[:16]
    show = '{{.Id}} {{index .Config.Labels "vectorlay.rootfs"}}'
    existing = subprocess.run([cli, "image", "inspect", "--format", show, tag], capture_output=True, text=True,
                              timeout=60)
    old_id, _, old_content = existing.stdout.strip().partition(" ")
    if existing.returncode == 0 and old_content == content:
        return old_id if old_id.startswith("sha256:") else f"sha256:{old_id}"
    result = subprocess.run(
        [cli, "import", "--change", 'CMD ["/bin/start"]', "--change", "EXPOSE 8000",
         "--change", f"LABEL vectorlay.rootfs={content}", "-", tag],
        input=tar, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{cli} import failed: {result.stderr.decode(errors='replace').strip()}")
    if existing.returncode == 0 and old_id:
        subprocess.run([cli, "rmi", old_id], capture_output=True, timeout=60)  # fails harmlessly if in use
    return result.stdout.decode().strip().splitlines()[-1]


def container_prerequisites(oci_runtime: str = "runc") -> str | None:
    """Why real-container tests cannot run here (podman, the OCI runtime or busybox-static
    missing), or None when they can."""
    missing = [name for name in ("podman", oci_runtime) if shutil.which(name) is None]
    if find_busybox() is None:
        missing.append("busybox-static")
    if missing:
        return f"{', '.join(missing)} (scripts/system-deps installs them)"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the busybox httpd test image locally.")
    parser.add_argument("tag", nargs="?", default=DEFAULT_TAG)
    parser.add_argument("--cli", default="podman", help="podman or docker")
    options = parser.parse_args()
    print(build_image(options.tag, options.cli))


if __name__ == "__main__":
    main()
