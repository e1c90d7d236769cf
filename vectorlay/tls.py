"""TLS for every WebSocket link, with the server's CA pinned by the tokens it issues.

The server either uses its own CA (`--tls auto`: made in the state dir on first start) or a
certificate the operator gives it. Every token it issues carries the SHA-256 of the CA's public
key. A client holding such a token first fetches the CA certificate from `/v1/ca` (nothing secret
is sent), checks its hash against the pin, and only then opens the real, fully verified
connection on which the token travels; a server that cannot prove it holds that CA gets nothing.
This is kubeadm's discovery-token-ca-cert-hash, for every role.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vectorlay.errors import UserError
from vectorlay.files import write_private

CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 825


def public_key_pin(cert_pem: bytes) -> str:
    """SHA-256 (hex) of the certificate's SubjectPublicKeyInfo: what tokens carry."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@dataclass(frozen=True)
class ServerTls:
    cert_path: Path  # the server certificate, followed by its chain
    key_path: Path
    ca_pem: bytes  # the CA clients pin and verify against

    @property
    def pin(self) -> str:
        return public_key_pin(self.ca_pem)

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def _name(common_name: str) -> x509.Name:
    return subject_name(common_name)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def subject_name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vectorlay")]
    if unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def ensure_ca(cert_path: Path, key_path: Path, common_name: str) -> None:
    """Make a CA (key and self-signed certificate) at these paths unless it is already there."""
    if cert_path.exists():
        return
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())


def issue_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      public_key: ec.EllipticCurvePublicKey, subject: x509.Name, names: list[str],
                      usage: x509.ObjectIdentifier, not_before: datetime.datetime, not_after: datetime.datetime) -> str:
    """A leaf certificate (PEM) for `public_key`, signed by the CA, for one extended key usage."""
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def auto_tls(directory: Path, hosts: list[str]) -> ServerTls:
    """The server's own CA and certificate, made once in `directory` (`--tls auto`). The
    certificate is made again when the names it must cover change; the CA never is, so
    tokens already issued stay valid."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
    ensure_ca(ca_cert, ca_key, "vectorlay CA")
    names = sorted(set(hosts) | {"localhost", "127.0.0.1", "::1", socket.gethostname()})
    server_cert, server_key = directory / "server.pem", directory / "server.key"
    names_file = directory / "server.names"
    if not server_cert.exists() or not names_file.exists() or names_file.read_text().split() != names:
        _issue_server_cert(ca_cert, ca_key, server_cert, server_key, names)
        names_file.write_text(" ".join(names) + "\n")
    return ServerTls(server_cert, server_key, ca_cert.read_bytes())


def _issue_server_cert(ca_cert: Path, ca_key: Path, cert_path: Path, key_path: Path, names: list[str]) -> None:
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("vectorlay server")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(signer, hashes.SHA256()))
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    pem = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.read_bytes()
    write_private(cert_path, pem.decode())


def given_tls(cert: Path, key: Path, ca: Path | None) -> ServerTls:
    """An operator's certificate. The pin is the CA's (`--tls-ca`), else the certificate's own key."""
    for path in (cert, key, *( [ca] if ca else [])):
        if not path.is_file():
            raise UserError(f"{path}: no such file")
    ca_pem = ca.read_bytes() if ca else _first_cert(cert.read_bytes())
    try:
        public_key_pin(ca_pem)
        ServerTls(cert, key, ca_pem).context()
    except (ValueError, ssl.SSLError) as error:
        raise UserError(f"cannot use {cert} / {key}: {error}") from None
    return ServerTls(cert, key, ca_pem)


def _first_cert(pem: bytes) -> bytes:
    end = b"-----END CERTIFICATE-----"
    return pem[: pem.index(end) + len(end)] + b"\n" if end in pem else pem


def client_context(ca_pem: bytes | None) -> ssl.SSLContext:
    """Verify the server against exactly this CA (or the system's when none is pinned)."""
    context = ssl.create_default_context()
    if ca_pem is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def discovery_context() -> ssl.SSLContext:
    """For fetching the CA only: nothing is verified yet, and nothing secret is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
