"""Runs a load test: sends a workload's requests on an arrival schedule and records each one.

``run`` is one run at one rate, with no files: an open loop sends each request at its offset
from the start, never waiting on earlier ones (a client that falls behind sends late, and the
record keeps both ``scheduled_s`` and ``sent_s``); a closed loop (``concurrency:N``) keeps N
requests in flight. A run ends by itself: after the last request, or ``duration_s`` after the
start it sends nothing more and gives those in flight ``drain_s`` before cancelling them;
every request also has its own deadline, ``timeout_s``.

``run_and_save`` scores a run (``metrics.summarize``) and writes it to a folder; ``sweep`` runs
a list of rates and ``search`` looks for the goodput (double the rate until attainment drops
below 90%, then bisect), each rate in its own folder ``rate-<r>`` beside ``sweep.json``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from splitserve.loadtest.arrivals import Arrival
from splitserve.loadtest.clients import Client, RequestFailed
from splitserve.loadtest.metrics import GOODPUT_ATTAINMENT, SLO, summarize, sweep_summary
from splitserve.loadtest.records import RequestRecord, RequestSpec, write_jsonl

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_DRAIN_S = 30.0
MAX_DOUBLINGS = 10       # search: rates tried above (or below) the start before giving up on a bracket


@dataclass
class RunResult:
    """The records of one run (the requests sent, by index) and its timing."""

    records: list[RequestRecord]
    started: float              # wall-clock time (time.time()) of the start
    duration_s: float           # from the start until the last request ended
    target_rate: float | None   # requests/s asked for; None for a closed loop

    @property
    def max_lag_s(self) -> float:
        """How far behind its schedule the client sent a request, at worst."""
        return max((r.sent_s - r.scheduled_s for r in self.records), default=0.0)


class RunProgress:
    """A live progress display on the terminal (rich): a line per run with the requests done
    of those to send, how many were sent, ok/refused/failed and the running SLO attainment.

    is_good says whether a finished record met the SLO. Use as a context manager around the
    runs; ``run`` calls ``begin``, ``sent`` and ``done``.
    """

    def __init__(self, is_good: Callable[[RequestRecord], bool], console: Console | None = None):
        self._is_good = is_good
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=console)
        self._task = self._progress.add_task("", visible=False, counts="")
        self._counts = {"sent": 0, "ok": 0, "refused": 0, "failed": 0, "good": 0}

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def begin(self, label: str, total: int) -> None:
        self._counts = dict.fromkeys(self._counts, 0)
        self._task = self._progress.add_task(label, total=total, counts="")

    def sent(self) -> None:
        self._counts["sent"] += 1
        self._show(advance=0)

    def done(self, record: RequestRecord) -> None:
        self._counts[record.status] += 1
        self._counts["good"] += self._is_good(record)
        self._show(advance=1)

    def _show(self, advance: int) -> None:
        c = self._counts
        num_done = c["ok"] + c["refused"] + c["failed"]
        attainment = f"{c['good'] / num_done:.0%}" if num_done else "-"
        counts = f"sent {c['sent']} ok {c['ok']} refused {c['refused']} failed {c['failed']} SLO met {attainment}"
        self._progress.update(self._task, advance=advance, counts=counts)


async def run(client: Client, specs: Sequence[RequestSpec], arrival: Arrival, rate: float | None, *,
              seed: int = 0, duration_s: float | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              drain_s: float = DEFAULT_DRAIN_S, progress: RunProgress | None = None,
              clock: Callable[[], float] = time.monotonic) -> RunResult:
    """Send specs through client on arrival's schedule at rate (requests/s; ignored by a closed
    loop) and record each request. Stops issuing after duration_s when given; see the module
    docstring for how a run ends. clock: the monotonic clock the records' times come from."""
    if arrival.concurrency is None and arrival.kind != "trace" and not (rate is not None and rate > 0):
        raise ValueError(f"an open-loop arrival needs a positive rate, got {rate!r}")
    start = clock()
    sender = _Sender(client, lambda: clock() - start, timeout_s, progress)
    stop_s = float("inf") if duration_s is None else duration_s
    if progress is not None:
        label = (f"concurrency {arrival.concurrency}" if arrival.concurrency is not None
                 else "trace as recorded" if rate is None else f"{rate:g} req/s")
        progress.begin(label, len(specs))
    started = time.time()
    if arrival.concurrency is None:
        tasks = await _open_loop(sender, specs, arrival.offsets(rate, len(specs), seed), stop_s)
    else:
        tasks = _closed_loop(sender, specs, arrival.concurrency, stop_s)
    await _finish(tasks, sender.now, None if duration_s is None else duration_s + drain_s)
    records = sorted(sender.records, key=lambda r: r.index)
    return RunResult(records, started, sender.now(), rate if arrival.concurrency is None else None)


