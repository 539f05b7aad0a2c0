"""make_store: the MetadataStore backend for a configuration -- Redis when a URL is given,
else the embedded store (a Ray actor). Backends are imported only when chosen, so a process
that uses Redis never imports the embedded store's actor code, and the reverse."""

from __future__ import annotations

from splitserve.cluster.store import MetadataStore
from splitserve.config import StoreConfig


def make_store(config: StoreConfig) -> MetadataStore:
    """A Redis-backed store when ``config.redis_url`` is given, else the embedded (Ray actor)
    one; each call waits at most ``config.timeout_s``.

    ``config.prefix`` namespaces the state, so several deployments can share one Redis or Ray
    cluster.
    """
    if config.redis_url is None:
        from splitserve.cluster.embedded_store import EmbeddedStore

        return EmbeddedStore(prefix=config.prefix, timeout_s=config.timeout_s)
    from splitserve.cluster.redis_store import RedisStore

    return RedisStore(config.redis_url, prefix=config.prefix, timeout_s=config.timeout_s)
