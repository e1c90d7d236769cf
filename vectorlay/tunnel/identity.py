"""Who is on each end of a tunnel: keys, certificate requests and TLS contexts for the tunnel CA.

The server owns a tunnel CA. A proxy and a node each make a key pair and send a certificate
request over their authenticated link to the server, which answers with a certificate naming
them: subject `O=vectorlay, OU=<role>, CN=<id>`; a proxy's also names `proxy_hostname(id)`, which
a node checks when it dials (so it reaches the proxy the server told it about), and the proxy
takes the node id from the node's certificate. Extended key usage keeps the roles apart: a
node's certificate is for TLS clients only, a proxy's for TLS servers only.

Both ends speak TLS 1.3 only (they are both vectorlay) and trust nothing but the tunnel CA.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NODE = "node"
PROXY = "proxy"
ALPN = "h2"
PROXY_DOMAIN = "proxies.vectorlay.internal"
PEER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    """ValueError if `pem` is not an EC private key."""
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def certificate_request(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    """A CSR for `key`; the server ignores the name in it and writes the one it vouches for."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def proxy_hostname(proxy_id: str) -> str:
    """The name a proxy's tunnel certificate carries and nodes verify when they dial it."""
    return f"{proxy_id}.{PROXY_DOMAIN}"


@dataclass(frozen=True)
class PeerName:
    role: str  # NODE or PROXY
    id: str


def peer_name(peercert: dict[str, Any] | None) -> PeerName | None:
    """The role and id in a verified peer certificate (`SSLObject.getpeercert()`), if it has both."""
    if not peercert:
        return None
    fields: dict[str, str] = {}
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            fields[key] = value
    role, ident = fields.get("organizationalUnitName"), fields.get("commonName")
    if fields.get("organizationName") != "vectorlay" or role not in (NODE, PROXY) or ident is None:
        return None
    if not PEER_ID.fullmatch(ident):
        return None
    return PeerName(role, ident)


def not_after(peercert: dict[str, Any] | None) -> float | None:
    """When a verified peer certificate expires (seconds since the epoch)."""
    if not peercert or "notAfter" not in peercert:
        return None
    return float(ssl.cert_time_to_seconds(peercert["notAfter"]))


def certificate_expiry(cert_pem: str) -> float:
    return x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc.timestamp()


def server_context(cert_pem: str, key: str, ca_pem: str) -> ssl.SSLContext:
    """The proxy's side: its certificate, and only clients with a certificate from the tunnel CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(context, cert_pem, key, ca_pem)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert_pem: str, key: str, ca_pem: str) -> ssl.SSLContext:
    """The node's side: its certificate, and a proxy certificate from the tunnel CA naming the
    proxy it dials (`server_hostname=proxy_hostname(id)`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(context, cert_pem, key, ca_pem)
    return context


def verify_only_context(ca_pem: str) -> ssl.SSLContext:
    """A client context with no certificate of its own: checks a proxy's certificate only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=ca_pem)
    context.set_alpn_protocols([ALPN])
    return context


def _common(context: ssl.SSLContext, cert_pem: str, key: str, ca_pem: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=ca_pem)
    context.set_alpn_protocols([ALPN])
    _load_chain(context, cert_pem, key)


def _load_chain(context: ssl.SSLContext, cert_pem: str, key: str) -> None:
    """ssl only loads a certificate and key from files: write them to a private directory, load
    them, and remove them at once."""
    directory = tempfile.mkdtemp(prefix="vectorlay-tunnel-")
    try:
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, text in ((cert_path, cert_pem), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
        context.load_cert_chain(cert_path, key_path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
