"""Our model against HF transformers loading the same GGUF file: logits and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from splitserve import LLM, SamplingParams
from splitserve.engine.runner import BatchItem
from tests.conftest import PROMPTS


def _our_logits(llm: LLM, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Last-position logits, optionally computing the prompt in chunks of ``chunk`` tokens."""
    engine = llm.engine
    engine.kv_cache.allocate("probe", len(token_ids))
    try:
        chunk = chunk or len(token_ids)
        for start in range(0, len(token_ids), chunk):
            piece = token_ids[start : start + chunk]
            item = BatchItem(piece, start, engine.kv_cache.block_table("probe"), num_logits=1)
            logits = engine.runner.execute([item])
    finally:
        engine.kv_cache.free("probe")
    return logits[0]


@pytest.mark.parametrize("prompt", PROMPTS[:5])
def test_last_logits_match_hf(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0, -1]
    actual = _our_logits(llm, ids)
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


def test_logits_match_hf_across_blocks_and_chunks(llm, hf_model):
    ids = llm.tokenizer.encode(" ".join(PROMPTS))  # ~150 tokens: many 16-token blocks
    assert len(ids) > 5 * llm.engine.config.block_size
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(_our_logits(llm, ids), expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(_our_logits(llm, ids, chunk=23), expected, atol=2e-4, rtol=1e-4)


def test_greedy_tokens_identical_to_hf_generate(llm, hf_model):
    """8 prompts x 64 new tokens, our batch of 8 against HF one prompt at a time."""
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompt_ids, params)
    for ids, out in zip(prompt_ids, outputs):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        assert out.token_ids == ref[0, len(ids) :].tolist()
        assert len(out.token_ids) == 64 and out.finish_reason == "length"


def test_hf_folder_loads_and_matches_gguf(llm, hf_model, gguf_path, tmp_path):
    """The safetensors + config.json + tokenizer.json path gives the GGUF path's tokens."""
    transformers = pytest.importorskip("transformers")
    # HF will not save_pretrained a GGUF-loaded model, so write the checkpoint by hand.
    tensors = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    tensors.pop("lm_head.weight", None)  # tied to the embedding
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {k: v for k, v in hf_model.config.to_dict().items() if k != "quantization_config"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(
        tmp_path
    )
    folder_llm = LLM(model=str(tmp_path))
    assert folder_llm.engine.model_config == llm.engine.model_config
    params = SamplingParams(max_tokens=24, temperature=0)
    prompts = PROMPTS[:3]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    assert [o.token_ids for o in folder_llm.generate(ids, params)] == [o.token_ids for o in llm.generate(ids, params)]
