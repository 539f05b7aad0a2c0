"""Precision modes side by side: accuracy against fp32 and speed per thread.

    .venv/bin/python -m bench.precision [--modes fp32,bf16,int8,int8-bf16] [--new-tokens 64]
        [--threads 1] [--repeats 3] [--window 512] [--num-prompts N] [--skip-speed]
        [--out bench/results/precision.json]

Every mode loads the same weights (the default model's GGUF, dequantized to fp32) and runs
the same token ids; see docs/benchmarks.md#precision. Accuracy, each mode against fp32:

- greedy agreement over the prompts (bench.prompts.PROMPTS as plain text and the 100 questions
  of bench/data/questions.txt through the chat template) x ``--new-tokens`` tokens. Teacher-
  forced: fp32's greedy continuation is scored by the mode in one forward, and the share of
  positions whose argmax is fp32's token is the agreement (each position is judged on the same
  prefix, so one early difference is not counted again at every later token). Free-running:
  each mode generates on its own (up to 16 requests a step, as served); identical outputs and
  mean common prefix.
- perplexity of bench/data/perplexity.txt (prose and a little code written for this project,
  ~2.4k tokens), in windows of ``--window`` tokens each scored from its own start.

Speed: decode tok/s at batch 1 and 16 and prefill tok/s, the modes interleaved within each
repeat (bench.common.run_protocol). Everything runs on ``--threads`` torch threads (default 1:
a serving worker's share).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from bench.common import (
    DECODE_METHOD,
    PREFILL_METHOD,
    RESULTS_DIR,
    ROOT,
    Workload,
    command_line,
    git_revision,
    markdown_table,
    output_agreement,
    prepare_machine,
    run_protocol,
)
from bench.prompts import EXTRACTIVE, PROMPTS
from splitserve import LLM, SamplingParams
from splitserve.engine.runner import BatchItem

DATA = ROOT / "bench" / "data"
QUESTIONS, TEXT = DATA / "questions.txt", DATA / "perplexity.txt"
MODES = {  # name -> EngineConfig fields
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int8-bf16": {"dtype": "bfloat16", "quantization": "int8"},
}
SPEED_BATCHES = [1, 16]
MAX_NUM_SEQS = 16  # free-running generation runs at the speed benchmark's largest batch
KV_CACHE_BYTES = 256 << 20  # 16 requests of a few hundred tokens, or one perplexity window, in any mode


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}; fp32 "
                   "is always run (the reference)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt, and per timed request")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, a serving worker's share)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts (a smoke run)")
    p.add_argument("--skip-speed", action="store_true", help="accuracy only")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "precision.json")
    args = p.parse_args()
    args.modes = ["fp32", *[m for m in dict.fromkeys(args.modes.split(",")) if m != "fp32"]]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or args.new_tokens < 2 or args.window < 2 or args.repeats < 1:
        p.error(f"unknown modes {unknown}" if unknown else "--new-tokens and --window must be >= 2, --repeats >= 1")
    return args


def prompt_ids(llm: LLM) -> list[list[int]]:
    tokenizer = llm.tokenizer
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}])
             for q in QUESTIONS.read_text().splitlines() if q.strip()]
    return [tokenizer.encode(p) for p in PROMPTS] + [tokenizer.encode(c, add_special_tokens=False) for c in chats]


# ------------------------------------------------------------------------------------ accuracy

def position_logits(llm: LLM, token_ids: list[int], num_logits: int) -> torch.Tensor:
    """fp32 logits of the last ``num_logits`` positions of one forward over ``token_ids``."""
    engine = llm.engine
    engine.kv_cache.allocate("precision-probe", len(token_ids))
    try:
        item = BatchItem(token_ids, 0, engine.kv_cache.block_table("precision-probe"), num_logits=num_logits)
        return engine.runner.execute([item])
    finally:
        engine.kv_cache.free("precision-probe")


def teacher_forced(llm: LLM, prompts: list[list[int]], reference: list[list[int]]) -> dict:
    """Share of positions where the mode's argmax, given fp32's prefix, is fp32's greedy token."""
    matches = total = 0
    for prompt, ref in zip(prompts, reference):
        logits = position_logits(llm, prompt + ref[:-1], len(ref))
        matches += int((logits.argmax(dim=-1) == torch.tensor(ref)).sum())
        total += len(ref)
    return {"agreement": matches / total, "positions": total}


def perplexity(llm: LLM, text_ids: list[int], window: int) -> dict:
    """exp(mean negative log-likelihood) of every token after the first of each window."""
    nll, count = 0.0, 0
    for start in range(0, len(text_ids) - 1, window):
        chunk = text_ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = position_logits(llm, chunk, len(chunk))[:-1]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "window": window}


def generate_fn(llm: LLM):
    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [list(o.token_ids) for o in llm.generate(prompts, params)]
    return generate


def weight_bytes(llm: LLM) -> int:
    """Bytes of projection weights (every layer's and the LM head's) that one decode step reads."""
    model = llm.engine.model
    linears = [lin for w in model.layers for lin in (w.qkv, w.o_proj, w.gate_up, w.down)] + [model.lm_head]
    return sum(lin.nbytes for lin in linears)


