"""The rejection sampler and the n-gram proposer, as pure functions."""

from __future__ import annotations

import torch

from splitserve import SamplingParams
from splitserve.engine.spec.ngram import NgramProposer, propose_ngram
from splitserve.engine.spec.proposer import DraftRequest
from splitserve.engine.spec.verifier import VerifyItem, verify_batch, verify_greedy, verify_sampled


def test_greedy_all_accepted_gets_a_bonus_token():
    assert verify_greedy(torch.tensor([5, 6, 7, 8]), [5, 6, 7]) == [5, 6, 7, 8]


def test_greedy_early_mismatch_keeps_prefix_and_correction():
    assert verify_greedy(torch.tensor([5, 6, 7, 8]), [5, 9, 7]) == [5, 6]
    assert verify_greedy(torch.tensor([5, 6, 7, 8]), [1, 6, 7]) == [5]


def test_greedy_empty_draft_is_plain_decoding():
    assert verify_greedy(torch.tensor([3]), []) == [3]


def _one_hot(index: int, size: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), size).float()


def test_sampled_certain_target_accepts_every_matching_draft_and_adds_bonus():
    probs = torch.stack([_one_hot(2), _one_hot(4), _one_hot(1)])
    assert verify_sampled(probs, [2, 4], None, torch.Generator().manual_seed(0)) == [2, 4, 1]


def test_sampled_rejected_draft_is_replaced_from_the_residual():
    # The target never emits the draft token 3, so it is rejected and the correction comes
    # from p with token 3 removed: here certainly token 0.
    probs = torch.stack([_one_hot(0), _one_hot(5)])
    for seed in range(5):
        assert verify_sampled(probs, [3], None, torch.Generator().manual_seed(seed)) == [0]


def test_sampled_empty_draft_samples_from_target():
    assert verify_sampled(_one_hot(4)[None], [], None, None) == [4]


def test_sampled_is_deterministic_for_a_seed():
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(1)), dim=-1)
    runs = [verify_sampled(probs, [1, 2, 3], None, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def _first_token_histogram(p: torch.Tensor, q: torch.Tensor | None, trials: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(p.shape[-1])
    target = torch.stack([p, p])
    for _ in range(trials):
        if q is None:
            draft = 2  # a deterministic proposer always proposing token 2
            draft_probs = None
        else:
            draft = int(torch.multinomial(q, 1, generator=generator))
            draft_probs = q[None]
        counts[verify_sampled(target, [draft], draft_probs, generator)[0]] += 1
    return counts / trials


def test_rejection_sampling_reproduces_the_target_distribution_not_the_draft():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(5, generator=g) * 1.5, dim=-1)
    for draft_q in (q, None):
        freq = _first_token_histogram(p, draft_q, trials=20000)
        assert torch.allclose(freq, p, atol=0.015), (freq, p)
        reference = q if draft_q is not None else _one_hot(2, 5)
        assert (freq - reference).abs().max() > 0.05  # clearly not the proposer's law


def test_verify_batch_mixes_greedy_sampled_and_plain_rows():
    logits = torch.full((6, 8), -10.0)
    for row, token in enumerate([1, 2, 3, 4, 5, 6]):
        logits[row, token] = 10.0
    items = [
        VerifyItem([1, 2], SamplingParams(temperature=0), None),  # rows 0-2: all accepted + bonus 3
        VerifyItem([], SamplingParams(temperature=0), None),  # row 3: plain decode -> 4
        VerifyItem([0], SamplingParams(temperature=0.5, seed=1), torch.Generator().manual_seed(1)),  # rows 4-5
    ]
    assert verify_batch(logits, items) == [[1, 2, 3], [4], [5]]


def test_ngram_finds_the_longest_most_recent_match():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 3) == [4, 5, 1]
    assert propose_ngram([1, 2, 9, 1, 2, 7, 1, 2], 2, 2, 2) == [7, 1]  # most recent occurrence
    assert propose_ngram([1, 2, 3], 2, 1, 3) == []
    assert propose_ngram([1, 2, 1], 0, 1, 3) == []


def test_ngram_proposer_respects_each_requests_budget():
    proposer = NgramProposer(1, 3)
    batch = [
        DraftRequest("a", [7, 8, 9, 7, 8], 4, 2, []),
        DraftRequest("b", [7, 8, 9, 7, 8], 4, 0, []),
    ]
    assert proposer.propose(batch) == [[9, 7], []]
