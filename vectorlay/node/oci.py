"""OCI runtimes a container replica can run under, and the isolation level each one gives.

`container` = runc or crun (namespaces and cgroups), `sandbox` = gVisor's runsc (a user-space
kernel in front of the host's), `microvm` = Kata Containers (a lightweight VM per replica, needs KVM).
"""

from __future__ import annotations

from collections.abc import Iterable

from vectorlay.core.model import Isolation
from vectorlay.errors import UserError

# In order of preference within a level: runc first, because crun refuses hosts whose cgroups
# are in hybrid (v1 + v2) mode, where runc works.
OCI_RUNTIMES: dict[str, Isolation] = {
    "runc": Isolation.CONTAINER,
    "crun": Isolation.CONTAINER,
    "runsc": Isolation.SANDBOX,
    "kata": Isolation.MICROVM,
}

# The executable each one is found by (podman's own `--runtime NAME` looks for the same).
BINARIES: dict[str, str] = {"runc": "runc", "crun": "crun", "runsc": "runsc", "kata": "kata-runtime"}

# Flags for the OCI runtime itself (podman `--runtime-flag`). gVisor's own network stack is off
# (`--network=host` uses the network namespace podman made for the container), so podman's port
# publishing reaches the replica; with gVisor's netstack on, runsc refuses podman's network setup.
RUNTIME_FLAGS: dict[str, tuple[str, ...]] = {"runsc": ("network=host",)}

# The cgroup's pids limit (podman `--pids-limit`; its default is 2048). Under gVisor the limit
# counts the sandbox's own host threads and per-address-space stubs, not only the workload's
# processes: a busybox httpd answering 16 CGI requests at once (a fork each) used 1,900-3,300,
# and at 2048 gVisor itself fails ("error initializing first thread: resource temporarily
# unavailable") and the container dies with exit 2. Still a bound, against fork bombs.
PIDS_LIMITS: dict[str, int] = {"runsc": 32768}

# How to get each one, in one line, for `vectorlay node check`.
INSTALL_HINTS: dict[str, str] = {
    "runc": "apt-get install runc",
    "crun": "apt-get install crun",
    "runsc": "apt-get install runsc (gVisor)",
    "kata": "install Kata Containers 3 (kata-runtime) from its release tarball into /opt/kata and link "
            "/opt/kata/bin/kata-runtime into /usr/local/bin",
}


def parse_oci_runtimes(names: Iterable[str]) -> tuple[str, ...]:
    """`--oci-runtime` values, checked and de-duplicated in the order given."""
    chosen: list[str] = []
    for name in names:
        if name not in OCI_RUNTIMES:
            raise UserError(f"unknown --oci-runtime {name!r} (allowed: {', '.join(OCI_RUNTIMES)})")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def isolation_levels(runtimes: Iterable[str]) -> tuple[str, ...]:
    """The isolation levels a set of working OCI runtimes offers, in a stable order."""
    offered = {OCI_RUNTIMES[name] for name in runtimes}
    return tuple(level.value for level in Isolation if level in offered)


def runtime_for(isolation: Isolation, available: Iterable[str]) -> str | None:
    """The OCI runtime that gives `isolation`: the first of `available` (in preference order)."""
    for name in available:
        if OCI_RUNTIMES.get(name) is isolation:
            return name
    return None
