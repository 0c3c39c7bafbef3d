"""Block-wise symmetric int8 / int4 quantization of delta values: ``quantize``, ``dequantize``.

Layout of one :class:`QuantizedTensor` (the lead's file encoding, format MINOR 1.1,
stores exactly these fields):

- ``indices``: the delta's 1-D int64 sorted flat indices, unchanged (``nnz`` entries).
- Blocks: the ``nnz`` values, in index order, are cut into consecutive blocks of
  ``block_size``; the last block is partial when ``nnz % block_size != 0`` and gets its
  own scale from its own entries (no padding is stored).
- ``scales``: 1-D float32, ``ceil(nnz / block_size)`` entries,
  ``scale_b = absmax_b / qmax`` with ``qmax = 127`` (int8) or ``7`` (int4). float32,
  not float16: typical delta magnitudes (1e-6..1e-3) divided by ``qmax`` fall in
  float16's subnormal range. An all-zero block has scale 0.
- codes: ``q_j = clamp(round(v_j / scale_b), -qmax, qmax)``, round half to even,
  symmetric (``-128`` / ``-8`` are never produced, so ``q`` and ``-q`` are both valid).
- int8: ``codes`` is 1-D int8 with ``nnz`` entries.
- int4: ``codes`` is 1-D uint8 with ``ceil(nnz / 2)`` bytes; code ``2m`` is the low
  nibble of byte ``m`` and code ``2m + 1`` the high nibble, each nibble the 4-bit two's
  complement of the code (``-1 -> 0xF``); an odd ``nnz`` leaves the last high nibble 0.
- Dequantized value: ``v_j = q_j * scale_b`` in float32, so ``|v - v'| <= scale_b / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
from torch import Tensor

from spdelta.delta import DeltaTensor, EntryMap, SparseDelta, check_entry
from spdelta.errors import DtypeError, KeyMismatchError, LengthError, ParameterError, ShapeError
from spdelta.rules import accumulate_dtype
from spdelta.types import Shape

__all__ = [
    "QuantizedDelta", "QuantizedTensor", "dequantize", "dequantize_tensor", "pack_int4",
    "quantization_error", "quantize", "quantize_tensor", "unpack_int4",
]

_QMAX = {8: 127, 4: 7}


class QuantizedTensor(NamedTuple):
    """One quantized delta'd tensor (layout in the module docstring).

    Attributes:
        shape: Dense shape of the tensor.
        indices: 1-D int64 sorted flat indices, ``nnz`` entries.
        codes: int8 ``(nnz,)`` for 8 bits; uint8 ``(ceil(nnz / 2),)`` packed for 4 bits.
        scales: float32 ``(ceil(nnz / block_size),)`` per-block scales.
        bits: 8 or 4.
        block_size: Values per block, >= 1.
    """

    shape: Shape
    indices: Tensor
    codes: Tensor
    scales: Tensor
    bits: int
    block_size: int

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.numel())


def _check_config(bits: object, block_size: object) -> None:
    if bits not in _QMAX or isinstance(bits, bool):
        raise ParameterError(f"quantize: bits must be 8 or 4; found {bits!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ParameterError(f"quantize: block_size must be an int >= 1; found {block_size!r}. "
                             "64 is a good default.")


def _check_tensor(name: str, t: QuantizedTensor) -> None:
    _check_config(t.bits, t.block_size)
    problems = check_entry(name, t.shape, t.indices, torch.zeros(t.indices.numel()))
    if problems:
        raise problems[0]
    n, want = t.nnz, (torch.int8 if t.bits == 8 else torch.uint8)
    if t.codes.dtype != want or t.codes.dim() != 1 or t.scales.dtype != torch.float32 \
            or t.scales.dim() != 1:
        raise DtypeError(f"{name!r}: {t.bits}-bit codes must be 1-D {want} and scales 1-D "
                         f"float32; found {t.codes.dtype} {tuple(t.codes.shape)} and "
                         f"{t.scales.dtype} {tuple(t.scales.shape)}.")
    n_codes = n if t.bits == 8 else (n + 1) // 2
    n_scales = math.ceil(n / t.block_size)
    if t.codes.numel() != n_codes or t.scales.numel() != n_scales:
        raise LengthError(f"{name!r}: {n} entries need {n_codes} code elements and {n_scales} "
                          f"scales (block {t.block_size}); found {t.codes.numel()} and "
                          f"{t.scales.numel()}.")
    codes = t.codes if t.bits == 8 else unpack_int4(t.codes, n)
    if n and int(codes.min()) < -_QMAX[t.bits]:
        raise DtypeError(f"{name!r}: codes must lie in [-{_QMAX[t.bits]}, {_QMAX[t.bits]}]; "
                         "found the reserved code -128 / -8.")


class QuantizedDelta(EntryMap[QuantizedTensor]):
    """An immutable map from tensor name to :class:`QuantizedTensor`, plus metadata.

    Args:
        tensors: Name -> ``QuantizedTensor``.
        metadata: ``str -> str`` metadata (carried over from the quantized delta).

    Raises:
        FormatError: A subclass, when an entry breaks the layout.

    Example:
        >>> d = SparseDelta({"w": ((4,), torch.tensor([0, 3]), torch.tensor([0.5, -1.0]))})
        >>> q = quantize(d, bits=4, block_size=64)
        >>> q["w"].codes.tolist(), q["w"].scales.tolist() == [torch.tensor(1.0 / 7).item()]
        ([147], True)
    """

    __slots__ = ()

    def __init__(self, tensors: Mapping[str, QuantizedTensor], *,
                 metadata: Mapping[str, str] | None = None) -> None:
        for name, t in tensors.items():
            _check_tensor(name, QuantizedTensor(*t))
        entries = {n: QuantizedTensor(*t) for n, t in sorted(tensors.items())}
        self._tensors = MappingProxyType(entries)
        self._metadata = MappingProxyType(dict(metadata or {}))

    def __repr__(self) -> str:
        nnz = sum(t.nnz for t in self._tensors.values())
        return f"QuantizedDelta({len(self)} tensors, nnz={nnz})"


def pack_int4(codes: Tensor) -> Tensor:
    """Pack int8 codes in ``[-8, 7]`` two per uint8, low nibble first (two's complement nibbles).

    Example:
        >>> pack_int4(torch.tensor([1, -1, 7], dtype=torch.int8)).tolist()
        [241, 7]
    """
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``n`` int8 codes of ``packed``.

    Example:
        >>> unpack_int4(torch.tensor([241, 7], dtype=torch.uint8), 3).tolist()
        [1, -1, 7]
    """
    nib = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n].to(torch.int8)
    return torch.where(nib >= 8, nib - 16, nib)


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
    _check_config(bits, block_size)
    qmax, n = _QMAX[bits], values.numel()
    acc = accumulate_dtype(values.dtype)
    v = values.to(acc)
    blocks = torch.nn.functional.pad(v, (0, (-n) % block_size)).view(-1, block_size)
    scales = (blocks.abs().amax(dim=1) / qmax).to(torch.float32)  # (n_blocks,)
    s = scales.to(acc)
    safe = torch.where(s == 0, 1.0, s).repeat_interleave(block_size)[:n]
    codes = torch.round(v / safe).clamp_(-qmax, qmax).to(torch.int8)
    return (codes if bits == 8 else pack_int4(codes)), scales


