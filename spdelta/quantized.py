"""Quantized sparse deltas as data: :class:`QuantizedTensor`, :class:`QuantizedDelta`, int4 packing.

This is the representation (what format 1.1 stores, and how codes decode to values); the
quantizer that chooses codes and scales is :func:`spdelta.ops.quantize`. Layout of one
:class:`QuantizedTensor` (the file encoding, format MINOR 1.1, stores exactly these fields):

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
from spdelta.errors import DtypeError, LengthError, ParameterError
from spdelta.rules import accumulate_dtype
from spdelta.types import Shape

__all__ = [
    "QMAX", "QuantizedDelta", "QuantizedTensor", "check_config", "dequantize",
    "dequantize_tensor", "pack_int4", "unpack_int4",
]

#: Bits per code -> the largest code magnitude (codes are symmetric, in ``[-qmax, qmax]``).
QMAX = {8: 127, 4: 7}


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


def check_config(bits: object, block_size: object) -> None:
    """Check a quantization's ``bits`` (8 or 4) and ``block_size`` (an int >= 1).

    Raises:
        ParameterError: Either is out of range, named as ``quantize``'s argument.

    Example:
        >>> check_config(4, 64)
    """
    if bits not in QMAX or isinstance(bits, bool):
        raise ParameterError(f"quantize: bits must be 8 or 4; found {bits!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ParameterError(f"quantize: block_size must be an int >= 1; found {block_size!r}. "
                             "64 is a good default.")


def _check_tensor(name: str, t: QuantizedTensor) -> None:
    check_config(t.bits, t.block_size)
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
    if n and int(codes.min()) < -QMAX[t.bits]:
        raise DtypeError(f"{name!r}: codes must lie in [-{QMAX[t.bits]}, {QMAX[t.bits]}]; "
                         "found the reserved code -128 / -8.")


class QuantizedDelta(EntryMap[QuantizedTensor]):
    """An immutable map from tensor name to :class:`QuantizedTensor`, plus metadata.

    Args:
        tensors: Name -> ``QuantizedTensor``.
        metadata: ``str -> str`` metadata (carried over from the quantized delta).

    Raises:
        FormatError: A subclass, when an entry breaks the layout.

    Example:
        >>> codes = pack_int4(torch.tensor([2, -7], dtype=torch.int8))
        >>> t = QuantizedTensor((4,), torch.tensor([0, 3]), codes, torch.tensor([0.25]), 4, 64)
        >>> q = QuantizedDelta({"w": t})
        >>> q["w"].codes.tolist(), dequantize(q)["w"].values.tolist()
        ([146], [0.5, -1.75])
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


def dequantize(q: QuantizedDelta, *, dtype: torch.dtype = torch.float32) -> SparseDelta:
    """Rebuild a ``SparseDelta`` with values ``q_j * scale_b`` (support and shapes kept).

    Args:
        q: The quantized delta.
        dtype: Float dtype of the returned values.

    Returns:
        A ``SparseDelta`` with ``q``'s metadata.

    Example:
        >>> t = QuantizedTensor((3,), torch.tensor([0]), torch.tensor([-6], dtype=torch.int8),
        ...                     torch.tensor([0.125]), 8, 64)
        >>> v = dequantize(QuantizedDelta({"w": t}), dtype=torch.float64)["w"].values
        >>> v.tolist(), v.dtype
        ([-0.75], torch.float64)
    """
    entries = {name: DeltaTensor(t.shape, t.indices, dequantize_tensor(
        t.codes, t.scales, nnz=t.nnz, bits=t.bits, block_size=t.block_size, dtype=dtype))
        for name, t in q.items()}
    return SparseDelta._trusted(entries, q.metadata)
