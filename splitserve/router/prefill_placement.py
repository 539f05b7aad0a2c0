"""Prefill placement: where an elastic router runs a request's prefill (pure functions and a
small class; the Router feeds them what its ClusterView knows).

The options for a request of n prompt tokens:

- **remote**: the best prefill-pool worker P prefills it and streams its KV into blocks the
  best decode-pool worker D reserved. Predicted TTFT = P's queued prefill work and this
  prompt's uncached tokens, as time (P's prefill model), plus the exposed part of the KV
  transfer (the wait after P's first token, averaged by the router). The requests running at
  D are not slowed -- but those decoding at P are, where P runs requests end to end too (an
  elastic worker): there the prompt is prefilled in chunks P's running requests absorb
  (``remote_chunk``, the local guard below), TTFT is that plan's, and a P whose requests
  absorb no chunk is no candidate (without admission: an unguarded one, see the choice).
- **local on W**, for every worker W of either pool (a pool is a preference, not a
  capability: a prefill-pool worker that takes a request decodes it too): W prefills it in
  chunks of C tokens inside its running decode batch. Predicted TTFT = the mixed steps that
  run W's queued prefill tokens and then this prompt's uncached ones (W's mixed-step model: a
  decode step with a prefill chunk in it). Each of those steps also delays every request
  decoding at W, so C is the size (of ``PlacementConfig.chunk_tokens``) with the soonest
  first token whose delay every running request can absorb (``Running.absorbs``); when none
  does, W has no local option. Where W's requests speculate, C and their k are chosen
  together (``local_option``), and the guard counts delays per token kept.

The guard is amortized, as TPOT is a mean: a running request absorbs a delay when its mean
time per output token still meets its SLO at the end of the horizon it is sure to decode over
(the tokens it must still produce when it ignores EOS, else just the prefill's steps) -- the
slack it banked so far (SLO x tokens produced - seconds taken) plus, over the horizon, the SLO
less the predicted step time. A request running well ahead of its SLO thus pays for a long
local prefill; one that just started only for chunks whose added time per step fits under
its SLO; one that misses its SLO even without the delay does not veto it.

TTFT is the time to the first token, which the worker that prefills samples at the end of the
prefill; the decode steps after it count toward TPOT, which for the newcomer is its decode
worker's step with one more request in either case.

Predictions are scaled by the worker's correction factor (``Corrections``: observed over
predicted, for its recent requests; TTFT apart for its remote and its local prefills) and get
a margin of ``margin_sigmas`` times the model's fit RMSE per step, so a drifting or poorly
fitted model is not trusted blindly. The guard scales the running requests' steps and delays
by the worker's tail factor instead (``Corrections.tail``: the recent ratios' 90th
percentile), since a request misses its SLO on the steps that were slower than predicted, not
on the average one.

The choice: among the options that meet the request's TTFT and TPOT SLOs, the lowest cost =
predicted TTFT + the delay it imposes on requests already decoding (local: the extra seconds
its chunks add to D's steps, times the requests running there) -- except that a hand-off from
P is no candidate when running the request on P itself meets the SLOs and P decodes no more
than D (``_undominated``); an option whose chunks the requests running where it is prefilled
do not absorb counts only when no other does (without admission). Nothing holds -> CapacityError,
which the router answers with RESOURCE_EXHAUSTED / HTTP 429, and a retry hint: a TTFT miss's
excess (the queued work must drain by that much), a TPOT miss's predicted TTFT (a batch shrinks
no sooner than a prefill). It knows nothing of Ray, the store or how a placement is carried out.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from splitserve.config import PlacementConfig
from splitserve.errors import CapacityError
from splitserve.latency import ChunkedPrefill, MixedStepModel
from splitserve.protocol import SLO
from splitserve.router.goodput import StepTime, expected_kept_tokens

REMOTE, LOCAL = "remote", "local"
TTFT = {REMOTE: "ttft/remote", LOCAL: "ttft/local"}  # the correction factors' quantity, per kind
NO_PREDICTION_RETRY_S = 1.0  # the retry hint where no prediction says when a worker will have room


@dataclass(frozen=True)
class Remote:
    """The best remote pair, predicted by the router (corrections and margin applied; inf: a
    worker has no model yet, which never makes an option fail its SLO).

    Where the prefill worker decodes requests of its own (an elastic worker that also runs
    requests end to end), the prompt is prefilled there in chunks its running requests absorb
    (``remote_chunk``): chunk_tokens, and extra_decode_s / extra_steps / delay_cost_s, what
    those chunks cost them (the seconds added to their steps, over how many steps, and times
    how many requests). None / 0: it decodes nothing; the prompt runs in as few steps as it can.
    guarded: False when its running requests absorb no chunk size; without admission such a
    pair is placed all the same (``place``), in the smallest chunks, at the cost of its delay."""

    prefill_worker: str
    decode_worker: str
    ttft_s: float
    tpot_s: float
    chunk_tokens: int | None = None
    extra_decode_s: float = 0.0
    extra_steps: int = 0
    delay_cost_s: float = 0.0
    decode_batch: int = 0  # the requests decoding at the decode worker (this router's placed ones too)
    guarded: bool = True


@dataclass(frozen=True)
class Running:
    """A request decoding at a worker, as the TPOT guard sees it.

    tpot_slo_s: its TPOT SLO; num_tokens: the tokens it produced after its first; decode_s: the
    seconds since its first token; tokens_left: the tokens it will still produce for certain
    (None: it may end at any step, on EOS).

    pending: placed to decode here, its first token not out yet (its prompt is still being
    prefilled, here or at a remote worker). The prompts queued before it are done by the time
    it decodes, so only the prefills placed here after it delay it: ``promised_s`` over
    ``promised_steps`` steps, what those placements promised it, plus the one being decided.

    request_id / alpha / k: for a request this router runs with speculation, its id, its drafts'
    acceptance and its k now (a step keeps ``tokens_per_step`` of its tokens on average)."""

    tpot_slo_s: float
    num_tokens: int = 0
    decode_s: float = 0.0
    tokens_left: int | None = None
    pending: bool = False
    promised_s: float = 0.0
    promised_steps: int = 0
    request_id: str | None = None
    alpha: float = 0.0
    k: int = 0

    def tokens_per_step(self, k: int | None = None) -> float:
        """Its tokens kept per step at speculation length ``k`` (default: its k now)."""
        return expected_kept_tokens(self.alpha, self.k if k is None else k)

    def absorbs(self, delay_s: float, token_s: float, num_steps: int, tokens_per_step: float = 1.0) -> bool:
        """Whether ``delay_s`` spread over the tokens it keeps in the next ``num_steps`` steps
        (``tokens_per_step`` each; ``token_s`` a token without the delay), on top of what it was
        promised, keeps its mean TPOT within its SLO at the end of its horizon. A request that
        misses its SLO even without the delay does not veto it: it is lost either way."""
        tokens = (num_steps + self.promised_steps) * tokens_per_step
        horizon = tokens if self.tokens_left is None else self.tokens_left
        delay = (delay_s + self.promised_s) * min(horizon, tokens) / tokens  # it may leave before the last chunk
        slack = self.slack_s(token_s, horizon)
        return slack < 0 or delay <= slack

    def slack_s(self, token_s: float, horizon: float) -> float:
        """The delay it can absorb and still meet its SLO after ``horizon`` more tokens."""
        return self.tpot_slo_s * (self.num_tokens + horizon) - self.decode_s - token_s * horizon


@dataclass(frozen=True)
class LocalSide:
    """A worker as the place of a local prefill: its mixed-step model and batch.

    num_decoding / num_draft_tokens / context_tokens: the requests decoding there, their drafts
    per step and their context; queued_prefill_tokens: prompt tokens it has yet to prefill;
    cached_tokens: this prompt's tokens already in its prefix cache; running: the requests
    decoding there that have a TPOT SLO; ttft_correction / tpot_correction: observed over
    predicted, for its recent requests; tpot_tail: the TPOT factor the guard protects them
    with (``Corrections.tail``; None: tpot_correction). choose_ks (where this router's
    requests there speculate): the speculation lengths (request id -> k; their drafts per
    step in all are ``num_draft_tokens``) that maximize their goodput under a given step time,
    the SpecController's ``choose_k``.
    """

    worker_id: str
    model: MixedStepModel | None
    num_decoding: int
    num_draft_tokens: int
    context_tokens: int
    queued_prefill_tokens: int = 0
    cached_tokens: int = 0
    running: tuple[Running, ...] = ()
    ttft_correction: float = 1.0
    tpot_correction: float = 1.0
    tpot_tail: float | None = None
    choose_ks: Callable[[StepTime], Mapping[str, int]] | None = None


@dataclass(frozen=True)
class Placement:
    """Where a request's prefill runs, and what was predicted for it.

    kind: REMOTE or LOCAL (then prefill_worker == decode_worker); chunk_tokens: the prefill's
    chunk size (None: as few steps as the worker's budget allows); extra_decode_s / extra_steps:
    the seconds its own chunks add to the steps of the requests decoding at the prefill worker,
    and over how many steps; draft_ks: the speculation lengths of the requests decoding there
    while its prompt is prefilled (empty: as they are); cost_s: what the choice minimized."""

    kind: str
    prefill_worker: str
    decode_worker: str
    predicted_ttft_s: float
    predicted_tpot_s: float
    cost_s: float
    chunk_tokens: int | None = None
    extra_decode_s: float = 0.0
    extra_steps: int = 0
    draft_ks: tuple[tuple[str, int], ...] = ()


def remote_chunk(side: LocalSide, num_prompt_tokens: int, config: PlacementConfig,
                 protect: bool = True) -> Placement | None:
    """A prompt prefilled at ``side`` for another worker to decode, where requests decode at
    ``side`` too: the fastest chunk plan (queued prompts first) whose delay they absorb, as a
    LOCAL-shaped Placement (its predicted_tpot_s means nothing: the request decodes elsewhere);
    None when no chunk size keeps them within their TPOT SLO (``protect=False``: the smallest
    chunk then). The same guard as a local prefill's: a chunk delays the steps of everything
    decoding there, whoever decodes the prompt."""
    return local_option(side, num_prompt_tokens, config, protect=protect, newcomer_decodes=False)


def local_option(side: LocalSide, num_prompt_tokens: int, config: PlacementConfig,
                 protect: bool = True, newcomer_decodes: bool = True) -> Placement | None:
    """The fastest local prefill at ``side`` (a chunk size of ``config.chunk_tokens``) whose
    delay its running requests absorb within their TPOT SLO (``protect=False``: the smallest
    chunk when none does); None when none does or the worker has no mixed-step model yet.
    (Whether it meets the newcomer's own SLOs is ``place``'s question.)

    A request decoding there is delayed by the chunks of every prompt queued there and then
    this one's; a pending one (``Running.pending``) by this one's chunks, beside what it was
    promised. Where the requests there speculate, chunk size and k are chosen together: for
    each chunk size, the k that maximize their goodput when every step carries such a chunk
    (the dearer the step, the more a draft is worth) are weighed beside their k now, and the
    guard counts each request's delay per token it keeps."""
    model = side.model
    if model is None:
        return None
    sigma = config.margin_sigmas * model.fit().rmse
    own_tokens = max(num_prompt_tokens - side.cached_tokens, 1)
    new_tokens = side.queued_prefill_tokens + own_tokens
    step = model.predict(side.num_decoding + 1, side.num_draft_tokens, side.context_tokens + num_prompt_tokens) \
        if newcomer_decodes else model.predict(side.num_decoding, side.num_draft_tokens, side.context_tokens)
    tail = side.tpot_correction if side.tpot_tail is None else side.tpot_tail
    tpot, guard_tpot = side.tpot_correction * step + sigma, tail * step + sigma
    plain = model.predict(side.num_decoding, side.num_draft_tokens, side.context_tokens)

    def plan_of(tokens: int, chunk: int, num_drafts: int) -> ChunkedPrefill:
        return model.prefill_seconds(tokens, chunk, side.num_decoding, num_drafts, side.context_tokens)

    def delay(plan: ChunkedPrefill, kept_now: float, kept_during: float, factor: float) -> float:
        """What ``plan``'s steps add to the time a request takes for the tokens it keeps in
        them (scaled by ``factor``, margin included): a request keeping ``kept_during`` tokens
        a step then, where a plain step keeps ``kept_now``."""
        plain_s = plan.num_steps * plain * kept_during / kept_now
        return factor * (plan.seconds - plain_s) + sigma * math.sqrt(plan.num_steps)

    def guarded(plan: ChunkedPrefill, own: ChunkedPrefill, ks: Mapping[str, int]) -> bool:
        """Whether every running request absorbs its delay (speculating at ``ks`` meanwhile),
        both scaled by the worker's tail factor."""
        for r in side.running:
            kept_now, kept_during = r.tokens_per_step(), r.tokens_per_step(ks.get(r.request_id or "", r.k))
            steps = own if r.pending else plan
            if not r.absorbs(delay(steps, kept_now, kept_during, tail), guard_tpot / kept_now, steps.num_steps,
                             kept_during):
                return False
        return True

    def option(chunk: int, ks: Mapping[str, int]) -> tuple[Placement, bool]:
        """The local prefill in chunks of ``chunk`` with the running requests at ``ks``, and
        whether they all absorb it."""
        num_drafts = sum(ks.values()) if ks else side.num_draft_tokens
        plan = plan_of(new_tokens, chunk, num_drafts)
        own = plan_of(own_tokens, chunk, num_drafts) if side.queued_prefill_tokens else plan
        ttft = side.ttft_correction * plan.seconds + sigma * math.sqrt(plan.num_steps)
        own_delay = delay(own, 1.0, 1.0, side.tpot_correction)
        cost = ttft + (own_delay - sigma * math.sqrt(own.num_steps)) * side.num_decoding
        placement = Placement(LOCAL, side.worker_id, side.worker_id, ttft, tpot, cost,
                              chunk_tokens=min(chunk, new_tokens), extra_decode_s=own_delay,
                              extra_steps=own.num_steps, draft_ks=tuple(sorted(ks.items())))
        return placement, guarded(plan, own, ks)

    # A larger chunk than the whole work is the same plan as the largest size (kept) or not at all.
    sizes = [c for c in set(config.chunk_tokens) if c <= new_tokens or c == max(config.chunk_tokens)]
    held = [p for chunk in sizes for ks in _draft_ks_to_try(side, model, min(chunk, new_tokens))
            if (p := option(chunk, ks))[1]]
    if held:  # the fastest; a tie goes to the larger chunk, then to the k as they are
        return min(held, key=lambda o: (o[0].predicted_ttft_s, -o[0].chunk_tokens, len(o[0].draft_ks)))[0]
    return None if protect else option(min(config.chunk_tokens), {})[0]


def _draft_ks_to_try(side: LocalSide, model: MixedStepModel, chunk: int) -> list[Mapping[str, int]]:
    """The speculation lengths to try while a chunk of ``chunk`` tokens rides every step: the
    goodput-best ones for such steps first, then the ones now ({}) if they differ."""
    if side.choose_ks is None:
        return [{}]

    def step_time(_requests: int, _batched: int, _context: int, num_drafts: int) -> float:
        return model.predict(side.num_decoding, num_drafts, side.context_tokens, chunk)

    best = dict(side.choose_ks(step_time))
    now = {r.request_id: r.k for r in side.running if r.request_id is not None}
    same = sum(best.values()) == side.num_draft_tokens and all(best.get(rid) == k for rid, k in now.items())
    return [{}] if same else [best, {}]


def place(num_prompt_tokens: int, slo: SLO, remote: Remote | None, local_sides: Sequence[LocalSide],
          config: PlacementConfig) -> Placement:
    """The cheapest option that meets the request's SLOs. When none does: with
    ``config.admission``, CapacityError (a sentence naming the best prediction); without, the
    cheapest option all the same. Options whose chunks the running requests where they are
    prefilled absorb come first; only when there is none (no admission) do the others count --
    every worker's smallest chunks, local or for a hand-off, each at the cost of the delay it
    imposes there. ValueError when there is no worker at all."""
    remote_options = [] if remote is None else [Placement(
        REMOTE, remote.prefill_worker, remote.decode_worker, remote.ttft_s, remote.tpot_s,
        remote.ttft_s + remote.delay_cost_s, chunk_tokens=remote.chunk_tokens, extra_decode_s=remote.extra_decode_s,
        extra_steps=remote.extra_steps)]
    options = remote_options if remote is not None and remote.guarded else []
    options += [o for side in local_sides if (o := local_option(side, num_prompt_tokens, config)) is not None]
    if not options and not config.admission:
        options = remote_options + [o for side in local_sides
                                    if (o := local_option(side, num_prompt_tokens, config, protect=False)) is not None]
    if not options:
        if remote is None and local_sides:
            raise CapacityError("no worker can prefill the request locally without pushing the requests "
                                "running there past their TPOT SLO; retry later or relax the SLO",
                                retry_after_s=NO_PREDICTION_RETRY_S)
        raise ValueError("no worker to place the request on")
    meeting = _undominated([o for o in options if _meets(o, slo)], remote, local_sides)
    if meeting or not config.admission:
        return min(meeting or options, key=lambda o: (o.cost_s, o.kind != REMOTE, o.decode_worker))
    best = min(options, key=lambda o: o.predicted_ttft_s)
    if not _meets_ttft(best, slo):
        what, predicted, target = "TTFT", best.predicted_ttft_s, slo.ttft_s
        retry_after = predicted - target  # the work queued ahead of it must drain by that much
    else:
        what, predicted, target = "TPOT", best.predicted_tpot_s, slo.tpot_s
        retry_after = best.predicted_ttft_s  # a batch shrinks as its requests finish: no sooner than a prefill
    raise CapacityError(f"predicted {what} {predicted * 1000:.0f} ms on the best placement ({best.kind} on "
                        f"{best.prefill_worker}) exceeds the request's SLO of {target * 1000:.0f} ms; retry later "
                        f"or relax the SLO", retry_after_s=retry_after if math.isfinite(retry_after) else None)


def _undominated(meeting: list[Placement], remote: Remote | None, local_sides: Sequence[LocalSide]) -> list[Placement]:
    """``meeting`` less the hand-off from P to D when running the request on P itself meets its
    SLOs too and P decodes no more requests than D: the same worker prefills it, no KV travels,
    and the decode work spreads over both (what two colocated engines do) instead of piling up
    at D, whatever the two TTFT models -- the prefill model and the mixed-step model, each
    corrected apart -- say of the same prefill."""
    if remote is None:
        return meeting
    batch_at_p = next((side.num_decoding for side in local_sides if side.worker_id == remote.prefill_worker), None)
    runs_on_p = any(o.kind == LOCAL and o.prefill_worker == remote.prefill_worker for o in meeting)
    if runs_on_p and batch_at_p is not None and batch_at_p <= remote.decode_batch:
        return [o for o in meeting if o.kind != REMOTE]
    return meeting


def _meets_ttft(option: Placement, slo: SLO) -> bool:
    return slo.ttft_s is None or math.isinf(option.predicted_ttft_s) or option.predicted_ttft_s <= slo.ttft_s


def _meets(option: Placement, slo: SLO) -> bool:
    meets_tpot = slo.tpot_s is None or math.isinf(option.predicted_tpot_s) or option.predicted_tpot_s <= slo.tpot_s
    return _meets_ttft(option, slo) and meets_tpot


class Corrections:
    """Per worker and quantity (``TTFT[kind]``, "tpot"): a factor that scales the worker's
    predictions, nudged after each request by ``weight`` of the relative error of what was
    predicted for it (observed / predicted - 1), so it settles where predictions match
    observations; within ``bounds``, 1.0 until a request was seen.

    The factor follows the mean; ``tail`` adds the spread: the factor times the
    ``tail_quantile`` of the last ``tail_window`` requests' observed / predicted ratios (once
    ``tail_min`` were seen), what the TPOT guard protects running requests with -- a prediction
    right on average is still overrun by a tenth of the requests, and those miss their SLO."""

    def __init__(self, weight: float, bounds: tuple[float, float], tail_quantile: float = 0.9,
                 tail_window: int = 32, tail_min: int = 5):
        self.weight, self.bounds = weight, bounds
        self.tail_quantile, self.tail_min = tail_quantile, tail_min
        self._factors: dict[tuple[str, str], float] = {}
        self._ratios: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=tail_window))

    def factor(self, worker_id: str, quantity: str) -> float:
        return self._factors.get((worker_id, quantity), 1.0)

    def tail(self, worker_id: str, quantity: str) -> float:
        """The factor, raised to cover the recent ratios up to ``tail_quantile`` (never lowered:
        recent requests that beat their predictions leave it at the factor); within ``bounds``."""
        factor, ratios = self.factor(worker_id, quantity), self._ratios.get((worker_id, quantity), ())
        if len(ratios) < self.tail_min:
            return factor
        ranked = sorted(ratios)
        quantile = ranked[min(math.ceil(self.tail_quantile * len(ranked)), len(ranked)) - 1]
        return min(factor * max(quantile, 1.0), self.bounds[1])

    def observe(self, worker_id: str, quantity: str, predicted_s: float, actual_s: float) -> None:
        """Fold one request in (``predicted_s``: what was predicted with the factor at the time);
        a prediction that was not finite and positive teaches nothing."""
        if not (0 < predicted_s < math.inf and 0 <= actual_s < math.inf):
            return
        low, high = self.bounds
        self._ratios[(worker_id, quantity)].append(actual_s / predicted_s)
        factor = self.factor(worker_id, quantity) * (1 + self.weight * (actual_s / predicted_s - 1))
        self._factors[(worker_id, quantity)] = min(max(factor, low), high)
