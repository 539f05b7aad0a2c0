"""Sampler: greedy rows, top-k/top-p masks, temperature statistics and per-row seeding."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.sampler import apply_top_k_top_p, compute_probs, sample


def params(rows: int, vocab: int, temperature=1.0, top_k=None, top_p=1.0):
    """Per-row tensors as the engine builds them (top_k None -> vocab)."""

    def per_row(value, dtype):
        values = value if isinstance(value, list) else [value] * rows
        return torch.tensor(values, dtype=dtype)

    top_k = [vocab if k is None else k for k in top_k] if isinstance(top_k, list) else top_k or vocab
    return per_row(temperature, torch.float32), per_row(top_k, torch.int64), per_row(top_p, torch.float32)


def kept(logits: list[float], top_k: int | None = None, top_p: float = 1.0) -> set[int]:
    """The token ids a single row keeps after the top-k / top-p masks."""
    row = torch.tensor([logits])
    _, k, p = params(1, row.shape[-1], top_k=top_k, top_p=top_p)
    masked = apply_top_k_top_p(row, k, p)[0]
    assert torch.equal(masked[masked.isfinite()], row[0][masked.isfinite()]), "kept logits must be unchanged"
    return {i for i, value in enumerate(masked.tolist()) if math.isfinite(value)}


def log_probs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# ---------------------------------------------------------------------------------- greedy


def test_greedy_rows_take_argmax_when_batched_with_sampled_rows():
    generator = torch.Generator().manual_seed(0)
    temperature, top_k, top_p = params(
        6,
        50,
        temperature=[0.0, 1.0, 0.0, 0.5, 0.0, 2.0],
        top_k=[None, 5, 3, None, None, 1],
        top_p=[1, 0.9, 1, 1, 0.2, 1],
    )
    is_greedy = temperature == 0
    for _ in range(20):
        logits = torch.randn(6, 50, generator=generator) * 3
        tokens = sample(logits, temperature, top_k, top_p, [None] * 6)
        assert tokens.shape == (6,) and tokens.dtype == torch.int64
        assert torch.equal(tokens[is_greedy], logits.argmax(dim=-1)[is_greedy])


def test_greedy_rows_are_deterministic_on_ties():
    """A greedy row takes the argmax; it never samples among tied tokens (T=0 is not T=1e-6)."""
    logits = torch.tensor([[0.0, 3.0, 3.0, 3.0, 1.0], [0.0, 3.0, 3.0, 3.0, 1.0]])
    temperature, top_k, top_p = params(2, 5, temperature=[0.0, 1.0])
    picks = set()
    for seed in range(30):
        torch.manual_seed(seed)
        picks.add(int(sample(logits, temperature, top_k, top_p, [None, None])[0]))
    assert picks == {int(logits[0].argmax())}


def test_all_greedy_batch_is_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    temperature, top_k, top_p = params(4, 30, temperature=0.0)
    tokens = sample(logits, temperature, top_k, top_p, [torch.Generator().manual_seed(5)] + [None] * 3)
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy(temperature: float):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 100, generator=generator)
    t, k, p = params(64, 100, temperature=temperature, top_k=1)
    for _ in range(5):
        assert torch.equal(sample(logits, t, k, p, [None] * 64), logits.argmax(dim=-1))


# ----------------------------------------------------------------------------------- masks


def test_top_k_keeps_the_k_best():
    logits = [3.0, 1.0, 2.0, 0.0, -1.0]
    assert kept(logits, top_k=1) == {0}
    assert kept(logits, top_k=2) == {0, 2}
    assert kept(logits, top_k=3) == {0, 1, 2}
    assert kept(logits, top_k=5) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = log_probs(0.5, 0.25, 0.15, 0.1)  # masses before each token: 0, .5, .75, .9
    assert kept(logits, top_p=1e-6) == {0}
    assert kept(logits, top_p=0.0) == {0}  # degenerate, but the best token still survives
    assert kept(logits, top_p=0.3) == {0}
    assert kept(logits, top_p=0.6) == {0, 1}
    assert kept(logits, top_p=0.8) == {0, 1, 2}
    assert kept(logits, top_p=0.95) == {0, 1, 2, 3}
    assert kept(logits, top_p=1.0) == {0, 1, 2, 3}
    assert kept(log_probs(0.1, 0.15, 0.25, 0.5), top_p=0.6) == {3, 2}  # order of the vocabulary is irrelevant


def test_top_p_applies_to_the_distribution_left_by_top_k():
    """As in vLLM and HF: top-k first, then top-p on the renormalized survivors."""
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    # After top_k=2: 0.57, 0.43 -> token 0 alone reaches 0.5.
    assert kept(logits, top_k=2, top_p=0.5) == {0}
    # After top_k=3: 0.44, 0.33, 0.22 -> masses before: 0, .44, .78: 0.75 keeps two.
    assert kept(logits, top_k=3, top_p=0.75) == {0, 1}
    assert kept(logits, top_k=3, top_p=0.9) == {0, 1, 2}


def test_ties_on_the_boundary_keep_exactly_k_and_the_best_survives():
    survivors = kept([2.0, 2.0, 2.0, 0.0], top_k=2)
    assert len(survivors) == 2 and survivors <= {0, 1, 2}
    survivors = kept([5.0, 1.0, 5.0], top_k=1)
    assert len(survivors) == 1 and survivors <= {0, 2}
    assert len(kept([1.0, 1.0, 1.0, 1.0], top_p=0.3)) == 2
    # Exactly on the boundary (masses before: 0, .25, .5, .75 are exact): 2 tokens reach 0.5.
    assert len(kept([0.0, 0.0, 0.0, 0.0], top_p=0.5)) == 2
    assert len(kept([0.0, 0.0, 0.0, 0.0], top_p=0.75)) == 3
    # Whatever the cut, one best token is left to sample.
    for logits in ([4.0, 4.0, 4.0], [0.0] * 7, [1.0, 9.0, 3.0]):
        survivors = kept(logits, top_k=1, top_p=1e-9)
        assert len(survivors) == 1 and logits[survivors.pop()] == max(logits)


@pytest.mark.parametrize("vocab", [8, 1000, 49152])
def test_top_p_1_and_top_k_vocab_are_no_ops_even_beside_rows_that_cut(vocab: int):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=generator) * 4
    top_k = torch.tensor([vocab, 2, vocab])
    top_p = torch.tensor([1.0, 1.0, 0.5])
    masked = apply_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(masked[0], logits[0]), "a row with no cut lost tokens"
    assert masked[1].isfinite().sum() == 2
    # The distribution of an uncut row does not depend on what it is batched with.
    temperature = torch.tensor([0.8, 0.8, 0.8])
    alone = compute_probs(logits[:1], temperature[:1], top_k[:1], top_p[:1])
    batched = compute_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=0)


def test_masks_are_per_row():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 20, generator=generator)
    top_k = torch.tensor([20, 3, 7, 1])
    top_p = torch.tensor([0.5, 1.0, 0.9, 1.0])
    batched = apply_top_k_top_p(logits, top_k, top_p)
    for row in range(4):
        alone = apply_top_k_top_p(logits[row : row + 1], top_k[row : row + 1], top_p[row : row + 1])
        assert torch.equal(batched[row : row + 1], alone)


# ------------------------------------------------------------------------------ statistics

NUM_DRAWS = 20_000
LOGITS = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
CHI2_LIMIT = 25.0  # 4 degrees of freedom: p ~ 5e-5 under the right distribution


def draw_counts(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    vocab = logits.shape[-1]
    t, k, p = params(NUM_DRAWS, vocab, temperature, top_k, top_p)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        tokens = sample(logits.expand(NUM_DRAWS, vocab), t, k, p, [None] * NUM_DRAWS)
    return torch.bincount(tokens, minlength=vocab).float()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_frequencies_match_softmax(temperature: float):
    counts = draw_counts(LOGITS, temperature)
    assert chi_square(counts, (LOGITS / temperature).softmax(-1)) < CHI2_LIMIT
    # The check has power: the untempered distribution is rejected (T != 1).
    if temperature != 1.0:
        assert chi_square(counts, LOGITS.softmax(-1)) > 10 * CHI2_LIMIT


def test_top_k_and_top_p_sampling_frequencies_match_the_renormalized_set():
    counts = draw_counts(LOGITS, 1.0, top_k=3)
    expected = torch.cat([LOGITS[:3].softmax(-1), torch.zeros(2)])
    assert chi_square(counts, expected) < CHI2_LIMIT

    probs = LOGITS.softmax(-1)  # .43 .26 .16 .10 .06 -> masses before: 0 .43 .69 .85 .94
    counts = draw_counts(LOGITS, 1.0, top_p=0.8)
    expected = torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(2)])
    assert chi_square(counts, expected) < CHI2_LIMIT


# ---------------------------------------------------------------------------------- seeds

VOCAB = 100


def seeded_run(seed: int, batched: bool, steps: int = 8) -> list[int]:
    """Tokens a seeded row samples over ``steps`` calls, alone or at row 2 of a mixed batch."""
    logits_gen = torch.Generator().manual_seed(99)
    row = torch.Generator().manual_seed(seed)
    tokens = []
    for step in range(steps):
        logits = torch.randn(4, VOCAB, generator=logits_gen) * 0.5  # the same logits either way
        torch.manual_seed(step + (1000 if batched else 0))  # unseeded rows see different noise
        if batched:
            t, k, p = params(
                4, VOCAB, temperature=[0.7, 0.0, 1.0, 1.3], top_k=[10, None, None, 5], top_p=[0.9, 1, 1, 1]
            )
            generators = [torch.Generator().manual_seed(7 + step), None, row, None]
            tokens.append(int(sample(logits, t, k, p, generators)[2]))
        else:
            t, k, p = params(1, VOCAB, temperature=1.0)
            tokens.append(int(sample(logits[2:3], t, k, p, [row])[0]))
    return tokens


def test_seeded_row_samples_the_same_tokens_alone_or_batched():
    alone = seeded_run(42, batched=False)
    assert alone == seeded_run(42, batched=False)
    assert alone == seeded_run(42, batched=True)


def test_different_seeds_give_different_tokens():
    assert seeded_run(42, batched=False) != seeded_run(43, batched=False)


def test_unseeded_rows_follow_the_global_generator():
    logits = torch.zeros(1, VOCAB)
    t, k, p = params(1, VOCAB)
    draws = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            draws.append([int(sample(logits, t, k, p, [None])[0]) for _ in range(8)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1, "uniform logits should not give one token every time"
