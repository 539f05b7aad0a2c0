"""RedisStore: the MetadataStore contract in a Redis server, shared by every router and worker.

Needed when routers run as several replicas (on several machines). Keys, under ``<prefix>:``:

    worker:<id>        string, WorkerInfo as JSON; expires (PX) unless heart-beaten: the liveness
    workers            set of ids that may have state (registered, or wrote something)
    loads              hash  id -> WorkerLoad as JSON
    blocks:<id>        set of hex block hashes one worker holds
    prefix:<hex>       set of ids holding that block (the index match_prefix reads)
    model_names:<id>   set of model names one worker stored
    model:<name>       hash  id -> coefficients as JSON
    lease:<id>         string owner; SET NX PX

Only ``worker:<id>`` expires; reads filter the other entries by it, and a worker's leftovers
are deleted when it registers again, deregisters, or when ``list_workers`` finds it expired.
Those deletions WATCH the worker's keys, so they never race a concurrent registration.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from splitserve.cluster.store import (
    MetadataStore,
    StoreConnectionError,
    WorkerInfo,
    WorkerKind,
    WorkerLoad,
    check_coefficients,
    check_hashes,
    check_kind,
    check_report,
    check_ttl,
)
from splitserve.config import DEFAULT_STORE_PREFIX, check_name

_SCHEMES = ("redis", "rediss", "unix")

# Compare-and-delete / compare-and-expire: only the lease's owner may release or renew it.
_RELEASE_LEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW_LEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
# KEYS: prefix:<hex> for each hash of the chain, in order. Returns {id, count, id, count, ...}
# for the workers holding a leading run; stops at the first block nobody in the run holds.
_MATCH_PREFIX = """
local counts, run = {}, {}
for i, key in ipairs(KEYS) do
  local next_run, any = {}, false
  for _, id in ipairs(redis.call('SMEMBERS', key)) do
    if i == 1 or run[id] then next_run[id] = true; counts[id] = i; any = true end
  end
  if not any then break end
  run = next_run