def dequantize_tensor(codes: Tensor, scales: Tensor, *, nnz: int, bits: int, block_size: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-tensor kernel: ``q_j * scale_b`` in float32 (float64 if ``dtype`` is), cast to ``dtype``.

    Example:
        >>> dequantize_tensor(torch.tensor([127, -64], dtype=torch.int8), torch.tensor([0.5]),
        ...                   nnz=2, bits=8, block_size=2).tolist()
        [63.5, -32.0]
    """
    q = codes if bits == 8 else unpack_int4(codes, nnz)
    acc = accumulate_dtype(dtype)
    s = scales.to(acc).repeat_interleave(block_size)[:nnz]
    return (q.to(acc) * s).to(dtype)


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
        >>> [round(x, 3) for x in dequantize(quantize(d, bits=8))["w"].values.tolist()]
        [1.0, -0.504]

    References:
        Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
        Scale", NeurIPS 2022, https://arxiv.org/abs/2208.07339 (block-wise absmax).
    """
    _check_config(bits, block_size)
    out = {}
    for name, e in delta.items():
        codes, scales = quantize_tensor(e.values, bits=bits, block_size=block_size)
        out[name] = QuantizedTensor(e.shape, e.indices, codes, scales, bits, block_size)
    q = QuantizedDelta.__new__(QuantizedDelta)  # trusted: built here, skip re-validation
    q._tensors, q._metadata = MappingProxyType(out), MappingProxyType(delta.metadata)
    return q


def dequantize(q: QuantizedDelta, *, dtype: torch.dtype = torch.float32) -> SparseDelta:
    """Rebuild a ``SparseDelta`` with values ``q_j * scale_b`` (support and shapes kept).

    Args:
        q: The quantized delta.
        dtype: Float dtype of the returned values.

    Returns:
        A ``SparseDelta`` with ``q``'s metadata.

    Example:
        >>> d = SparseDelta({"w": ((3,), torch.tensor([0]), torch.tensor([2.0]))})
        >>> dequantize(quantize(d, bits=4), dtype=torch.float64)["w"].values.dtype
        torch.float64
    """
    entries = {name: DeltaTensor(t.shape, t.indices, dequantize_tensor(
        t.codes, t.scales, nnz=t.nnz, bits=t.bits, block_size=t.block_size, dtype=dtype))
        for name, t in q.items()}
    return SparseDelta._trusted(entries, q.metadata)


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