@dataclass
class _Sender:
    """Sends a run's requests, one ``send`` call each: records the request, bounds it by the
    deadline and reports it to the progress display."""

    client: Client
    now: Callable[[], float]
    timeout_s: float
    progress: RunProgress | None
    records: list[RequestRecord] = field(default_factory=list)

    async def send(self, spec: RequestSpec, scheduled_s: float | None = None) -> None:
        """Send spec now; scheduled_s: when it should have been sent (None: now, a closed loop)."""
        sent_s = self.now()
        scheduled_s = sent_s if scheduled_s is None else scheduled_s
        record = RequestRecord(spec.index, scheduled_s, sent_s, spec.prompt_tokens, spec.max_tokens)
        self.records.append(record)
        if self.progress is not None:
            self.progress.sent()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.send(spec, record, self.now)
        except RequestFailed as error:
            record.status, record.error, record.retry_after_s = error.status, str(error), error.retry_after_s
        except TimeoutError:
            record.status, record.error = "failed", f"timed out after {self.timeout_s:g} s"
        except asyncio.CancelledError:
            record.status, record.error = "failed", "cancelled at end of run"
            raise
        finally:
            record.finished_s = self.now()
            if self.progress is not None:
                self.progress.done(record)


async def _open_loop(sender: _Sender, specs: Sequence[RequestSpec], offsets: Sequence[float],
                     stop_s: float) -> set[asyncio.Task[None]]:
    """Start each request at its offset (late if the loop is behind), each in its own task."""
    tasks = set()
    for spec, offset in zip(specs, offsets, strict=True):
        if offset >= stop_s:
            break
        await asyncio.sleep(offset - sender.now())
        if sender.now() >= stop_s:
            break
        tasks.add(asyncio.create_task(sender.send(spec, offset)))
    return tasks


def _closed_loop(sender: _Sender, specs: Sequence[RequestSpec], concurrency: int,
                 stop_s: float) -> set[asyncio.Task[None]]:
    """concurrency workers, each sending the next spec as soon as its last request ended."""
    queue: Iterator[RequestSpec] = iter(specs)  # shared: each spec is taken once

    async def worker() -> None:
        for spec in queue:
            if sender.now() >= stop_s:
                return
            await sender.send(spec)

    return {asyncio.create_task(worker()) for _ in range(concurrency)}


