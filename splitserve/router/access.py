"""Access to the front ends: API keys and TLS, the same for gRPC and HTTP (pure helpers).

A call may go through when the server has no keys, or when it presents one of them as
``Authorization: Bearer <key>`` (the HTTP header, or the gRPC metadata ``authorization``);
keys are compared in constant time. Health and liveness stay open (HTTP /health and /livez,
gRPC grpc.health.v1), so probes and load balancers need no secret. TLS material comes from
PEM files; a CA bundle makes it mutual (clients must present a certificate the CA signed).
Reading the files is the one thing here that touches the outside: a missing or unreadable
file is a ValueError naming it, raised when the server starts.
"""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path

from splitserve.config import AccessConfig

OPEN_HTTP_PATHS = frozenset({"/health", "/livez"})
OPEN_GRPC_SERVICES = frozenset({"grpc.health.v1.Health"})
UNAUTHENTICATED = "a valid API key is required: send it as 'Authorization: Bearer <key>'"


def is_authorized(api_keys: tuple[str, ...], authorization: str | None) -> bool:
    """Whether an ``authorization`` value ("Bearer <key>") carries one of ``api_keys`` (no keys:
    everyone is)."""
    if not api_keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    presented = token.strip().encode()
    matches = [hmac.compare_digest(presented, key.encode()) for key in api_keys]  # every key, whatever matches
    return any(matches)


def read_pem(path: str | None, what: str) -> bytes | None:
    """The bytes of a PEM file (None for None); ValueError naming it when it cannot be read."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path!r}: {e.strerror or e}") from None


def server_ssl_context(access: AccessConfig) -> ssl.SSLContext | None:
    """The HTTP server's TLS context (None without TLS); ValueError for files it cannot use."""
    if not access.tls:
        return None
    for path, what in ((access.ssl_certfile, "ssl_certfile"), (access.ssl_keyfile, "ssl_keyfile"),
                       (access.ssl_ca_certs, "ssl_ca_certs")):
        read_pem(path, what)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(access.ssl_certfile, access.ssl_keyfile)
        if access.ssl_ca_certs is not None:
            context.load_verify_locations(access.ssl_ca_certs)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as e:
        raise ValueError(f"cannot use the TLS files {access.ssl_certfile!r} / {access.ssl_keyfile!r}: {e}") from None
    return context
