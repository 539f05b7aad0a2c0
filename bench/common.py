"""Shared pieces of the benchmarks: workloads, the timing protocol, machine facts, tables, and
where results go (RESULTS_DIR: the summaries kept in git; RUNS_DIR: raw output, ignored).

Standard library only, so that helpers running under another project's interpreter (vLLM's
CPU build in its own virtualenv) import it too and time every system the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# generate(prompts as token-id lists, max_tokens) -> one list of generated token ids per prompt
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"  # tracked: the summaries docs/benchmarks.md cites
RUNS_DIR = ROOT / "bench" / "runs"  # ignored: per-request records, server logs, per-run plots
CACHE_DIR = Path(os.environ.get("SPLITSERVE_BENCH_CACHE", Path.home() / ".cache" / "splitserve-bench"))
DECODE_METHOD = (
    "decode tok/s = batch * (new_tokens - 1) / (t_full - t_first), where t_full times a generate() "
    "of the batch with max_tokens=new_tokens (greedy, EOS ignored) and t_first times the same "
    "batch with max_tokens=1 (prefill + first token), measured back to back; median over repeats"
)
PREFILL_METHOD = "prefill tok/s = prompt tokens in the batch / t of one generate() with max_tokens=1"


@dataclass(frozen=True)
class Workload:
    """The prompts and settings every system runs; passed to helpers as JSON."""

    decode_prompts: list[list[int]]  # as many as the largest batch; batch b takes the first b
    prefill_prompts: list[list[int]]
    batches: list[int]
    new_tokens: int
    repeats: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))


def random_prompts(num: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids (as vLLM's `--dataset random`), skipping the low special ids."""
    rng = random.Random(seed)
    return [[rng.randrange(256, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


def timed(generate: GenerateFn, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outputs = generate(prompts, max_tokens)
    elapsed = time.perf_counter() - start
    lengths = sorted({len(o) for o in outputs})
    if len(outputs) != len(prompts) or lengths != [max_tokens]:
        raise RuntimeError(f"expected {len(prompts)} outputs of {max_tokens} tokens, got lengths {lengths}")
    return elapsed, outputs


def warm_up(generate: GenerateFn, w: Workload) -> None:
    """One short call per batch size and one prefill call: first-call costs stay out of the timings."""
    for batch in w.batches:
        timed(generate, w.decode_prompts[:batch], min(4, w.new_tokens))
    timed(generate, w.prefill_prompts, 1)


def run_protocol(systems: dict[str, GenerateFn], w: Workload, log: Callable[[str], None] = print) -> dict:
    """Time every system on the workload; systems are interleaved within each repeat so that
    drifting load on a shared machine hits them alike. Returns per-system results."""
    if w.new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: decode is timed as t(new_tokens) - t(1)")
    for name, generate in systems.items():
        log(f"warming up {name}")
        warm_up(generate, w)
    samples = {name: {"decode": {b: [] for b in w.batches}, "prefill": []} for name in systems}
    last_outputs: dict[str, list[list[int]]] = {}
    for repeat in range(w.repeats):
        for batch in w.batches:
            for name, generate in systems.items():
                t_full, outputs = timed(generate, w.decode_prompts[:batch], w.new_tokens)
                t_first, _ = timed(generate, w.decode_prompts[:batch], 1)
                samples[name]["decode"][batch].append((t_full, t_first))
                if batch == max(w.batches):
                    last_outputs[name] = outputs
                log(f"repeat {repeat + 1}/{w.repeats} {name} batch {batch}: "
                    f"{_decode_rate(batch, w.new_tokens, t_full, t_first):.1f} decode tok/s")
        for name, generate in systems.items():
            samples[name]["prefill"].append(timed(generate, w.prefill_prompts, 1)[0])
    num_prefill_tokens = sum(len(p) for p in w.prefill_prompts)
    return {
        name: {
            "decode": {str(b): _decode_summary(b, w.new_tokens, pairs) for b, pairs in s["decode"].items()},
            "prefill": _summary([num_prefill_tokens / t for t in s["prefill"]], t_s=s["prefill"]),
            "outputs_at_max_batch": last_outputs[name],
        }
        for name, s in samples.items()
    }


def _decode_rate(batch: int, new_tokens: int, t_full: float, t_first: float) -> float:
    return batch * (new_tokens - 1) / (t_full - t_first) if t_full > t_first else float("nan")


def _decode_summary(batch: int, new_tokens: int, pairs: Sequence[tuple[float, float]]) -> dict:
    rates = [_decode_rate(batch, new_tokens, full, first) for full, first in pairs]
    return _summary(rates, t_full_s=[p[0] for p in pairs], t_first_s=[p[1] for p in pairs])


def _summary(rates: list[float], **times: list[float]) -> dict:
    return {"tok_s_median": statistics.median(rates), "tok_s_samples": rates, **times}


def output_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How many outputs equal the reference's, request by request, and their mean common prefix."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
                for r, o in zip(reference, other)]
    identical = sum(r == o for r, o in zip(reference, other))
    return {"identical_requests": identical, "requests": len(reference),
            "mean_common_prefix_tokens": sum(prefixes) / len(prefixes) if prefixes else 0.0}


def machine_info() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def prepare_machine(threads: int | None) -> dict:
    """Set torch's thread count if asked, warn when other work is loading the CPU, and return
    the machine description that goes into the JSON."""
    import torch  # not at module level: vLLM's interpreter imports this module too

    if threads:
        torch.set_num_threads(threads)
    machine = machine_info()
    load, cores = machine["load_average_at_start"][0], machine["nproc"] or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores; other work will skew these timings")
    return machine


def git_revision(path: Path) -> str:
    """HEAD of the repository holding path, with "+dirty" when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def command_line() -> str:
    """How this benchmark was started, for its JSON: ``python -m bench.NAME ARGS``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join([Path(sys.executable).name, *head, *sys.argv[1:]])


def raw_dir(out: Path) -> Path:
    """Where a run whose summaries go to out writes its raw output: out's path under RUNS_DIR
    instead of RESULTS_DIR (bench/results/goodput -> bench/runs/goodput), or for an out
    elsewhere a folder beside it (/tmp/x.json -> /tmp/x-raw). A .json suffix is dropped."""
    out = out.resolve()
    stem = out.with_suffix("") if out.suffix == ".json" else out
    if stem.is_relative_to(RESULTS_DIR):
        return RUNS_DIR / stem.relative_to(RESULTS_DIR)
    return stem.with_name(stem.name + "-raw")


def slug(name: str) -> str:
    """name as a folder name: lower case, every other character than a letter or digit a dash."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def keep_summaries(raw: Path, kept: Path) -> None:
    """Copy a load test folder's summaries (sweep.json, summary.json, rate-*/summary.json) from
    raw (under RUNS_DIR) to kept (under RESULTS_DIR); the per-request records stay in raw."""
    for source in [raw / "sweep.json", raw / "summary.json", *sorted(raw.glob("rate-*/summary.json"))]:
        if source.is_file():
            target = kept / source.relative_to(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
