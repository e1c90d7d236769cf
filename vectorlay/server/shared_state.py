"""Several servers on one database hold the same keys, or they cannot stand in for each other.

Every server of a control plane must have the same TLS CA (tokens carry its pin: a node, proxy or
CLI moving to a server with another CA would refuse it), the same `secrets.key` (secrets stored by
one must decrypt on the others) and the same tunnel CA (a node certified by one server must be
accepted by a proxy certified by another). They share them through the state dir: one shared
`--state-dir`, or a copy of the first server's. Each server records what it holds, as
fingerprints only, in the database; a server that starts with different keys while another is
running with the recorded ones is refused with what to copy. With no other server running, the
new keys are adopted (a CA or key replaced on purpose), with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from vectorlay.errors import UserError

log = logging.getLogger("vectorlay.server")

META_PREFIX = "shared."
# What each fingerprint stands for, and where it lives in the state dir.
WHAT = {
    "tls_ca": ("TLS CA", "tls/"),
    "secrets_key": ("secrets key", "secrets.key"),
    "tunnel_ca": ("tunnel CA", "tunnel-ca/"),
}


def fingerprint(material: bytes | str) -> str:
    """A short digest that identifies a key or certificate and reveals nothing of it."""
    data = material.encode() if isinstance(material, str) else material
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True)
class Decision:
    to_record: dict[str, str]  # meta key -> fingerprint to store
    replaced: tuple[str, ...]  # what changed since the last start (no other server running)


def decide(stored: dict[str, str], mine: dict[str, str], others_running: list[str], state_dir: Path) -> Decision:
    """Compare this server's fingerprints with the recorded ones. UserError if another server runs
    with different keys; otherwise what to record."""
    to_record: dict[str, str] = {}
    differing: list[str] = []
    for name in WHAT:
        if name not in mine:
            continue
        value = mine[name]
        recorded = stored.get(META_PREFIX + name)
        if recorded == value:
            continue
        to_record[META_PREFIX + name] = value
        if recorded is not None:
            differing.append(name)
    if differing and others_running:
        what = _listing([WHAT[name][0] for name in differing])
        files = _listing([WHAT[name][1] for name in differing])
        verb = "differs from that" if len(differing) == 1 else "differ from those"
        raise UserError(f"this server's {what} {verb} of the running servers of this database "
                        f"({', '.join(others_running)}): copy {files} from a running server's state dir into "
                        f"{state_dir}, or give every server the same --state-dir")
    return Decision(to_record, tuple(differing))


def _listing(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def log_replaced(replaced: tuple[str, ...]) -> None:
    for name in replaced:
        log.warning("the %s changed since this database last saw one; %s", WHAT[name][0],
                    "tokens issued before carry the old CA pin: issue new ones" if name == "tls_ca"
                    else "secrets stored before cannot be decrypted" if name == "secrets_key"
                    else "nodes and proxies get certificates from the new one as they reconnect")
