"""A throwaway PKI for TLS tests: a CA, a server certificate and client certificates.

Generated at test time with `cryptography` (nothing is checked in), EC P-256 keys so
generation takes milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertificatePair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate (PEM) that signed server and client
    server: CertificatePair  # for "localhost" and 127.0.0.1
    client: CertificatePair  # signed by `ca`
    other_ca: Path  # an unrelated CA
    stranger: CertificatePair  # a client certificate signed by `other_ca`


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key) -> CertificatePair:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CertificatePair(cert_path, key_path)


def _certificate(subject: str, public_key, issuer: str, issuer_key, *, ca: bool, usage=None, hosts=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names = [x509.DNSName(h) if not h[0].isdigit() else x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(directory: Path, stem: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(stem, key.public_key(), stem, key, ca=True)
    return _write(directory, stem, cert, key), cert, key


def _leaf(directory: Path, stem: str, ca_name: str, ca_key, usage, hosts=()) -> CertificatePair:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(stem, key.public_key(), ca_name, ca_key, ca=False, usage=usage, hosts=hosts)
    return _write(directory, stem, cert, key)


def make_test_pki(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca, _, ca_key = _ca(directory, "test-ca")
    other_ca, _, other_key = _ca(directory, "other-ca")
    server = _leaf(directory, "server", "test-ca", ca_key, ExtendedKeyUsageOID.SERVER_AUTH, ("localhost", "127.0.0.1"))
    client = _leaf(directory, "client", "test-ca", ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _leaf(directory, "stranger", "other-ca", other_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    return TlsFiles(ca=ca.cert, server=server, client=client, other_ca=other_ca.cert, stranger=stranger)
