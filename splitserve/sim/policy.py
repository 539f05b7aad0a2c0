"""Which instance a simulated request goes to: the router's own ranking functions, fed from
simulated state, so the simulator places as splitserve's router does rather than copying its
policy.

- prefill (disaggregated): ``router.placement.rank_prefill`` -- the lowest predicted TTFT, its
  PrefillModel (the profile's prefill formula, in seconds) over the prompt tokens queued or
  running there plus this prompt's; no prefix cache is simulated.
- decode (disaggregated): ``router.placement.rank_decode`` -- the lowest predicted step time with
  one more request (the profile's small-batch decode formula as a DecodeStepModel); instances
  without room for the request's KV last. Its load counts the requests running, waiting for KV
  and in transfer there; its free KV is the capacity less what those hold or need. The choice
  is made when the prompt's prefill ends (DistServe's order; splitserve's router picks the
  decode worker at arrival, before the prefill: see docs/simulator.md).
- colocated: the least loaded instance by ``router.placement.load_key``, the key
  ``ClusterView.least_loaded`` sorts by (this router's requests there, then what the worker
  reports: queued prompt tokens, running requests, free KV), over each instance's ``load()``
  and its unfinished requests as the router's in flight there.

Instance ids are zero-padded indices (``worker_ids``), so the router's tie-break by id is a
tie-break by index.

Speed (exact): the instances of one role share one TP, so one model, and its prediction never
falls as the load it is given grows (coefficients >= 0); equal loads predict equal times, which
the router orders by id, that is by index. So when the next load up predicts a longer time, the
router's ranking would put first the lowest-indexed instance of the least load (running requests
among those with room, for decode), and that is the choice; only on a tie across loads does the
router's function rank them all. Checked against ranking every instance in
tests/unit/test_sim_policy.py; with 32 instances it saves most of the simulator's time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from splitserve.cluster.store import WorkerLoad
from splitserve.latency import DecodeStepModel, PrefillModel
from splitserve.router.placement import load_key, rank_decode, rank_prefill
from splitserve.sim.instances import ColocatedInstance, DecodeInstance, PrefillInstance
from splitserve.sim.profile import InstanceProfile

_S = 1e-3  # profiles are in ms, the router's models in seconds
_BLOCK_SIZE = 1  # KV is counted in tokens


def prefill_model(profile: InstanceProfile) -> PrefillModel:
    p = profile.prefill
    return PrefillModel.from_coefficients({"const": p.a * _S, "tokens": p.b * _S, "tokens_sq": p.c * _S})


def decode_model(profile: InstanceProfile) -> DecodeStepModel:
    """``a + b * sum(C_i + 1) + c * B`` as the router's model: B requests of one batched token
    each over sum(C_i) of context is ``a + b * context + (b + c) * B`` (b + c >= 0: checked)."""
    d = profile.decode.small
    return DecodeStepModel.from_coefficients({"const": d.a * _S, "requests": (d.b + d.c) * _S, "batched_tokens": 0.0,
                                              "context_tokens": d.b * _S, "draft_tokens": 0.0})


class RouterRankings:
    """The router's rankings over one cluster's instances (their models built once)."""

    def __init__(self, prefill: Sequence[PrefillInstance], decode: Sequence[DecodeInstance]):
        width = max(len(prefill), len(decode), 1)
        self._prefill_ids, self._decode_ids = worker_ids("p", len(prefill), width), worker_ids("d", len(decode), width)
        self._index = {id_: i for ids in (self._prefill_ids, self._decode_ids) for i, id_ in enumerate(ids)}
        self._prefill_models = {id_: prefill_model(p.profile) for id_, p in zip(self._prefill_ids, prefill)}
        self._decode_models = {id_: decode_model(d.profile) for id_, d in zip(self._decode_ids, decode)}

    def choose_prefill(self, instances: Sequence[PrefillInstance], num_prompt_tokens: int) -> int:
        queued = [p.queued_tokens for p in instances]
        model = self._prefill_models[self._prefill_ids[0]]
        index = _clear_least(queued, lambda q: model.predict(q + num_prompt_tokens))
        if index is not None:
            return index
        loads = {id_: WorkerLoad(q, 0, 0, 0, updated_at=0.0) for id_, q in zip(self._prefill_ids, queued)}
        best = rank_prefill(self._prefill_ids, num_prompt_tokens, {}, _BLOCK_SIZE, loads, {}, self._prefill_models)[0]
        return self._index[best.worker_id]

    def choose_decode(self, instances: Sequence[DecodeInstance], num_prompt_tokens: int) -> int:
        needed = num_prompt_tokens + 1  # router.placement.blocks_for at one token a block
        pool = [i for i, d in enumerate(instances) if d.profile.kv_capacity_tokens - d.committed_kv >= needed]
        pool = pool or list(range(len(instances)))  # none has room: the router ranks them all, as one group
        model = self._decode_models[self._decode_ids[0]]
        least = _clear_least([instances[i].num_requests for i in pool],
                             lambda n: model.predict(n + 1, n + 1, (n + 1) * num_prompt_tokens, 0))
        if least is not None:
            return pool[least]
        loads = {}
        for id_, d in zip(self._decode_ids, instances):
            capacity = d.profile.kv_capacity_tokens
            loads[id_] = WorkerLoad(0, d.num_requests, max(capacity - d.committed_kv, 0), capacity, updated_at=0.0)
        best = rank_decode(self._decode_ids, num_prompt_tokens, _BLOCK_SIZE, loads, {}, self._decode_models)[0]
        return self._index[best.worker_id]


def _clear_least(loads: list[int], predict: Callable[[int], float]) -> int | None:
    """The position of the first least load when the next load up predicts a longer time (the
    router's ranking would put it first, as it would when all loads are equal); None when the
    next load up predicts the same time."""
    least = min(loads)
    higher = [n for n in loads if n > least]
    if higher and predict(min(higher)) <= predict(least):
        return None
    return loads.index(least)


def worker_ids(prefix: str, count: int, width_of: int | None = None) -> list[str]:
    """``count`` ids, ``prefix`` and the index zero-padded to the digits of ``width_of`` (default
    ``count``), so that they sort as the indices do."""
    width = len(str(max(width_of or count, 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def choose_colocated(ids: Sequence[str], instances: Sequence[ColocatedInstance]) -> int:
    """The least loaded instance, in ClusterView.least_loaded's order (``load_key``; the lowest
    id, so index, on a tie). Speed (exact): ``load_key`` orders by the router's requests in
    flight first, so only the instances with the fewest are keyed."""
    fewest = min(c.num_unfinished for c in instances)
    candidates = [i for i, c in enumerate(instances) if c.num_unfinished == fewest]
    if len(candidates) == 1:
        return candidates[0]
    return min(candidates, key=lambda i: load_key(ids[i], instances[i].num_unfinished, instances[i].load()))
