"""Reading latency profiles from files: DistServe's published ones and splitserve's own.

``load_profile(path, model=None)`` reads either format (a JSON object with ``"schema":
"splitserve.profile/1"`` is ours; anything else is read as DistServe's) into a
``LatencyProfile``. Every problem is a ValueError that names the file and the model, TP degree
or field at fault. The formats are documented in docs/simulator.md.

- DistServe (``profiler-<gpu>.<engine>.json``): ``model -> TP (string) -> {prefill,
  decoding_smallbs, decoding_largebs: [a, b, c] in ms, decoding_large_small_bs_threshold}``, and
  beside it ``max_num_tokens.csv`` (``model,tp,pp,max_num_tokens``: one instance's KV capacity in
  tokens). The numbers are used as they are: their calibration factors are already inside them.
  Pipeline parallelism is not simulated, so only the CSV's pp=1 rows are read.
- splitserve: per TP degree, the coefficients our workers fit and publish
  (``StepModels.refit()``: ``prefill``, ``decode_step``, optionally ``mixed_step``, in seconds,
  splitserve.latency's features) and the instance's KV capacity in tokens; optionally the KV
  bytes per token and the link's bandwidth, which make the prefill-to-decode transfer cost time,
  and the bandwidth of every backend measured with the name of the one used
  (``splitserve profile`` writes these files; splitserve.profiler).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from splitserve.latency import DECODE_FEATURES, MIXED_FEATURES, PREFILL_FEATURES
from splitserve.sim.profile import DecodeCoefficients, InstanceProfile, LatencyProfile, MixedCoefficients, Triple

SPLITSERVE_SCHEMA = "splitserve.profile/1"
KV_CAPACITY_FILE = "max_num_tokens.csv"
_CSV_COLUMNS = ["model", "tp", "pp", "max_num_tokens"]
_DISTSERVE_FIELDS = ("prefill", "decoding_smallbs", "decoding_largebs", "decoding_large_small_bs_threshold")
_MS = 1e3  # our models are fitted in seconds, profiles are in milliseconds


def load_profile(path: str | Path, model: str | None = None, kv_capacity_csv: str | Path | None = None
                 ) -> LatencyProfile:
    """The profile in ``path`` of ``model`` (None: the file's only model). For a DistServe file
    the KV capacities come from ``kv_capacity_csv``, by default max_num_tokens.csv beside it."""
    path = Path(path)
    data = _read_json(path)
    if data.get("schema") == SPLITSERVE_SCHEMA:
        profile = _splitserve_profile(path, data)
        if model is not None and model != profile.model:
            raise ValueError(f"{path}: profiles {profile.model!r}, not {model!r}")
        return profile
    if "schema" in data:
        raise ValueError(f"{path}: unknown profile schema {data['schema']!r} (expected {SPLITSERVE_SCHEMA!r}, "
                         "or DistServe's layout without a schema)")
    csv_path = Path(kv_capacity_csv) if kv_capacity_csv is not None else path.parent / KV_CAPACITY_FILE
    return _distserve_profile(path, data, model, csv_path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"profile {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"profile {path} cannot be read as JSON: {error}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"profile {path}: expected a JSON object of models (DistServe) or a splitserve profile")
    return data


# --------------------------------------------------------------------------------- DistServe


def _distserve_profile(path: Path, data: dict[str, Any], model: str | None, csv_path: Path) -> LatencyProfile:
    if model is None:
        if len(data) != 1:
            raise ValueError(f"{path} profiles several models ({', '.join(sorted(data))}); name one")
        model = next(iter(data))
    if model not in data:
        raise ValueError(f"{path} has no model {model!r} (it has {', '.join(sorted(data))})")
    by_tp = data[model]
    if not isinstance(by_tp, dict) or not by_tp:
        raise ValueError(f"{path}: {model}: expected an object of TP degrees")
    capacities = read_kv_capacities(csv_path, model)
    instances = []
    for key, entry in by_tp.items():
        tp = _tp_degree(key, f"{path}: {model}")
        where = f"{path}: {model} TP {tp}"
        if not isinstance(entry, dict) or (missing := [f for f in _DISTSERVE_FIELDS if f not in entry]):
            raise ValueError(f"{where}: missing {missing if isinstance(entry, dict) else list(_DISTSERVE_FIELDS)}")
        threshold = entry["decoding_large_small_bs_threshold"]
        if not (isinstance(threshold, int) and not isinstance(threshold, bool) and threshold >= 1):
            raise ValueError(f"{where}: decoding_large_small_bs_threshold must be a whole number >= 1, "
                             f"got {threshold!r}")
        if tp not in capacities:
            raise ValueError(f"{csv_path} has no KV capacity for {model} TP {tp} PP 1 (the profile {path} has one)")
        decode = DecodeCoefficients(Triple.parse(entry["decoding_smallbs"], f"{where}: decoding_smallbs"),
                                    Triple.parse(entry["decoding_largebs"], f"{where}: decoding_largebs"), threshold)
        instances.append(_instance(f"{path}: {model}", tp, Triple.parse(entry["prefill"], f"{where}: prefill"),
                                   decode, capacities[tp]))
    device = path.name.removesuffix(".json")
    return LatencyProfile(model, device, str(path), tuple(sorted(instances, key=lambda i: i.tp)))


def read_kv_capacities(csv_path: Path, model: str) -> dict[int, int]:
    """TP degree -> one instance's KV capacity in tokens, from a DistServe max_num_tokens.csv
    (pp = 1 rows only: pipeline parallelism is not simulated)."""
    try:
        text = csv_path.read_text()
    except OSError as error:
        raise ValueError(f"the KV capacity file {csv_path} cannot be read ({error.strerror}); DistServe "
                         f"profiles need their {KV_CAPACITY_FILE} beside them or named") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != _CSV_COLUMNS:
        raise ValueError(f"{csv_path}: expected the header {','.join(_CSV_COLUMNS)}")
    capacities = {}
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != 4 or not all(cell.strip().isdigit() for cell in row[1:]):
            raise ValueError(f"{csv_path}:{number}: expected model,tp,pp,max_num_tokens with whole numbers, "
                             f"got {','.join(row)!r}")
        name, tp, pp, tokens = row[0].strip(), *(int(cell) for cell in row[1:])
        if name == model and pp == 1:
            capacities[tp] = tokens
    if not capacities:
        raise ValueError(f"{csv_path} has no KV capacity for model {model!r} at PP 1")
    return capacities


# --------------------------------------------------------------------------------- splitserve


def _splitserve_profile(path: Path, data: dict[str, Any]) -> LatencyProfile:
    for name in ("model", "device"):
        if not (isinstance(data.get(name), str) and data[name]):
            raise ValueError(f"{path}: {name!r} must be a non-empty string")
    by_tp = data.get("tp")
    if not isinstance(by_tp, dict) or not by_tp:
        raise ValueError(f"{path}: 'tp' must be an object of TP degrees (\"1\": {{...}})")
    instances = [_splitserve_instance(path, _tp_degree(key, str(path)), entry) for key, entry in by_tp.items()]
    optional = {name: _positive_or_none(data.get(name), f"{path}: {name}")
                for name in ("kv_bytes_per_token", "kv_transfer_bytes_per_s")}
    if (optional["kv_bytes_per_token"] is None) != (optional["kv_transfer_bytes_per_s"] is None):
        raise ValueError(f"{path}: give both kv_bytes_per_token and kv_transfer_bytes_per_s, or neither")
    _check_backends(path, data, optional["kv_transfer_bytes_per_s"])
    return LatencyProfile(data["model"], data["device"], str(path), tuple(sorted(instances, key=lambda i: i.tp)),
                          **optional)


def _check_backends(path: Path, data: dict[str, Any], used: float | None) -> None:
    """The optional per-backend bandwidths (``splitserve profile`` measures each) and the name of
    the one ``kv_transfer_bytes_per_s`` copies: both or neither, consistent with it."""
    backend, by_backend = data.get("kv_transfer_backend"), data.get("kv_transfer_bytes_per_s_by_backend")
    if backend is None and by_backend is None:
        return
    if not (isinstance(backend, str) and isinstance(by_backend, dict) and backend in by_backend):
        raise ValueError(f"{path}: kv_transfer_backend must name an entry of kv_transfer_bytes_per_s_by_backend "
                         f"(an object of bytes/s by backend); got {backend!r} and {by_backend!r}")
    for name, value in by_backend.items():
        _positive_or_none(value, f"{path}: kv_transfer_bytes_per_s_by_backend.{name}")
    if used != float(by_backend[backend]):
        raise ValueError(f"{path}: kv_transfer_bytes_per_s ({used!r}) must be the {backend} entry of "
                         f"kv_transfer_bytes_per_s_by_backend ({by_backend[backend]!r})")


def _splitserve_instance(path: Path, tp: int, entry: Any) -> InstanceProfile:
    where = f"{path}: tp {tp}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with kv_capacity_tokens, prefill and decode_step")
    capacity = entry.get("kv_capacity_tokens")
    if not (isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 1):
        raise ValueError(f"{where}: kv_capacity_tokens must be a whole number >= 1, got {capacity!r}")
    prefill = _coefficients(entry.get("prefill"), PREFILL_FEATURES, f"{where}: prefill")
    step = _coefficients(entry.get("decode_step"), DECODE_FEATURES, f"{where}: decode_step")
    # A plain decode step of B requests batches B tokens over sum(C_i) = sum(C_i + 1) - B of context.
    triple = Triple(step["const"], step["context_tokens"], step["requests"] + step["batched_tokens"]
                    - step["context_tokens"])
    decode = DecodeCoefficients(triple, triple, threshold=1)
    mixed = None
    if entry.get("mixed_step") is not None:
        m = _coefficients(entry["mixed_step"], MIXED_FEATURES, f"{where}: mixed_step")
        mixed = MixedCoefficients(m["const"], m["requests"], m["decode_tokens"], m["prefill_tokens"],
                                  m["prefill_attention"], m["context_tokens"])
    return _instance(str(path), tp, Triple(prefill["const"], prefill["tokens"], prefill["tokens_sq"]), decode,
                     capacity, mixed)


def _coefficients(value: Any, features: tuple[str, ...], where: str) -> dict[str, float]:
    """A fitted model's coefficients (seconds), in milliseconds; quality keys (r2, rmse, n) ignored."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object of coefficients {list(features)} (seconds)")
    missing = [f for f in features if f not in value]
    if missing:
        raise ValueError(f"{where}: missing coefficients {missing}")
    for feature in features:
        x = value[feature]
        if not (isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x < math.inf):
            raise ValueError(f"{where}: coefficient {feature!r} must be a finite number >= 0, got {x!r}")
    return {f: float(value[f]) * _MS for f in features}


# ------------------------------------------------------------------------------------ shared


def _instance(where: str, tp: int, prefill: Triple, decode: DecodeCoefficients, capacity: int,
              mixed: MixedCoefficients | None = None) -> InstanceProfile:
    try:
        return InstanceProfile(tp, prefill, decode, capacity, mixed)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _tp_degree(key: str, where: str) -> int:
    if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
        raise ValueError(f"{where}: TP degree keys must be whole numbers >= 1 as strings, got {key!r}")
    return int(key)


def _positive_or_none(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf):
        raise ValueError(f"{where} must be a number > 0, got {value!r}")
    return float(value)
