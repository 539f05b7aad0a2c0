"""Prometheus metrics of one server: request latencies and outcomes, queue, KV blocks, speculation
and KV transfer.

``Metrics`` owns a CollectorRegistry of its own (never the process-wide one), so several servers
and tests coexist in one process. Front ends (gRPC, HTTP) wrap each ``Frontend.generate`` stream
in ``observe_stream``, which times TTFT, TPOT and end-to-end latency, counts tokens and speculation
from the ``GenerateDelta``s and the request's outcome; requests refused before their stream
starts are counted with ``count_error``. The router reports what only it sees through the plain
setters (``set_queue``, ``set_worker_blocks``, ``observe_transfer``, ``observe_k``). ``render`` is
the /metrics body. Names follow vLLM's, with a ``splitserve_`` prefix.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from splitserve.errors import CapacityError
from splitserve.protocol import GenerateDelta

__all__ = ["CONTENT_TYPE", "OUTCOMES", "Metrics", "observe_stream", "outcome_for_error"]

# The classic text format: every Prometheus version scrapes it, and our names need no escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# finished: the stream ended with stop/length; aborted: the client left or the server aborted it;
# invalid: ValueError (400); refused: CapacityError (429); failed: anything else (503/500).
OUTCOMES = ("finished", "aborted", "invalid", "refused", "failed")

# Buckets as vLLM's, so dashboards made for it read ours the same way.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)
_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)  # observed / predicted


def outcome_for_error(error: BaseException) -> str:
    """The outcome a request that ended with ``error`` counts as (see OUTCOMES)."""
    if isinstance(error, ValueError):
        return "invalid"
    if isinstance(error, CapacityError):
        return "refused"
    if not isinstance(error, Exception):
        return "aborted"  # GeneratorExit or CancelledError: closed early, the client (or a shutdown) left
    return "failed"  # ServingError and bugs alike


class Metrics:
    """The metrics of one server. clock: seconds, monotonic (tests pass a scripted one)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("splitserve_time_to_first_token_seconds", "Time to first token (front end view).",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("splitserve_time_per_output_token_seconds",
                              "Mean time per output token after the first, per finished request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_e2e_request_latency_seconds", "End-to-end latency of finished requests.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.requests = Counter("splitserve_requests_total", "Requests by outcome.", ["outcome"], registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens_total", "Prompt tokens of started requests.", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens_total", "Output tokens streamed.", registry=r)
        self.running = Gauge("splitserve_requests_running", "Requests running on the workers.", registry=r)
        self.waiting = Gauge("splitserve_requests_waiting", "Requests waiting for a worker.", registry=r)
        self.kv_blocks_used = Gauge("splitserve_kv_blocks_used", "KV blocks in use.", ["worker"], registry=r)
        self.kv_blocks_total = Gauge("splitserve_kv_blocks_total", "KV blocks in the pool.", ["worker"], registry=r)
        self.spec_draft_tokens = Counter("splitserve_spec_draft_tokens_total", "Draft tokens proposed.", registry=r)
        self.spec_accepted_tokens = Counter("splitserve_spec_accepted_tokens_total", "Draft tokens accepted.",
                                            registry=r)
        self.transfer_bytes = Counter("splitserve_kv_transfer_bytes_total", "KV bytes handed from prefill to decode.",
                                      registry=r)
        self.transfer_seconds = Histogram("splitserve_kv_transfer_seconds", "Duration of one request's KV handoff.",
                                          buckets=_TRANSFER_BUCKETS, registry=r)
        self.speculation_k = Histogram("splitserve_speculation_k", "Speculation length k chosen for a request.",
                                       buckets=_K_BUCKETS, registry=r)
        self.placements = Counter("splitserve_placements_total", "Requests placed, by where their prefill ran "
                                  "(remote: a prefill worker then a hand-off; local: on the decode worker).",
                                  ["placement"], registry=r)
        self.ttft_prediction = Histogram(
            "splitserve_ttft_prediction_ratio", "Observed over predicted time to first token, per placed request.",
            ["placement"], buckets=_RATIO_BUCKETS, registry=r)
        self.tpot_prediction = Histogram(
            "splitserve_tpot_prediction_ratio", "Observed over predicted time per output token, per placed request.",
            ["placement"], buckets=_RATIO_BUCKETS, registry=r)
        self.role_changes = Counter("splitserve_role_changes_total", "Workers moved to another pool, by the pool "
                                    "they joined.", ["role"], registry=r)
        self.pool_workers = Gauge("splitserve_pool_workers", "Live workers per pool (role).", ["role"], registry=r)
        self.migrations = Counter("splitserve_migrations_total", "Requests moved to another worker after the one "
                                  "running them died or could not be reached.", registry=r)
        self.lost_streams = Counter("splitserve_lost_streams_total", "Worker streams that stopped short though "
                                    "their worker lives (it no longer held the request); each request moved on.",
                                    registry=r)
        for outcome in OUTCOMES:  # present (at 0) from the first scrape
            self.requests.labels(outcome=outcome)
        for placement in ("remote", "local"):
            self.placements.labels(placement=placement)

    # ------------------------------------------------------------- what the router reports

    def set_queue(self, num_running: int, num_waiting: int) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)

    def set_worker_blocks(self, worker_id: str, num_used: int, num_total: int) -> None:
        self.kv_blocks_used.labels(worker=worker_id).set(num_used)
        self.kv_blocks_total.labels(worker=worker_id).set(num_total)

    def remove_worker(self, worker_id: str) -> None:
        """Drop a worker's series (it left), so its last numbers are not reported forever."""
        for gauge in (self.kv_blocks_used, self.kv_blocks_total):
            try:
                gauge.remove(worker_id)
            except KeyError:  # never reported
                pass

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        self.transfer_bytes.inc(num_bytes)
        self.transfer_seconds.observe(seconds)

    def observe_k(self, k: int) -> None:
        self.speculation_k.observe(k)

    def count_role_change(self, role: str) -> None:
        self.role_changes.labels(role=role).inc()

    def set_pools(self, sizes: dict[str, int]) -> None:
        for role, size in sizes.items():
            self.pool_workers.labels(role=role).set(size)

    def count_placement(self, placement: str) -> None:
        self.placements.labels(placement=placement).inc()

    def count_migration(self) -> None:
        self.migrations.inc()

    def count_lost_stream(self) -> None:
        self.lost_streams.inc()

    def observe_prediction(self, placement: str, ttft_ratio: float | None, tpot_ratio: float | None) -> None:
        """Observed over predicted TTFT and TPOT of a finished request (None: not measurable)."""
        if ttft_ratio is not None:
            self.ttft_prediction.labels(placement=placement).observe(ttft_ratio)
        if tpot_ratio is not None:
            self.tpot_prediction.labels(placement=placement).observe(tpot_ratio)

    # ------------------------------------------------------------ what front ends report

    def count_error(self, error: BaseException) -> None:
        """Count a request refused before its stream started (a bad wire request)."""
        self.requests.labels(outcome=outcome_for_error(error)).inc()

    def render(self) -> bytes:
        """The /metrics body, in the format CONTENT_TYPE names."""
        return generate_latest(self.registry)


def observe_stream(metrics: Metrics | None, stream: AsyncIterator[GenerateDelta]) -> AsyncIterator[GenerateDelta]:
    """``stream``, observed: the same deltas and errors, with latencies, tokens and the outcome
    recorded in ``metrics`` (None: ``stream`` itself). The clock starts now, so call it when the
    request arrives. Closing the result closes ``stream`` (which aborts the request)."""
    if metrics is None:
        return stream
    return _observed(metrics, stream, metrics.clock())


async def _observed(metrics: Metrics, stream: AsyncIterator[GenerateDelta], start: float):
    first_token_at: float | None = None
    last: GenerateDelta | None = None
    outcome = "aborted"  # a stream that ends without a finished delta was cut short
    try:
        async for delta in stream:
            now = metrics.clock()
            _count_tokens(metrics, last, delta)
            if first_token_at is None and delta.num_output_tokens > 0:
                first_token_at = now
                metrics.ttft.observe(now - start)
            if delta.finished:
                outcome = "aborted" if delta.finish_reason == "abort" else "finished"
                if outcome == "finished":
                    _observe_finished(metrics, start, first_token_at, now, delta.num_output_tokens)
            last = delta
            yield delta  # a close here after the finished delta still counts as finished
    except BaseException as error:
        if last is None or not last.finished:
            outcome = outcome_for_error(error)
        raise
    finally:
        metrics.requests.labels(outcome=outcome).inc()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _count_tokens(metrics: Metrics, last: GenerateDelta | None, delta: GenerateDelta) -> None:
    # Deltas carry running totals; count what this one added.
    if last is None:
        metrics.prompt_tokens.inc(delta.num_prompt_tokens)
    metrics.generation_tokens.inc(max(0, delta.num_output_tokens - (last.num_output_tokens if last else 0)))
    metrics.spec_draft_tokens.inc(max(0, delta.num_draft_tokens - (last.num_draft_tokens if last else 0)))
    metrics.spec_accepted_tokens.inc(max(0, delta.num_accepted_tokens - (last.num_accepted_tokens if last else 0)))


def _observe_finished(metrics: Metrics, start: float, first_token_at: float | None, now: float,
                      num_output_tokens: int) -> None:
    metrics.e2e.observe(now - start)
    if first_token_at is not None and num_output_tokens > 1:
        metrics.tpot.observe((now - first_token_at) / (num_output_tokens - 1))
