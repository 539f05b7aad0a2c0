"""vLLM side of bench.engine_throughput; runs under vLLM's own interpreter, not splitserve's.

Usage, from the repository root (``-m`` puts it on sys.path, so ``bench`` imports; splitserve
need not be installed there, and nothing here imports it):

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_PYTHON -m bench._vllm_throughput HF_FOLDER WORKLOAD_JSON {compile,eager}

Loads the HF folder with vllm.LLM, times it with the same protocol as the other systems
(common.run_protocol) and prints one line `RESULT_JSON {...}` on stdout; vLLM's own logs may
surround it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench.common import Workload, run_protocol

RESULT_PREFIX = "RESULT_JSON "


def main() -> None:
    folder, workload_file, mode = sys.argv[1:4]
    if mode not in ("compile", "eager"):
        raise SystemExit(f"mode must be compile or eager, got {mode!r}")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    w = Workload.from_json(Path(workload_file).read_text())
    settings = {
        "dtype": "float32",
        "max_model_len": 2048,
        "max_num_seqs": max(32, *w.batches),
        "enforce_eager": mode == "eager",
        # Every repeat sends the same prompts; a prefix-cache hit would shrink t_first.
        "enable_prefix_caching": False,
    }
    start = time.perf_counter()
    llm = LLM(model=folder, **settings)
    init_s = time.perf_counter() - start

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    results = run_protocol({"vllm": generate}, w, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU_", "OMP_"))}
    report = {"version": vllm.__version__, "mode": mode, "settings": settings, "env": env, "init_s": init_s,
              **results["vllm"]}
    print(RESULT_PREFIX + json.dumps(report), flush=True)


if __name__ == "__main__":  # vLLM starts its engine with spawn, which re-imports this module
    main()