async def _finish(tasks: set[asyncio.Task[None]], now: Callable[[], float], deadline_s: float | None) -> None:
    """Wait for the tasks until deadline_s (None: until each ends), cancel the rest, and raise
    what one raised (a bug: clients turn the server's errors into records)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=None if deadline_s is None else max(deadline_s - now(), 0))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


# ------------------------------------------------------------------------------ saved runs


@dataclass(frozen=True)
class RunSetup:
    """What every run of one command shares. meta: the configuration kept in every summary
    (target, workload, arrival, seed, SLO, scale, versions, command line)."""

    client: Client
    specs: Sequence[RequestSpec]
    arrival: Arrival
    slo: SLO
    meta: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    duration_s: float | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    drain_s: float = DEFAULT_DRAIN_S
    progress: RunProgress | None = None


def rate_folder(rate: float) -> str:
    return f"rate-{rate:g}"


async def run_and_save(setup: RunSetup, rate: float | None, out_dir: Path) -> dict[str, Any]:
    """One run at rate, scored and written to out_dir; returns its summary."""
    result = await run(setup.client, setup.specs, setup.arrival, rate, seed=setup.seed, duration_s=setup.duration_s,
                       timeout_s=setup.timeout_s, drain_s=setup.drain_s, progress=setup.progress)
    meta = setup.meta | {"started": result.started, "max_send_lag_s": result.max_lag_s}
    summary = summarize(result.records, setup.slo, target_rate=result.target_rate, duration_s=result.duration_s,
                        meta=meta)
    save_run(out_dir, result.records, summary)
    return summary


def save_run(out_dir: Path, records: Sequence[RequestRecord], summary: dict[str, Any]) -> None:
    """OUT/requests.jsonl, OUT/summary.json and the run's plots."""
    from splitserve.loadtest.plots import plot_run  # matplotlib: imported only when plotting

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "requests.jsonl", records)
    write_json(out_dir / "summary.json", summary)
    plot_run(list(records), summary, out_dir)


def save_sweep(out_dir: Path, runs: Sequence[dict[str, Any]], meta: dict[str, Any],
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """OUT/sweep.json (the runs' summary and goodput, plus extra) and OUT/attainment.png."""
    from splitserve.loadtest.plots import plot_sweep

    sweep = sweep_summary(list(runs), meta=meta) | (extra or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sweep.json", sweep)
    plot_sweep(sweep, out_dir, label=str(meta.get("target", out_dir.name)))
    return sweep


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


async def sweep(setup: RunSetup, rates: Sequence[float], out_dir: Path) -> dict[str, Any]:
    """A run per rate (in the order given), each in OUT/rate-<r>; returns the sweep summary."""
    runs = [await run_and_save(setup, rate, out_dir / rate_folder(rate)) for rate in rates]
    return save_sweep(out_dir, runs, setup.meta)


async def search(setup: RunSetup, start_rate: float, out_dir: Path, *, steps: int) -> dict[str, Any]:
    """Look for the goodput with full runs: from start_rate, double the rate until the SLO
    attainment drops below 90% (halve it while it is below, if it starts there), then bisect
    steps times. The sweep summary gains "search": the bracketing rates (None where no rate
    within MAX_DOUBLINGS attained, or none missed)."""
    runs: list[dict[str, Any]] = []

    async def attainment(rate: float) -> float:
        runs.append(await run_and_save(setup, rate, out_dir / rate_folder(rate)))
        return float(runs[-1]["attainment"]["joint"] or 0.0)  # None: no request was sent

    lower, upper = await bracket(attainment, start_rate, steps=steps)
    search_info = {"start_rate": start_rate, "steps": steps, "lower_rate": lower, "upper_rate": upper}
    return save_sweep(out_dir, runs, setup.meta, {"search": search_info})


async def bracket(attainment: Callable[[float], Awaitable[float]], start_rate: float, *, steps: int,
                  threshold: float = GOODPUT_ATTAINMENT, max_doublings: int = MAX_DOUBLINGS
                  ) -> tuple[float | None, float | None]:
    """(lower, upper): a rate whose attainment is >= threshold and one whose is below, found by
    doubling (or halving) from start_rate, then narrowed by steps bisections."""
    lower: float | None = None
    upper: float | None = None
    rate = start_rate
    for _ in range(max_doublings + 1):
        lower, upper = (rate, upper) if await attainment(rate) >= threshold else (lower, rate)
        if lower is not None and upper is not None:
            break
        rate = rate * 2 if upper is None else rate / 2
    if lower is None or upper is None:
        return lower, upper
    for _ in range(steps):
        middle = (lower + upper) / 2
        if await attainment(middle) >= threshold:
            lower = middle
        else:
            upper = middle
    return lower, upper
