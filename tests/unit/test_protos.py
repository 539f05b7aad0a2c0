"""The committed gRPC stubs are exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import load_script

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    return load_script("gen_protos")


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path):
    gen = load_generator()
    gen.generate(tmp_path)
    fresh, committed = files_under(tmp_path), files_under(gen.STUB_DIR)
    assert sorted(fresh) == sorted(committed), "stub files differ: run scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run .venv/bin/python scripts/gen_protos.py"


def test_stubs_import_from_the_installed_package():
    from splitserve.protos.splitserve.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc, serving_pb2, serving_pb2_grpc

    assert kv_transfer_pb2.DESCRIPTOR.package == serving_pb2.DESCRIPTOR.package == "splitserve.v1"
    assert hasattr(kv_transfer_pb2_grpc, "KVTransferStub")
    assert hasattr(serving_pb2_grpc, "GenerationStub")


def test_generate_request_sampling_fields_track_presence():
    """Unset must stay distinguishable from zero, or temperature 0 (greedy) could not be asked for."""
    from splitserve.protos.splitserve.v1 import serving_pb2 as pb

    request = pb.GenerateRequest(temperature=0.0)
    assert request.HasField("temperature") and not request.HasField("top_p")
    assert pb.GenerateRequest.FromString(request.SerializeToString()).HasField("temperature")
