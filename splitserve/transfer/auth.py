"""KVAuth: the deployment's shared secret, proving that a KV peer belongs to the deployment.

A decode worker's KV receiver listens on the network; without this anyone who reaches its
port could write into reserved blocks or, on the collective backend, pose as the receiver and
take a prompt's KV. With a key, both backends tag every chunk's manifest (``tag_manifest``) and
the receiver refuses a chunk whose tag does not verify before anything reaches its sink; the
tag covers the manifest's CRC-32 of the payload, so it binds the payload too against anyone who
cannot see the traffic. The collective backend also authenticates its rendezvous both ways: the
sender's session id carries a tag (``tag_session``), the receiver builds no group for one that
does not verify or was seen before, and it answers with a tag of its own (``tag_acceptance``)
that the sender checks before it sends anything.

HMAC-SHA256 over short messages: the payload itself is not hashed (at ~1 GB/s that would cost
more than the transfer) and nothing is encrypted -- a peer that can read or rewrite the traffic
between workers is outside what a shared secret stops; keep that network private.

It knows keys and bytes only: not backends, sockets or where a key comes from.
"""

from __future__ import annotations

import hashlib
import hmac

from splitserve.config import MIN_KV_AUTH_KEY_BYTES as MIN_KEY_BYTES

TAG_BYTES = 16  # a truncated HMAC-SHA256: 128 bits to forge
_MANIFEST, _SESSION, _ACCEPTANCE = b"kv-manifest\0", b"kv-session\0", b"kv-acceptance\0"


class KVAuth:
    """Tags and checks with one shared key (at least ``MIN_KEY_BYTES``)."""

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a KV auth key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "KVAuth(<key>)"

    def tag_manifest(self, manifest_bytes: bytes) -> bytes:
        """The tag a chunk's manifest carries; ``manifest_bytes``: its wire form without a tag."""
        return self._tag(_MANIFEST, manifest_bytes)

    def tag_session(self, session: str) -> bytes:
        return self._tag(_SESSION, session.encode())

    def tag_acceptance(self, session: str) -> bytes:
        return self._tag(_ACCEPTANCE, session.encode())

    @staticmethod
    def matches(tag: bytes | None, expected: bytes) -> bool:
        return tag is not None and hmac.compare_digest(tag, expected)

    def _tag(self, purpose: bytes, message: bytes) -> bytes:
        return hmac.digest(self._key, purpose + message, hashlib.sha256)[:TAG_BYTES]


def kv_auth(key: bytes | None) -> KVAuth | None:
    """A KVAuth for ``key``, None for no key (peers are not authenticated)."""
    return None if key is None else KVAuth(key)
