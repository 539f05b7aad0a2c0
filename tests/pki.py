"""``make_pki``: a throwaway certificate authority and certificates for 127.0.0.1/localhost, as
PEM files, for tests of TLS and mutual TLS (the front ends, Redis over ``rediss://``)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey]
                 | None, *, is_ca: bool = False) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA and, signed by it, a server and a client certificate with their keys, written to
    ``folder``: {"ca.pem", "server.pem", "server.key", "client.pem", "client.key"} -> path."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("splitserve test CA", ca_key, None, is_ca=True)
    files = {"ca": ca}
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[name] = _certificate(name, key, (ca.subject, ca_key))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for name, certificate in files.items():
        (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return {p.stem + p.suffix: p for p in folder.iterdir() if p.suffix in (".pem", ".key")}
