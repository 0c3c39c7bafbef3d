"""Block-wise symmetric int8 / int4 quantization of delta values: ``quantize`` and its error.

The quantized types, int4 packing and decoding (:func:`~spdelta.quantized.dequantize`) are
data representation and live in :mod:`spdelta.quantized`, beside ``SparseDelta``; this module
is the quantizer: ``scale_b = absmax_b / qmax`` per block of ``block_size`` values (in index
order), ``q_j = clamp(round(v_j / scale_b), -qmax, qmax)`` (round half to even).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import Tensor

from spdelta.delta import SparseDelta
from spdelta.errors import KeyMismatchError, ShapeError
from spdelta.quantized import (
    QMAX,
    QuantizedDelta,
    QuantizedTensor,
    check_config,
    dequantize_tensor,
    pack_int4,
)
from spdelta.rules import accumulate_dtype

__all__ = ["quantization_error", "quantize", "quantize_tensor"]


def quantize_tensor(
    values: Tensor, *, bits: int = 8, block_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Per-tensor kernel: symmetric absmax block quantization of 1-D ``values``.

    Args:
        values: 1-D float values (any float dtype; fp64 is rounded with fp64 arithmetic).
        bits: 8 (codes in [-127, 127]) or 4 (in [-7, 7], packed).
        block_size: Values per block.

    Returns:
        ``(codes, scales)`` in the layout of the module docstring.

    Example:
        >>> codes, scales = quantize_tensor(torch.tensor([1.0, -0.5, 0.25]), bits=8, block_size=2)
        >>> codes.tolist(), [round(x * 127, 4) for x in scales.tolist()]
        ([127, -64, 127], [1.0, 0.25])
    """
    check_config(bits, block_size)
    qmax, n = QMAX[bits], values.numel()
    acc = accumulate_dtype(values.dtype)
    v = values.to(acc)
    blocks = torch.nn.functional.pad(v, (0, (-n) % block_size)).view(-1, block_size)
    scales = (blocks.abs().amax(dim=1) / qmax).to(torch.float32)  # (n_blocks,)
    s = scales.to(acc)
    safe = torch.where(s == 0, 1.0, s).repeat_interleave(block_size)[:n]
    codes = torch.round(v / safe).clamp_(-qmax, qmax).to(torch.int8)
    return (codes if bits == 8 else pack_int4(codes)), scales


def quantize(delta: SparseDelta, *, bits: int = 8, block_size: int = 64) -> QuantizedDelta:
    """Quantize every tensor's values to int8 or int4 with per-block absmax scales.

    Args:
        delta: The delta; indices and shapes are kept as they are.
        bits: 8 (int8 codes) or 4 (int4 codes packed two per byte).
        block_size: Number of consecutive values (in index order) sharing one scale.

    Returns:
        A :class:`QuantizedDelta` carrying the delta's metadata.

    Raises:
        ParameterError: ``bits`` is not 8 or 4, or ``block_size`` is not an int >= 1.

    Example:
        >>> d = SparseDelta({"w": ((4,), torch.tensor([1, 2]), torch.tensor([1.0, -0.5]))})
        >>> from spdelta.quantized import dequantize
        >>> [round(x, 3) for x in dequantize(quantize(d, bits=8))["w"].values.tolist()]
        [1.0, -0.504]

    References:
        Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
        Scale", NeurIPS 2022, https://arxiv.org/abs/2208.07339 (block-wise absmax).
    """
    check_config(bits, block_size)
    out = {}
    for name, e in delta.items():
        codes, scales = quantize_tensor(e.values, bits=bits, block_size=block_size)
        out[name] = QuantizedTensor(e.shape, e.indices, codes, scales, bits, block_size)
    q = QuantizedDelta.__new__(QuantizedDelta)  # trusted: built here, skip re-validation
    q._tensors, q._metadata = MappingProxyType(out), MappingProxyType(delta.metadata)
    return q


def quantization_error(delta: SparseDelta, q: QuantizedDelta) -> dict[str, float]:
    """Errors of ``dequantize(q)`` against ``delta``, computed in float64.

    Args:
        delta: The original delta.
        q: Its quantization (same names, shapes and indices).

    Returns:
        ``{"max_abs_error", "relative_error", "max_error_over_half_step"}``: the largest
        ``|v - v'|``, ``||v - v'||_2 / ||v||_2`` over all tensors (0 when both are 0), and
        the largest ``|v - v'| / (scale_b / 2)`` (<= 1 up to float rounding; 0 for zero blocks).

    Raises:
        KeyMismatchError: The names differ.
        ShapeError: A shape or a support differs.

    Example:
        >>> d = SparseDelta({"w": ((3,), torch.tensor([0, 1]), torch.tensor([1.0, 0.3]))})
        >>> err = quantization_error(d, quantize(d, bits=4))
        >>> round(err["max_abs_error"], 6), err["max_error_over_half_step"] <= 1
        (0.014286, True)
    """
    if set(delta) != set(q):
        raise KeyMismatchError(
            f"quantization_error: names differ: only in delta {sorted(set(delta) - set(q))}, "
            f"only in q {sorted(set(q) - set(delta))}. Pass the delta that q was made from.")
    max_abs = ratio = err2 = ref2 = 0.0
    for name, t in q.items():
        e = delta[name]
        if e.shape != t.shape or not torch.equal(e.indices, t.indices):
            raise ShapeError(f"{name!r}: q was not made from this delta (shape or support "
                             "differs); quantize the delta again.")
        v = e.values.to(torch.float64)
        err = (v - dequantize_tensor(t.codes, t.scales, nnz=t.nnz, bits=t.bits,
                                     block_size=t.block_size, dtype=torch.float64)).abs()
        if err.numel():
            half = (t.scales.to(torch.float64) / 2).repeat_interleave(t.block_size)[:t.nnz]
            max_abs = max(max_abs, float(err.max()))
            ratio = max(ratio, float(torch.where(half > 0, err / half, 0.0).max()))
        err2 += float((err * err).sum())
        ref2 += float((v * v).sum())
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    return {"max_abs_error": max_abs, "relative_error": rel, "max_error_over_half_step": ratio}
