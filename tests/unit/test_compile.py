"""The compiled forward (EngineConfig.enforce_eager=False) against eager and HF transformers:
the same greedy tokens alone and under continuous batching, no recompiles after the warm-up,
a failed compile falling back to eager (and a stage failing later: that call and the rest run
eager), and --no-enforce-eager reaching the engine's config.

One compiled engine serves the whole module: compiling costs tens of seconds here."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from splitserve import LLM, SamplingParams, cli
from splitserve.config import EngineConfig
from splitserve.engine import compiled
from splitserve.engine.model import LayerStages, after_attention, before_attention
from tests.conftest import PROMPTS

GREEDY_24 = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
ENGINE_ARGS = {"enable_prefix_caching": False, "max_num_batched_tokens": 256, "num_kv_blocks": 128}


@pytest.fixture(scope="module")
def compiled_llm(loaded) -> LLM:
    llm = LLM(loaded=loaded, enforce_eager=False, **ENGINE_ARGS)
    assert llm.engine.is_compiled and llm.engine.compile_time_s > 0
    return llm


def _staggered(llm: LLM, prompts: list[list[int]], max_chunk_tokens: int = 16) -> list[list[int]]:
    """Greedy tokens of prompts arriving one per step, prefilled in chunks beside the decodes:
    every step has a different mix of token counts."""
    engine, waiting, ids, tokens = llm.engine, list(prompts), [], {}
    while waiting or engine.has_unfinished_requests():
        if waiting:
            ids.append(engine.add_request(waiting.pop(0), GREEDY_24, max_chunk_tokens=max_chunk_tokens))
        for output in engine.step():
            tokens[output.request_id] = output.token_ids
    return [list(tokens[i]) for i in ids]


def test_compiled_greedy_matches_eager_and_hf(compiled_llm, make_llm, hf_model):
    prompt_ids = [compiled_llm.tokenizer.encode(p) for p in PROMPTS]
    ours = [o.token_ids for o in compiled_llm.generate(prompt_ids, GREEDY_24)]
    assert ours == [o.token_ids for o in make_llm(**ENGINE_ARGS).generate(prompt_ids, GREEDY_24)]
    for ids, tokens in zip(prompt_ids, ours):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        assert tokens == ref[0, len(ids):].tolist()


def test_continuous_batching_gives_eager_tokens_without_recompiling(compiled_llm, make_llm):
    prompt_ids = [compiled_llm.tokenizer.encode(p) for p in PROMPTS]
    graphs = counters["stats"]["unique_graphs"]
    ours = _staggered(compiled_llm, prompt_ids)
    assert counters["stats"]["unique_graphs"] == graphs, "a step size the warm-up missed was compiled"
    assert ours == _staggered(make_llm(**ENGINE_ARGS), prompt_ids)
    assert compiled_llm.engine.block_pool.num_free_blocks == compiled_llm.engine.block_pool.num_blocks


def test_a_failed_compile_runs_eager_and_says_why(make_llm, llm, monkeypatch, caplog):
    def broken() -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compiled, "compile_stages", broken)
    with caplog.at_level(logging.WARNING, logger="splitserve.engine.compiled"):
        fallback = make_llm(enforce_eager=False, **ENGINE_ARGS)
    assert not fallback.engine.is_compiled and fallback.engine.compile_time_s > 0
    assert "runs eager: RuntimeError: no C++ compiler found" in caplog.text
    expected = [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY_24)]
    assert [o.token_ids for o in fallback.generate(PROMPTS[:3], GREEDY_24)] == expected


def test_a_stage_that_fails_mid_serving_runs_again_eager_and_the_engine_stays_eager(make_llm, llm, caplog):
    """A compiled stage that raises on some later step (here: the 40th call, a prefill's or a
    decode's) costs no request: that call runs eagerly, and so does everything after it."""
    guarded = make_llm(**ENGINE_ARGS)
    engine = guarded.engine
    calls = []

    def failing_before(*args):
        calls.append(args[0].shape[0])
        if len(calls) == 40:
            raise RuntimeError("a shape the compiler cannot handle")
        return before_attention(*args)

    engine.runner.stages = compiled.falling_back(engine.runner, LayerStages(failing_before, after_attention))
    assert engine.is_compiled
    with caplog.at_level(logging.WARNING, logger="splitserve.engine.compiled"):
        ours = [o.token_ids for o in guarded.generate(PROMPTS[:3], GREEDY_24)]
    assert ours == [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY_24)]
    assert not engine.is_compiled and len(calls) == 40
    assert "runs eager from now on: RuntimeError: a shape the compiler cannot handle" in caplog.text


def test_eager_is_the_default_and_costs_no_compile(llm):
    assert EngineConfig().enforce_eager
    assert not llm.engine.is_compiled and llm.engine.compile_time_s == 0.0


def test_no_enforce_eager_reaches_every_command_s_engine():
    from splitserve.profiler.cli import profile_config
    from splitserve.serve_cli import configs

    parser = cli.build_parser()
    assert not cli.engine_config(parser.parse_args(["generate", "hi", "--no-enforce-eager"])).enforce_eager
    cluster, _ = configs(parser.parse_args(["serve", "--no-enforce-eager", "--speculative", "ngram"]))
    engines = [cluster.engine, cluster.decode_engine, *(w.engine for w in cluster.worker_configs(2, 0))]
    assert all(e is not None and not e.enforce_eager for e in engines)
    args = parser.parse_args(["profile", "--out", "p.json", "--no-enforce-eager"])
    assert not profile_config(args).engine.enforce_eager
    assert cli.engine_config(parser.parse_args(["generate", "hi"])).enforce_eager
