"""Replacement tensors (spec §6.4, format 1.3) and :class:`Patch`, a map of exact entries.

A :class:`ReplaceTensor` holds new values for some entries of a base tensor, stored in the
base tensor's own dtype; applying it copies their bits (NaN payloads, ``-0.0``,
subnormals and infinities included), so ``diff`` then ``apply`` reproduces a checkpoint
bit for bit. A :class:`Patch` maps tensor names to replacement or additive entries, with
the file metadata (base and result fingerprints). Everything bitwise here works on
:func:`bit_view`, the tensor seen as integers of its item size: comparisons and copies
on integers never touch a float's bits.

Example:
    >>> import torch
    >>> old = torch.tensor([1.0, -0.0, 2.0])
    >>> new = torch.tensor([1.0, 0.0, float("nan")])
    >>> (bit_view(old) != bit_view(new)).nonzero().flatten().tolist()  # -0.0 vs 0.0 differ
    [1, 2]
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from spdelta.delta import DeltaTensor, EntryMap, _combine, check_entry, numel_of
from spdelta.errors import (
    DtypeError,
    FormatError,
    MetadataError,
    ParameterError,
    ShapeError,
    SpdeltaError,
    TensorSetError,
)
from spdelta.types import Shape

__all__ = [
    "Entry",
    "Patch",
    "ReplaceTensor",
    "bit_view",
    "changed_positions",
    "check_replace",
    "refuse_patch",
    "storable",
]

#: Item size in bytes -> the integer dtype :func:`bit_view` uses.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: The dtypes a replacement tensor holds: every dtype of whole bytes per element that a
#: safetensors checkpoint stores (``spdelta.format.constants.TORCH_DTYPES`` names them).
_STORABLE = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn,
    torch.float8_e8m0fnu, torch.uint16, torch.int16, torch.float16, torch.bfloat16,
    torch.uint32, torch.int32, torch.float32, torch.uint64, torch.int64, torch.float64,
    torch.complex64,
})


class ReplaceTensor(NamedTuple):
    """Entries that replace a base tensor's values (``value_encoding`` ``replace``, spec §6.4).

    Attributes:
        shape: Dense shape of the base tensor.
        indices: 1-D int64 flat row-major positions, strictly increasing.
        values: 1-D, the base tensor's dtype (any dtype a safetensors checkpoint holds
            with whole bytes per element: floats, ints, bool, fp8, complex64).
    """

    shape: Shape
    indices: Tensor
    values: Tensor

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor."""
        return numel_of(self.shape)


#: An entry of a patch: added (``DeltaTensor``) or replacing (``ReplaceTensor``).
Entry = DeltaTensor | ReplaceTensor


def storable(dtype: torch.dtype) -> bool:
    """Whether a replacement tensor may hold ``dtype`` (whole bytes per element, spec V6).

    Example:
        >>> storable(torch.bfloat16), storable(torch.int64), storable(torch.complex128)
        (True, True, False)
    """
    return dtype in _STORABLE


def bit_view(t: Tensor) -> Tensor:
    """``t`` viewed as integers of its item size (uint8, int16, int32, int64), no copy.

    Equal bits give equal integers, so ``bit_view(a) != bit_view(b)`` finds every element
    whose bits differ (NaN == NaN with one payload, ``-0.0 != 0.0``), and copying through
    the view copies bits exactly.

    Args:
        t: A tensor of a :func:`storable` dtype, on any device.

    Returns:
        A view of ``t``'s memory with the same shape.

    Raises:
        DtypeError: ``t``'s dtype is not storable.

    Example:
        >>> bit_view(torch.tensor([1.0], dtype=torch.bfloat16)).tolist()
        [16256]
    """
    if not storable(t.dtype):
        raise DtypeError(f"a replacement tensor cannot hold dtype {t.dtype} (spec §7 V6); "
                         "it stores dtypes of whole bytes that safetensors knows.")
    return t.view(_BITS[t.element_size()])


def changed_positions(old: Tensor, new: Tensor) -> Tensor:
    """Sorted flat positions (int64) where the bits of two 1-D tensors of one dtype differ.

    Args:
        old: 1-D contiguous tensor of a storable dtype, any device.
        new: Same shape, dtype and device.

    Returns:
        1-D int64 positions on the tensors' device.

    Example:
        >>> a = torch.zeros(6, dtype=torch.bfloat16)
        >>> b = torch.tensor([0, 0, 0, -0.0, 0, 1], dtype=torch.bfloat16)
        >>> changed_positions(a, b).tolist()
        [3, 5]
    """
    a, b = bit_view(old), bit_view(new)
    if a.device.type == "cpu":  # NumPy's compare + flatnonzero: about 3x torch's nonzero
        return torch.from_numpy(np.flatnonzero(a.numpy() != b.numpy()))
    return (a != b).nonzero().reshape(-1)


def check_replace(name: str, shape: Shape, indices: Tensor, values: Tensor) -> list[FormatError]:
    """Every rule a replacement entry breaks (V5-V9 of spec §7; values are not checked, V10).

    Example:
        >>> check_replace("w", (3,), torch.tensor([0, 2]), torch.tensor([1, 7]))
        []
        >>> [e.rule for e in check_replace("w", (3,), torch.tensor([2, 0]), torch.ones(2))]
        ['V9']
    """
    if not storable(values.dtype):
        return [DtypeError(f"{name!r}: replacement values must have a dtype of whole bytes "
                           f"that safetensors stores (spec §7 V6); found {values.dtype}.")]
    # The additive checks, on a float stand-in for the values (any bits are allowed here).
    stand_in = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    return check_entry(name, shape, indices, stand_in)


