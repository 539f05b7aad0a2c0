"""make_store: the MetadataStore backend for a configuration -- Redis when a URL is given,
else the embedded store (a Ray actor). Backends are imported only when chosen, so a process
that uses Redis never imports the embedded store's actor code, and the reverse."""

from __future__ import annotations

from splitserve.cluster.store import MetadataStore
from splitserve.config import DEFAULT_STORE_PREFIX


def make_store(redis_url: str | None, prefix: str = DEFAULT_STORE_PREFIX) -> MetadataStore:
    """A Redis-backed store when ``redis_url`` is given, else the embedded (Ray actor) one.

    ``prefix`` namespaces the state, so several deployments can share one Redis or Ray cluster.
    """
    if redis_url is None:
        from splitserve.cluster.embedded_store import EmbeddedStore

        return EmbeddedStore(prefix=prefix)
    from splitserve.cluster.redis_store import RedisStore

    return RedisStore(redis_url, prefix=prefix)
