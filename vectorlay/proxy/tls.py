"""TLS termination: a server context from a certificate and key file, reloadable in place.

`reload()` (on SIGHUP) reads the files again; new connections use the new certificate while
connections already open keep theirs. A reload that fails (a half-written file, a key that does
not match) keeps the old context and says why, so a bad renewal never takes the edge down.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import trio

from vectorlay.errors import UserError

log = logging.getLogger("vectorlay.proxy")


def load_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """UserError with one readable line if the files are missing or do not make a pair."""
    for path in (cert, key):
        if not path.is_file():
            raise UserError(f"TLS: cannot read {path}: no such file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError, ValueError) as error:
        raise UserError(f"TLS: cannot load certificate {cert} with key {key}: {error}") from None
    return context


class TlsTerminator:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = load_server_context(cert, key)

    def reload(self) -> bool:
        try:
            self.context = load_server_context(self.cert, self.key)
        except UserError as error:
            log.error("%s; keeping the certificate already loaded", error)
            return False
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def wrap(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        # The handshake happens on the first read, under the proxy's header deadline.
        return trio.SSLStream(stream, self.context, server_side=True, https_compatible=True)
