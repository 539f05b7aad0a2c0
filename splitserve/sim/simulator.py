"""The discrete-event serving simulator: requests through simulated instances, timed by a
latency profile.

``simulate(profile, config, requests)`` runs one trace to its end and returns every request's
times (``SimResult``, outcome.py). Time is in seconds from the first arrival. Events are (time,
sequence, handler, argument) on a heap (events.py); the sequence number makes equal times run
in the order they were scheduled, so a seed gives one result. An idle instance that receives
work starts its next iteration in an event of its own at the same time, so whatever else
arrives at that instant joins the iteration. One event per prefill batch, decode step or
iteration of an instance (never one per token: a decode step advances its whole batch), one
per arrival (each scheduled when the one before it runs) and one per KV transfer that takes
time.

- ``disaggregated``: ``Disaggregated`` (disaggregated.py) -- prefill instances run batches of
  whole prompts; each prefilled request (its first token out) goes to a decode instance, after
  the KV transfer time of the profile (0 without a bandwidth), waits there for KV and decodes.
- ``colocated``: ``Colocated`` (colocated.py) -- one instance per request for both phases, by
  its scheduler (``prefill-first`` or ``chunked``; config.py).
- ``elastic``: ``Elastic`` (elastic.py) -- every instance prefills for others, decodes what is
  handed to it, or runs a request end to end with its prompt chunked into its decode batch, as
  the router's own placement code decides per request (or refuses it: counted refused, with
  ``slo`` the requests' SLO); the pools' roles follow the load (router.roles).

Where requests go is policy.py's decision (the router's own ranking functions); what the
instances hold is instances.py's. Not modelled: speculation, prefix caching, preemption,
pipeline parallelism, transfer link contention, network and router overheads, failures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from splitserve.config import SimConfig
from splitserve.protocol import SLO
from splitserve.sim.colocated import Colocated
from splitserve.sim.disaggregated import Disaggregated
from splitserve.sim.elastic import Elastic, Observer
from splitserve.sim.events import EventLoop
from splitserve.sim.instances import Job
from splitserve.sim.outcome import SimResult
from splitserve.sim.profile import LatencyProfile
from splitserve.sim.trace import SimRequest


def simulate(profile: LatencyProfile, config: SimConfig, requests: Sequence[SimRequest], slo: SLO = SLO(),
             observer: Observer | None = None) -> SimResult:
    """Serve ``requests`` (ascending arrival times) on the cluster ``config`` describes; elastic
    mode places them against ``slo`` (``observer``: told of each request's moments). ValueError
    before anything runs when a request can never fit an instance's KV."""
    if any(b.arrival_s < a.arrival_s for a, b in zip(requests, requests[1:])):
        raise ValueError("requests must come in order of arrival")
    loop = EventLoop()
    cluster: Disaggregated | Colocated | Elastic
    if config.mode == "elastic":
        cluster = Elastic(profile, config, loop, slo, observer)
    else:
        cluster = Disaggregated(profile, config, loop) if config.mode == "disaggregated" else \
            Colocated(profile, config, loop)
    jobs = [Job(request) for request in requests]
    cluster.check(jobs)
    _Arrivals(jobs, cluster.arrive, loop).start()
    loop.run()
    unfinished = [job.request.index for job in jobs if job.finish_s is None]
    assert not unfinished, f"requests {unfinished[:5]} never finished nor were refused"
    return cluster.result(jobs)


class _Arrivals:
    """Feeds the jobs in as they arrive: each arrival event schedules the next, so the heap holds one."""

    def __init__(self, jobs: list[Job], arrive: Callable[[float, Job], None], loop: EventLoop):
        self._jobs, self._arrive, self._loop, self._next = jobs, arrive, loop, 0

    def start(self) -> None:
        if self._jobs:
            self._loop.at(self._jobs[0].request.arrival_s, self._on_arrival)

    def _on_arrival(self, now: float, _: None) -> None:
        """Every job arriving at ``now``, so all of them are queued before a batch starts."""
        jobs, first = self._jobs, self._next
        while self._next < len(jobs) and jobs[self._next].request.arrival_s == now:
            self._next += 1
        if self._next < len(jobs):
            self._loop.at(jobs[self._next].request.arrival_s, self._on_arrival)
        for job in jobs[first : self._next]:
            self._arrive(now, job)

