"""bench.sim_validation's comparison of simulated with measured scores (pure: no simulator, no
servers), so it is unit-tested on small made-up numbers.

Both sides are scored the same way, by bench.goodput_scores.score_workload: per system, the
attainment at each rate pooled over the rounds (the share of the requests meeting both SLOs;
failed and refused requests miss) and goodput (the highest rate with >= 90%, interpolated as
``metrics.goodput`` does). This module compares them:

- RMSE in points: the root mean square of (simulated - measured) attainment x 100 over the rates
  both have, per system and over every (system, rate) point of a workload together;
- goodput, measured and simulated, side by side;
- order: the systems ranked by goodput (best first; a goodput below the lowest rate counts as 0;
  ties broken by the mean attainment over the rates, then by name), measured against simulated:
  how many pairs of systems the simulation orders as measured (a pair measured equal -- same
  goodput and mean attainment -- agrees with any order; a pair simulated equal but measured
  apart does not), and whether all of them are.
"""

from __future__ import annotations

import math
from itertools import combinations


def rmse_points(measured: dict[str, float], simulated: dict[str, float]) -> float | None:
    """RMSE of simulated against measured attainment, in points (x 100), over the rates both
    give (keys: rates as text); None when they share none."""
    rates = [r for r in measured if r in simulated]
    if not rates:
        return None
    return 100 * math.sqrt(sum((simulated[r] - measured[r]) ** 2 for r in rates) / len(rates))


def rank_key(score: dict) -> tuple[float, float]:
    """A system's standing, higher first: its goodput (0 below the lowest rate), then its mean
    attainment over the rates."""
    attainment = [float(a) for a in score["attainment"].values()]
    return float(score["goodput_rps"] or 0.0), sum(attainment) / len(attainment) if attainment else 0.0


def ranking(scores: dict[str, dict]) -> list[str]:
    """System names, best first (``rank_key``; ties by name)."""
    return sorted(scores, key=lambda name: (tuple(-v for v in rank_key(scores[name])), name))


def pairs_agreeing(measured: dict[str, dict], simulated: dict[str, dict]) -> tuple[int, int]:
    """(pairs of systems the simulation orders as measured, pairs); a pair measured equal agrees."""
    names = [n for n in measured if n in simulated]
    agreeing = total = 0
    for a, b in combinations(names, 2):
        total += 1
        m = _sign(rank_key(measured[a]), rank_key(measured[b]))
        agreeing += m == 0 or m == _sign(rank_key(simulated[a]), rank_key(simulated[b]))
    return agreeing, total


def _sign(a: tuple, b: tuple) -> int:
    return (a > b) - (a < b)


def compare(measured: dict[str, dict], simulated: dict[str, dict]) -> dict:
    """One workload's comparison. ``measured`` / ``simulated``: per system, score_workload's
    entry (``attainment`` by rate, ``goodput_rps``, ``is_lower_bound``, ``is_below_range``)."""
    names = [n for n in measured if n in simulated]
    systems = {}
    errors: list[float] = []
    for name in names:
        m, s = measured[name]["attainment"], simulated[name]["attainment"]
        rates = sorted((r for r in m if r in s), key=float)
        errors += [s[r] - m[r] for r in rates]
        systems[name] = {
            "rates": {r: {"measured": m[r], "simulated": s[r]} for r in rates},
            "rmse_points": rmse_points(m, s),
            "goodput_rps": {"measured": _goodput(measured[name]), "simulated": _goodput(simulated[name])},
        }
    m_rank = ranking({n: measured[n] for n in names})
    s_rank = ranking({n: simulated[n] for n in names})
    agreeing, total = pairs_agreeing(measured, simulated)
    return {
        "systems": systems,
        "rmse_points": 100 * math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None,
        "order": {"measured": m_rank, "simulated": s_rank, "matches": agreeing == total,
                  "pairs_agreeing": agreeing, "pairs": total},
    }


def _goodput(score: dict) -> dict:
    return {"value": score["goodput_rps"], "is_lower_bound": score["is_lower_bound"],
            "is_below_range": score["is_below_range"]}


def format_goodput(g: dict) -> str:
    if g["value"] is None:
        return "< lowest rate" if g["is_below_range"] else "-"
    return (">= " if g["is_lower_bound"] else "") + f"{g['value']:.2f}"