def _check(name: str, e: Entry) -> list[SpdeltaError]:
    problems: list[SpdeltaError] = []
    if isinstance(e, ReplaceTensor):
        problems += check_replace(name, e.shape, e.indices, e.values)
    elif isinstance(e, DeltaTensor):
        problems += check_entry(name, e.shape, e.indices, e.values)
    else:
        problems.append(TensorSetError(f"{name!r}: a patch entry must be a DeltaTensor or a "
                                       f"ReplaceTensor; found {type(e).__name__}."))
        return problems
    if e.indices.device != e.values.device:
        problems.append(ShapeError(f"{name!r}: indices and values must be on one device; "
                                   f"found {e.indices.device} and {e.values.device}."))
    return problems


class Patch(EntryMap[Entry]):
    """An immutable map from tensor name to an additive or replacing entry, with metadata.

    What a format 1.3 file holds: ``ReplaceTensor`` entries (``replace``: values copied
    bit for bit) and ``DeltaTensor`` entries (``raw``: values added, spec §6.4). The
    metadata is the file's ``str -> str`` metadata; ``spdelta.base_model.fingerprint`` and
    ``spdelta.result.fingerprint`` name the checkpoint it applies to and the one it gives.

    Args:
        tensors: Name -> ``ReplaceTensor`` or ``DeltaTensor``.
        metadata: ``str -> str`` metadata.

    Raises:
        FormatError: A subclass naming the broken rule, when an entry is invalid.

    Example:
        >>> p = Patch({"w": ReplaceTensor((4,), torch.tensor([3]), torch.tensor([7]))})
        >>> p.nnz, p["w"].values.dtype, p.replaced
        (1, torch.int64, ['w'])
    """

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, tensors: Mapping[str, Entry], *,
                 metadata: Mapping[str, str] | None = None) -> None:
        entries: dict[str, Entry] = {}
        problems: list[SpdeltaError] = []
        for name, e in tensors.items():
            if isinstance(e, DeltaTensor | ReplaceTensor):
                e = type(e)(tuple(e.shape), e.indices.long(), e.values)
            problems += _check(name, e)
            entries[name] = e
        if problems:
            raise _combine(problems)
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise MetadataError("Patch metadata must map str to str (spec §7 V4); "
                                "convert values with str().")
        self._tensors = MappingProxyType(dict(sorted(entries.items())))
        self._metadata = MappingProxyType(meta)

    @classmethod
    def _trusted(cls, entries: Mapping[str, Entry], metadata: Mapping[str, str]) -> Patch:
        """Build without validation, for entries produced by spdelta itself."""
        self = object.__new__(cls)
        self._tensors = MappingProxyType(dict(sorted(entries.items())))
        self._metadata = MappingProxyType(dict(metadata))
        return self

    @property
    def replaced(self) -> list[str]:
        """Names of the replacement entries, sorted."""
        return [n for n, e in self._tensors.items() if isinstance(e, ReplaceTensor)]

    @property
    def nnz(self) -> int:
        """Total number of stored entries."""
        return sum(e.nnz for e in self._tensors.values())

    def with_metadata(self, metadata: Mapping[str, str]) -> Patch:
        """The same entries with ``metadata`` replacing the current metadata."""
        return Patch._trusted(self._tensors, dict(metadata))

    def to(self, device: torch.device | str) -> Patch:
        """Move every entry's indices and values to ``device`` (values keep their dtype)."""
        entries = {n: type(e)(e.shape, e.indices.to(device), e.values.to(device))
                   for n, e in self._tensors.items()}
        return Patch._trusted(entries, self._metadata)

    def __eq__(self, other: object) -> bool:
        """Names, kinds, shapes, indices, dtypes and value bits equal (not metadata)."""
        if not isinstance(other, Patch):
            return NotImplemented
        if self.keys() != other.keys():
            return False
        return all(type(a) is type(b) and a.shape == b.shape and a.values.dtype == b.values.dtype
                   and torch.equal(a.indices, b.indices)
                   and torch.equal(bit_view(a.values), bit_view(b.values))
                   for a, b in zip(self._tensors.values(), other._tensors.values(), strict=True))

    def __repr__(self) -> str:
        return f"Patch({len(self)} tensors, {len(self.replaced)} replaced, nnz={self.nnz})"


def refuse_patch(delta: object, where: str, use: str) -> None:
    """Raise ``ParameterError`` when an additive-only tool is given a :class:`Patch`.

    Example:
        >>> refuse_patch(Patch({}), "apply_to_model", "spdelta.patch.apply_")
        Traceback (most recent call last):
        ...
        spdelta.errors.ParameterError: apply_to_model adds a SparseDelta; ...
    """
    if isinstance(delta, Patch):
        raise ParameterError(f"{where} adds a SparseDelta; a Patch (replacement tensors, format "
                             f"1.3) is copied, not added: use {use}.")