end
local out = {}
for id, n in pairs(counts) do out[#out + 1] = id; out[#out + 1] = n end
return out
"""


def redact_url(url: str) -> str:
    """The URL with its password masked, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisStore(MetadataStore):
    """Client of one Redis server (``redis://``, ``rediss://`` or ``unix://`` URL).

    TLS and access control are the URL's, as redis-py reads it: ``rediss://`` with
    ``?ssl_ca_certs=PATH`` (and ``ssl_certfile``/``ssl_keyfile`` for a client certificate), an ACL
    user as ``rediss://USER:PASSWORD@host:port/0``; the user needs the keys ``~<prefix>:*``.
    Connects (and pings) on construction: ValueError for a malformed URL, StoreConnectionError
    naming the URL (never its password) when the server does not answer within
    ``connect_timeout_s``, refuses the credentials, or the user may not touch the prefix's keys. Every call
    after that gives up after ``timeout_s``: a server stopped, frozen or restarting raises
    StoreConnectionError from every contract method, it does not hang them.
    """

    def __init__(self, url: str, prefix: str = DEFAULT_STORE_PREFIX, connect_timeout_s: float = 2.0,
                 timeout_s: float = 1.0):
        check_name("prefix", prefix)
        check_ttl(connect_timeout_s, "connect_timeout_s")
        check_ttl(timeout_s, "timeout_s")
        self._check_url(url)
        self.url = redact_url(url)
        self._p = prefix
        try:
            self._redis = redis.Redis.from_url(
                url, decode_responses=True, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
                health_check_interval=30,
                retry=Retry(NoBackoff(), 0),  # no retry inside a call: its caller's next beat or read is the retry
            )
        except ValueError as exc:
            raise ValueError(f"malformed Redis URL {self.url!r}: {exc}") from exc
        try:
            self._redis.ping()
            self._redis.exists(self._key("workers"))  # an ACL user must be granted the prefix's keys
        except redis.exceptions.NoPermissionError as exc:
            self._redis.close()
            raise StoreConnectionError(f"Redis at {self.url} refuses this user the keys under {prefix!r} ({exc}); "
                                       f"grant it ~{prefix}:* and the commands it needs in the ACL") from exc
        except redis.RedisError as exc:
            self._redis.close()
            raise StoreConnectionError(f"cannot reach Redis at {self.url}: {exc}") from exc
        self._release_lease = self._redis.register_script(_RELEASE_LEASE)
        self._renew_lease = self._redis.register_script(_RENEW_LEASE)
        self._match_prefix = self._redis.register_script(_MATCH_PREFIX)

    # Membership

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        worker_id = info.worker_id

        def then(pipe: redis.client.Pipeline) -> None:
            pipe.set(self._key("worker", worker_id), json.dumps(asdict(info)), px=_ms(ttl_s))
            pipe.sadd(self._key("workers"), worker_id)

        self._purge(worker_id, only_if_expired=False, then=then)

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return bool(self._redis.pexpire(self._key("worker", worker_id), _ms(ttl_s)))

    def deregister_worker(self, worker_id: str) -> None:
        self._purge(worker_id, only_if_expired=False)

    def list_workers(self, kind: WorkerKind | None = None) -> list[WorkerInfo]:
        if kind is not None:
            check_kind(kind)
        ids = sorted(self._redis.smembers(self._key("workers")))
        infos = []
        for worker_id, raw in zip(ids, self._mget_workers(ids), strict=True):
            if raw is None:
                self._purge(worker_id, only_if_expired=True)
            else:
                infos.append(WorkerInfo(**json.loads(raw)))
        return [info for info in infos if kind is None or info.kind == kind]

    # Load

    def put_load(self, worker_id: str, load: WorkerLoad) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("loads"), worker_id, json.dumps(asdict(load)))
            pipe.sadd(self._key("workers"), worker_id)
            pipe.execute()

    def get_loads(self) -> dict[str, WorkerLoad]:
        raw = self._redis.hgetall(self._key("loads"))
        live = self._live(raw)
        return {worker_id: WorkerLoad(**json.loads(raw[worker_id])) for worker_id in sorted(live)}

    # Prefix-block index

    def add_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        check_hashes(block_hashes)
        if not block_hashes:
            return
        hexes = [h.hex() for h in block_hashes]
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self._key("blocks", worker_id), *hexes)
            for h in hexes:
                pipe.sadd(self._key("prefix", h), worker_id)
            pipe.sadd(self._key("workers"), worker_id)
            pipe.execute()

    def remove_prefix_blocks(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        check_hashes(block_hashes)
        if not block_hashes:
            return
        hexes = [h.hex() for h in block_hashes]
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._key("blocks", worker_id), *hexes)
            for h in hexes:
                pipe.srem(self._key("prefix", h), worker_id)
            pipe.execute()

    def match_prefix(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        check_hashes(block_hashes)
        if not block_hashes:
            return {}
        flat = self._match_prefix(keys=[self._key("prefix", h.hex()) for h in block_hashes])
        counts = {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}
        live = self._live(counts)
        return {worker_id: counts[worker_id] for worker_id in sorted(live)}

    # Latency models

    def put_model(self, worker_id: str, name: str, coefficients: Mapping[str, float]) -> None:
        check_name("model name", name)
        values = check_coefficients(coefficients)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("model", name), worker_id, json.dumps(values))
            pipe.sadd(self._key("model_names", worker_id), name)
            pipe.sadd(self._key("workers"), worker_id)
            pipe.execute()

    def report(self, worker_id: str, ttl_s: float, load: WorkerLoad,
               models: Mapping[str, Mapping[str, float]]) -> bool:
        checked = check_report(ttl_s, models)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.pexpire(self._key("worker", worker_id), _ms(ttl_s))
            pipe.hset(self._key("loads"), worker_id, json.dumps(asdict(load)))
            for name, values in checked.items():
                pipe.hset(self._key("model", name), worker_id, json.dumps(values))
            if checked:
                pipe.sadd(self._key("model_names", worker_id), *checked)
            pipe.sadd(self._key("workers"), worker_id)
            return bool(pipe.execute()[0])

    def get_models(self, name: str) -> dict[str, dict[str, float]]:
        check_name("model name", name)
        raw = self._redis.hgetall(self._key("model", name))
        return {worker_id: json.loads(raw[worker_id]) for worker_id in sorted(self._live(raw))}

    # Leases

    def acquire_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        check_name("lease_id", lease_id)
        check_name("owner", owner)
        check_ttl(ttl_s)
        return bool(self._redis.set(self._key("lease", lease_id), owner, nx=True, px=_ms(ttl_s)))

    def renew_lease(self, lease_id: str, owner: str, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return bool(self._renew_lease(keys=[self._key("lease", lease_id)], args=[owner, _ms(ttl_s)]))

    def release_lease(self, lease_id: str, owner: str) -> bool:
        return bool(self._release_lease(keys=[self._key("lease", lease_id)], args=[owner]))

    def close(self) -> None:
        self._redis.close()

    # Helpers

    def _key(self, *parts: str) -> str:
        return ":".join((self._p, *parts))

    def _mget_workers(self, ids: Sequence[str]) -> list[str | None]:
        return self._redis.mget([self._key("worker", w) for w in ids]) if ids else []

    def _live(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` whose membership has not expired (one MGET)."""
        ids = list(ids)
        return {w for w, raw in zip(ids, self._mget_workers(ids), strict=True) if raw is not None}

    def _purge(
        self, worker_id: str, only_if_expired: bool, then: Callable[[redis.client.Pipeline], None] | None = None
    ) -> None:
        """Delete a worker and its entries in one transaction, then run ``then`` in it too.

        With ``only_if_expired``, a worker that is live (registered again meanwhile) is kept.
        """
        worker_key = self._key("worker", worker_id)
        blocks_key = self._key("blocks", worker_id)
        names_key = self._key("model_names", worker_id)

        def transaction(pipe: redis.client.Pipeline) -> None:
            if only_if_expired and pipe.exists(worker_key):
                return
            hexes = pipe.smembers(blocks_key)
            names = pipe.smembers(names_key)
            pipe.multi()
            for h in hexes:
                pipe.srem(self._key("prefix", h), worker_id)
            for name in names:
                pipe.hdel(self._key("model", name), worker_id)
            pipe.hdel(self._key("loads"), worker_id)
            pipe.delete(worker_key, blocks_key, names_key)
            pipe.srem(self._key("workers"), worker_id)
            if then is not None:
                then(pipe)

        self._redis.transaction(transaction, worker_key, blocks_key, names_key)

    @staticmethod
    def _check_url(url: object) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"Redis URL must be a non-empty string such as redis://host:6379/0, got {url!r}")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ValueError(f"malformed Redis URL: {exc}") from exc
        if parts.scheme not in _SCHEMES:
            raise ValueError(
                f"malformed Redis URL {redact_url(url)!r}: the scheme must be one of "
                f"{', '.join(s + '://' for s in _SCHEMES)}"
            )
        try:
            parts.port  # noqa: B018 -- raises ValueError for a non-numeric or out-of-range port
        except ValueError as exc:
            raise ValueError(f"malformed Redis URL {redact_url(url)!r}: {exc}") from exc
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"malformed Redis URL {redact_url(url)!r}: no host name")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError(f"malformed Redis URL {redact_url(url)!r}: no socket path")


_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (a restart loading) is one


def _reached(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with a server that cannot be reached or does not answer in time raised as
    StoreConnectionError (a ServingError: UNAVAILABLE / 503 at the front ends) naming the URL."""

    @functools.wraps(method)
    def call(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except _UNREACHABLE as exc:
            raise StoreConnectionError(f"Redis at {self.url} did not answer: {exc}") from exc
        except redis.exceptions.NoPermissionError as exc:  # the ACL changed under a running deployment
            raise StoreConnectionError(f"Redis at {self.url} refused a call: {exc}") from exc

    return call


for _name in sorted((MetadataStore.__abstractmethods__ - {"close"}) | {"report", "snapshot"}):
    setattr(RedisStore, _name, _reached(getattr(RedisStore, _name)))
