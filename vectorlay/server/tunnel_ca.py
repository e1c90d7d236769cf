"""The tunnel CA: certificates for the node-to-proxy tunnels, issued only by this server.

Made in the state dir on the first start (`STATE_DIR/tunnel-ca/`), always, even when the
server's own links are plain ws:// on loopback: tunnel bytes are encrypted and both ends
authenticated in every setup. A proxy or node sends a certificate request over its authenticated
link; the server writes the name it vouches for (the node id of that link, the proxy's id), never
one from the request. Node certificates are short-lived and renewed while the node stays
connected, so a node that is removed, or whose link is taken over, soon holds nothing that works.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from vectorlay.errors import ProtocolError
from vectorlay.tls import ensure_ca, issue_certificate, subject_name
from vectorlay.tunnel.identity import NODE, PROXY, proxy_hostname

NODE_CERT_VALID_S = 3600.0  # renewed at half-life while connected (see RENEW_AT)
PROXY_CERT_VALID_S = 7 * 86400.0
RENEW_AT = 0.5  # of a certificate's lifetime
# Certificates are valid from a day before they are issued: a home machine's clock may be far
# behind (no NTP), and a proxy certificate "not yet valid" would keep that node out.
BACKDATE_S = 86400.0


class TunnelCa:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key
        self.pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> TunnelCa:
        directory = state_dir / "tunnel-ca"
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        ensure_ca(cert_path, key_path, "vectorlay tunnel CA")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)

    @staticmethod
    def requested_key(csr_pem: str) -> ec.EllipticCurvePublicKey:
        """The public key of a certificate request, if its signature proves the sender holds the
        private key and the key is the kind we issue for (P-256); ProtocolError otherwise."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError:
            raise ProtocolError("the tunnel certificate request is not a PEM CSR") from None
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ProtocolError("the tunnel certificate request must be for a P-256 key")
        if not csr.is_signature_valid:
            raise ProtocolError("the tunnel certificate request has a bad signature")
        return key

    def issue_node(self, key: ec.EllipticCurvePublicKey, node_id: str, now: float) -> str:
        return self._issue(key, NODE, node_id, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, NODE_CERT_VALID_S)

    def issue_proxy(self, key: ec.EllipticCurvePublicKey, proxy_id: str, now: float) -> str:
        return self._issue(key, PROXY, proxy_id, [proxy_hostname(proxy_id)], ExtendedKeyUsageOID.SERVER_AUTH, now,
                           PROXY_CERT_VALID_S)

    def _issue(self, key: ec.EllipticCurvePublicKey, role: str, ident: str, names: list[str],
               usage: x509.ObjectIdentifier, now: float, valid_s: float) -> str:
        start = datetime.datetime.fromtimestamp(now - BACKDATE_S, datetime.UTC)
        end = datetime.datetime.fromtimestamp(now + valid_s, datetime.UTC)
        return issue_certificate(self.cert, self.key, key, subject_name(ident, role), names, usage, start, end)
