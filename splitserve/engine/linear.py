"""The model's projections (y = x W^T + b), each held in the layout that runs fastest here.

``make_linear`` builds one per weight matrix when the model loads; the model only calls them.

- ``Linear`` keeps the weight in the model's dtype. On CPU an fp32 weight is prepacked once into
  oneDNN's blocked layout (measured here: it streams the weights 2-3x faster than the BLAS
  sgemm behind F.linear at every batch size from decode to prefill), and so is a bf16 weight
  where oneDNN runs bf16 on this CPU (AVX512 cores; natively with AVX512-BF16 or AMX).
  Other devices and dtypes use F.linear on the plain weight.
- ``Int8Linear`` (``EngineConfig.quantization="int8"``) holds the weight as int8 with one fp32
  scale per output channel (symmetric: the row's largest magnitude maps to 127): a quarter of
  fp32's bytes. Its GEMM takes bf16 inputs, whatever the model's dtype, and returns the
  model's dtype. Up to ``INT8_MM_MAX_ROWS`` rows it runs torch's weight-only int8 kernel
  (``aten._weight_int8pack_mm``, which reads the int8 weight as it is); above that, that kernel
  is slower than converting the weight to bf16 (exact: bf16 holds every int8) and running a
  bf16 GEMM, so prefills do that. A device without the int8 kernel always takes the bf16 path,
  and says so once in the log.

Under ``torch.compile`` (splitserve.engine.compiled) a prepacked projection is one custom op,
``splitserve::packed_linear``: dynamo cannot trace oneDNN's packed weights, and as an op with a
known output shape it needs no graph break. Eager calls skip the op's dispatch (~15 us a call).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from splitserve.config import QUANTIZATIONS

# Measured here (1 thread, the default model's layer shapes): the int8 kernel beats the bf16
# path up to ~12 rows (3-5x at 1 row) and loses beyond (its time grows linearly with rows).
INT8_MM_MAX_ROWS = 12

log = logging.getLogger(__name__)


@torch.library.custom_op("splitserve::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """oneDNN's linear on a weight prepacked by ``_reorder_linear_weight``: [..., in] -> [..., out_features]."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class Linear:
    """y = x W^T + b on a weight in the model's dtype (prepacked for oneDNN on CPU where it helps)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.out_features = weight.shape[0]
        self.nbytes = weight.numel() * weight.element_size()  # what a step streams
        self.packed = _packable(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            if torch.compiler.is_compiling():
                return packed_linear(x, self.weight, self.bias, self.out_features)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """y = (x W_q^T) * scale + b with an int8 weight W_q, one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.out_features = weight.shape[0]
        self.qweight, scale = quantize_per_channel(weight)
        self.scale = scale.to(torch.bfloat16)  # the int8 kernel takes its scales in its input's dtype
        self.nbytes = self.qweight.nbytes + self.scale.nbytes
        self.has_int8_mm = has_int8_mm(weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x16 = x.to(torch.bfloat16)
        if self.has_int8_mm and x.shape[0] <= INT8_MM_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x16, self.qweight, self.scale)
        else:
            y = F.linear(x16, self.qweight.to(torch.bfloat16)) * self.scale
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None) -> Linear | Int8Linear:
    """The projection for ``weight`` [out, in] under ``quantization`` (None or one of QUANTIZATIONS)."""
    if quantization is None:
        return Linear(weight, bias)
    assert quantization in QUANTIZATIONS, f"unknown quantization {quantization!r} (EngineConfig validates it)"
    return Int8Linear(weight, bias)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 [out, in], scale fp32 [out]) with weight ~= q * scale."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


@functools.cache
def has_int8_mm(device: torch.device) -> bool:
    """Whether torch's weight-only int8 GEMM runs on this device (tried once on a tiny input)."""
    try:
        x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
        q = torch.zeros(8, 32, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError) as error:
        log.info("int8 weights on %s run as bf16 GEMMs: torch's int8 kernel is unavailable there (%s)",
                 device, str(error).splitlines()[0])
        return False
    return True


def _packable(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32
