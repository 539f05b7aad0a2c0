"""The model's projections: fp32/bf16 Linear and the int8 weight-only Int8Linear, on small matrices."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine import linear
from splitserve.engine.linear import INT8_MM_MAX_ROWS, Int8Linear, Linear, make_linear, quantize_per_channel


def _weight(out_features: int = 96, in_features: int = 64) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05


def test_per_channel_quantization_rounds_each_row_to_its_own_scale():
    w = _weight()
    w[3] *= 100  # one large row must not coarsen the others
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
    assert int(q.abs().amax(dim=1).min()) == 127  # every row uses the full range
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)


def test_an_all_zero_row_quantizes_to_zeros_without_nan():
    w = _weight()
    w[0] = 0
    q, scale = quantize_per_channel(w)
    assert torch.all(q[0] == 0) and torch.isfinite(scale).all()


@pytest.mark.parametrize("rows", [1, INT8_MM_MAX_ROWS, INT8_MM_MAX_ROWS + 1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_dequantized_product_at_any_row_count(rows, dtype):
    w, bias = _weight(), torch.randn(96) * 0.1
    layer = Int8Linear(w, bias.to(dtype))
    x = torch.randn(rows, 64).to(dtype)
    q, scale = quantize_per_channel(w)
    expected = x.to(torch.bfloat16).float() @ (q.float() * scale[:, None]).t() + bias.to(dtype).float()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)  # bf16 inputs and outputs


def test_without_the_int8_kernel_the_bf16_path_gives_the_same_numbers(monkeypatch):
    w, x = _weight(), torch.randn(2, 64)
    with_kernel = Int8Linear(w)
    assert with_kernel.has_int8_mm, "torch's CPU build has the int8 kernel"
    monkeypatch.setattr(linear, "has_int8_mm", lambda device: False)
    without = Int8Linear(w)
    torch.testing.assert_close(without(x), with_kernel(x), atol=1e-2, rtol=1e-2)


def test_a_device_without_the_int8_kernel_is_logged_once_and_falls_back(monkeypatch, caplog):
    def missing(*args):
        raise NotImplementedError("Could not run 'aten::_weight_int8pack_mm' with arguments from the 'X' backend")

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", missing)
    with caplog.at_level(logging.INFO, logger=linear.__name__):
        assert not linear.has_int8_mm.__wrapped__(torch.device("cpu"))
    assert "run as bf16 GEMMs" in caplog.text and "Could not run" in caplog.text


def test_int8_linear_holds_a_quarter_of_fp32s_bytes():
    w = _weight()
    assert Int8Linear(w).nbytes == w.numel() + 2 * w.shape[0]  # int8 weights and a bf16 scale per row
    assert Linear(w).nbytes == 4 * w.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_f_linear_and_prepacks_where_onednn_runs_the_dtype(dtype):
    w, bias, x = _weight().to(dtype), (torch.randn(96) * 0.1).to(dtype), torch.randn(5, 64).to(dtype)
    layer = make_linear(w, bias, None)
    expected_packed = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert isinstance(layer, Linear) and layer.packed == (expected_packed and torch.backends.mkldnn.is_available())
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(layer(x), F.linear(x, w, bias), **tolerance)