def accuracy(llms: dict[str, LLM], prompts: list[list[int]], text_ids: list[int], args: argparse.Namespace) -> dict:
    print(f"fp32 generates the reference: {len(prompts)} prompts x {args.new_tokens} tokens", flush=True)
    reference = generate_fn(llms["fp32"])(prompts, args.new_tokens)
    results = {}
    for name, llm in llms.items():
        print(f"{name}: generating, scoring fp32's tokens, perplexity", flush=True)
        outputs = reference if name == "fp32" else generate_fn(llm)(prompts, args.new_tokens)
        free = output_agreement(reference, outputs)
        free["position_agreement"] = sum(a == b for r, o in zip(reference, outputs)
                                         for a, b in zip(r, o)) / sum(map(len, reference))
        results[name] = {"teacher_forced": teacher_forced(llm, prompts, reference), "free_running": free,
                         "perplexity": perplexity(llm, text_ids, args.window)}
        print(f"{name}: teacher-forced agreement {results[name]['teacher_forced']['agreement']:.2%}, "
              f"perplexity {results[name]['perplexity']['perplexity']:.3f}", flush=True)
    return results


# --------------------------------------------------------------------------------------- speed

def speed(llms: dict[str, LLM], prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """Decode at batch 1 and 16 (the first 16 prompts) and prefill (the 8 extractive prompts)."""
    w = Workload(decode_prompts=prompts[: max(SPEED_BATCHES)],
                 prefill_prompts=[llms["fp32"].tokenizer.encode(p) for p in EXTRACTIVE],
                 batches=SPEED_BATCHES, new_tokens=args.new_tokens, repeats=args.repeats)
    results = run_protocol({name: generate_fn(llm) for name, llm in llms.items()}, w)
    for r in results.values():
        r.pop("outputs_at_max_batch")
    return results


# -------------------------------------------------------------------------------------- report

def report(modes: list[str], acc: dict, spd: dict | None, nbytes: dict[str, int]) -> str:
    header = ["mode", "weights/step MB", "teacher-forced agreement", "identical outputs", "mean common prefix",
              "perplexity", "vs fp32"]
    if spd:
        header += ["decode b=1 tok/s", "decode b=16 tok/s", "prefill tok/s", "b=1 / fp32", "b=16 / fp32"]
    base_ppl = acc["fp32"]["perplexity"]["perplexity"]
    rows = []
    for m in modes:
        a, ppl = acc[m], acc[m]["perplexity"]["perplexity"]
        free = a["free_running"]
        row = [m, f"{nbytes[m] / 1e6:.0f}", f"{a['teacher_forced']['agreement']:.2%}",
               f"{free['identical_requests']}/{free['requests']}", f"{free['mean_common_prefix_tokens']:.1f}",
               f"{ppl:.3f}", f"{ppl / base_ppl - 1:+.2%}"]
        if spd:
            rate = {b: spd[m]["decode"][str(b)]["tok_s_median"] for b in SPEED_BATCHES}
            base = {b: spd["fp32"]["decode"][str(b)]["tok_s_median"] for b in SPEED_BATCHES}
            row += [f"{rate[1]:.1f}", f"{rate[16]:.1f}", f"{spd[m]['prefill']['tok_s_median']:.1f}",
                    f"{rate[1] / base[1]:.2f}x", f"{rate[16] / base[16]:.2f}x"]
        rows.append(row)
    return markdown_table(header, rows)


def main() -> None:
    args = parse_args()
    machine = prepare_machine(args.threads)
    llms = {m: LLM(enable_prefix_caching=False, max_num_seqs=MAX_NUM_SEQS, kv_cache_bytes=KV_CACHE_BYTES, **MODES[m])
            for m in args.modes}
    prompts = prompt_ids(llms["fp32"])
    text_ids = llms["fp32"].tokenizer.encode(TEXT.read_text())
    acc = accuracy(llms, prompts[: args.num_prompts], text_ids, args)
    spd = None if args.skip_speed else speed(llms, prompts, args)
    nbytes = {m: weight_bytes(llm) for m, llm in llms.items()}
    table = report(args.modes, acc, spd, nbytes)
    result = {
        "benchmark": "precision", "command": command_line(),
        "machine": {**machine, "torch": torch.__version__, "torch_threads": args.threads},
        "splitserve_revision": git_revision(ROOT),
        "method": {"decode": DECODE_METHOD, "prefill": PREFILL_METHOD, "accuracy": __doc__},
        "workload": {"prompts": len(prompts[: args.num_prompts]), "new_tokens": args.new_tokens,
                     "text_tokens": len(text_ids), "speed_batches": SPEED_BATCHES, "repeats": args.repeats},
        "modes": {m: {"settings": dataclasses.asdict(llms[m].engine.config), "weight_bytes_per_step": nbytes[m],
                      **acc[m], **({"speed": spd[m]} if spd else {})} for m in args.modes},
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table + f"\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
