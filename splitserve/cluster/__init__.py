"""Cluster-wide pieces: membership and shared state (Redis or embedded), placement, health."""

from splitserve.cluster.store import (
    WORKER_KINDS,
    MetadataStore,
    StoreConnectionError,
    WorkerInfo,
    WorkerKind,
    WorkerLoad,
    make_store,
)

__all__ = [
    "WORKER_KINDS",
    "MetadataStore",
    "StoreConnectionError",
    "WorkerInfo",
    "WorkerKind",
    "WorkerLoad",
    "make_store",
]
