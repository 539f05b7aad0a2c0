"""How each system's streams moved in a bench.goodput run: the gaps between a stream's token
deliveries, from the per-request records the run keeps under bench/runs.

For each system and rate, pooled over the rounds: the median over streams of each stream's
median gap (what an ordinary step costs it), the median of their mean gaps (what its TPOT
sees), how many gaps exceeded ``--stall`` seconds (a prefill stalling a decode), and how many
requests each placement kind served (elastic's remote and local). Streams with fewer than four
deliveries have too few gaps to tell and are left out.

    python -m bench.stream_gaps --raw bench/runs/goodput-run10 --out bench/results/goodput-run10/stream_gaps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from bench.common import command_line, markdown_table


def gaps_of(record: dict) -> list[float]:
    """The seconds between a request's consecutive token deliveries."""
    times = [chunk[0] for chunk in record["chunks"]]
    return [b - a for a, b in zip(times, times[1:])]


def summarize(raw: Path, stall_s: float) -> list[dict]:
    """One row per workload, system and rate (the directories ``raw`` holds)."""
    pooled: dict[tuple[str, str, str], list[dict]] = {}
    for path in sorted(raw.glob("*/round-*/*/rate-*/requests.jsonl")):
        workload, system, rate = path.parts[-5], path.parts[-3], path.parts[-2].removeprefix("rate-")
        pooled.setdefault((workload, system, rate), []).extend(
            json.loads(line) for line in path.read_text().splitlines() if line.strip())
    rows = []
    for (workload, system, rate), records in sorted(pooled.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                      float(kv[0][2]))):
        streams = [g for r in records if len(g := gaps_of(r)) >= 3]
        kinds = Counter((r.get("server") or {}).get("placement") or "-" for r in records)
        rows.append({
            "workload": workload, "system": system, "rate": float(rate), "requests": len(records),
            "streams": len(streams),
            "median_gap_ms": 1000 * statistics.median(statistics.median(g) for g in streams) if streams else None,
            "median_mean_gap_ms": 1000 * statistics.median(statistics.mean(g) for g in streams) if streams else None,
            "stalls": sum(gap > stall_s for g in streams for gap in g),
            "placements": dict(kinds),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, required=True, help="a bench.goodput run's --raw directory")
    parser.add_argument("--stall", type=float, default=0.3, metavar="S",
                        help="a gap longer than this many seconds counts as a stall (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (default: print only)")
    args = parser.parse_args()
    rows = summarize(args.raw, args.stall)
    if not rows:
        parser.error(f"no requests.jsonl under {args.raw}/<workload>/round-*/<system>/rate-*/")
    print(markdown_table(
        ["workload", "system", "rate", "median gap (ms)", "median mean gap (ms)", f"gaps > {args.stall:g} s",
         "placements"],
        [[r["workload"], r["system"], f"{r['rate']:g}", _ms(r["median_gap_ms"]), _ms(r["median_mean_gap_ms"]),
          str(r["stalls"]), ", ".join(f"{k} {n}" for k, n in sorted(r["placements"].items()))] for r in rows]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command_line(), "raw": str(args.raw), "stall_s": args.stall,
                                        "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
