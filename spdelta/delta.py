"""``SparseDelta``: an immutable map from tensor name to ``(shape, indices, values)``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from spdelta.errors import (
    DtypeError,
    FormatError,
    IndexOrderError,
    IndexRangeError,
    KeyMismatchError,
    LengthError,
    MetadataError,
    NonFiniteError,
    ShapeError,
    SpdeltaError,
    TensorSetError,
    format_names,
)
from spdelta.rules import budget, topk_indices
from spdelta.types import Shape

__all__ = ["DeltaTensor", "EntryMap", "SparseDelta", "check_entry", "numel_of"]

#: Separator between a tensor name and its part in a file; never in a state-dict name.
SEPARATOR = "::"


class DeltaTensor(NamedTuple):
    """One delta'd tensor.

    Attributes:
        shape: The dense shape of the tensor the delta applies to.
        indices: 1-D int64, flat row-major positions, strictly increasing.
        values: 1-D float tensor, same length as ``indices``.
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


def numel_of(shape: Shape) -> int:
    """Return the number of elements of ``shape`` as a Python int (no overflow).

    Example:
        >>> numel_of((2, 3))
        6
    """
    return math.prod(shape)


def check_entry(name: str, shape: Shape, indices: Tensor, values: Tensor) -> list[FormatError]:
    """Return every rule the entry ``name`` breaks (empty when it is valid).

    Checks V5 (name), V6 (rank and dtype), V7 (lengths), V8 (range), V9 (order)
    and V10 (finite values) of ``spec/format.md``. Indices may be any integer dtype.

    Args:
        name: State-dict name of the tensor.
        shape: Dense shape the indices address.
        indices: 1-D integer tensor of flat row-major positions.
        values: 1-D floating tensor.

    Returns:
        A list of errors, in rule order; empty when the entry is valid.

    Example:
        >>> import torch
        >>> check_entry("w", (4,), torch.tensor([1, 3]), torch.tensor([0.5, 1.0]))
        []
    """
    out: list[FormatError] = []
    if not isinstance(name, str) or not name or SEPARATOR in name:
        out.append(
            TensorSetError(
                f"{name!r}: a tensor name must be a non-empty str without {SEPARATOR!r} "
                "(spec §7 V5); rename the tensor."
            )
        )
    bad_shape = not isinstance(shape, tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    )
    if bad_shape:
        out.append(
            MetadataError(
                f"{name!r}: shape must be a tuple of non-negative ints "
                f"(spec §7 V4); found {shape!r}."
            )
        )
    if indices.dim() != 1 or values.dim() != 1:
        out.append(
            DtypeError(
                f"{name!r}: indices and values must be 1-D (spec §7 V6); found "
                f"indices of shape {tuple(indices.shape)} and values of shape "
                f"{tuple(values.shape)}."
            )
        )
        return out
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        out.append(
            DtypeError(
                f"{name!r}: indices must be an integer tensor (spec §7 V6); "
                f"found {indices.dtype}. Convert with .long()."
            )
        )
    if not values.dtype.is_floating_point:
        out.append(
            DtypeError(
                f"{name!r}: values must be a floating tensor (spec §7 V6); "
                f"found {values.dtype}. Convert with .float()."
            )
        )
    if indices.numel() != values.numel():
        out.append(
            LengthError(
                f"{name!r}: indices and values must have the same length (spec §7 V7); "
                f"found {indices.numel()} indices and {values.numel()} values."
            )
        )
    if out or bad_shape or indices.numel() == 0:
        return out
    idx = indices.long()
    numel = numel_of(shape)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= numel:
        bad = int(((idx < 0) | (idx >= numel)).sum())
        out.append(
            IndexRangeError(
                f"{name!r}: indices must lie in [0, {numel}) for shape {list(shape)} (spec §7 V8); "
                f"found {bad} outside (min {low}, max {high}). Check the shape or the indices."
            )
        )
    unordered = int((idx[1:] <= idx[:-1]).sum())
    if unordered:
        out.append(
            IndexOrderError(
                f"{name!r}: indices must be strictly increasing (spec §7 V9); found {unordered} "
                "positions unsorted or duplicated. Sort them and sum duplicates."
            )
        )
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        out.append(
            NonFiniteError(
                f"{name!r}: values must be finite (spec §7 V10); "
                f"found {bad} NaN or infinite values."
            )
        )
    return out


E = TypeVar("E")


class EntryMap(Generic[E]):
    """The read-only mapping protocol of :class:`SparseDelta`, ``QuantizedDelta`` and
    ``Patch``: entries by tensor name (sorted) and ``str -> str`` metadata.

    Not a ``Mapping`` (``SparseDelta.values`` is a property); subclasses set ``_tensors``
    and ``_metadata`` (read-only views) in their constructor.
    """

    __slots__ = ("_tensors", "_metadata")
    _tensors: Mapping[str, E]
    _metadata: Mapping[str, str]

    def __getitem__(self, name: str) -> E:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return list(self._tensors)

    def items(self) -> list[tuple[str, E]]:
        """``(name, entry)`` pairs, sorted by name."""
        return list(self._tensors.items())

    @property
    def metadata(self) -> dict[str, str]:
        """A copy of the ``str -> str`` metadata."""
        return dict(self._metadata)


class SparseDelta(EntryMap[DeltaTensor]):
    """An immutable map from a state-dict name to a sparse delta on that tensor.

    Each entry is a :class:`DeltaTensor` ``(shape, indices, values)``: ``indices``
    are 1-D int64 flat row-major positions into a tensor of ``shape``, strictly
    increasing, and ``values`` are the 1-D float deltas at those positions. The
    dense delta of an entry is ``zeros(shape).flatten().index_put(indices, values)``.

    Tensors are held, not copied: do not modify them in place after construction.

    Args:
        tensors: Name -> ``DeltaTensor`` or ``(shape, indices, values)``.
        metadata: Free-form ``str -> str`` metadata (kept as file metadata on save).

    Raises:
        FormatError: A subclass naming the broken rule, when an entry is invalid.

    Example:
        >>> import torch
        >>> d = SparseDelta({"w": ((2, 3), torch.tensor([0, 4]), torch.tensor([1.0, -2.0]))})
        >>> d.nnz, d.to_dense("w").tolist()
        (2, [[1.0, 0.0, 0.0], [0.0, -2.0, 0.0]])
    """

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        tensors: Mapping[str, DeltaTensor | tuple[Shape, Tensor, Tensor]],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        entries: dict[str, DeltaTensor] = {}
        problems: list[SpdeltaError] = []
        for name, (shape, indices, values) in tensors.items():
            shape = tuple(int(s) if isinstance(s, int) else s for s in shape)
            problems += check_entry(name, shape, indices, values)
            if indices.device != values.device:
                problems.append(
                    ShapeError(
                        f"{name!r}: indices and values must be on one device; "
                        f"found {indices.device} and {values.device}."
                    )
                )
            entries[name] = DeltaTensor(shape, indices.long(), values)
        if problems:
            raise _combine(problems)
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError("SparseDelta metadata must map str to str; convert values with str().")
        self._tensors = MappingProxyType(dict(sorted(entries.items())))
        self._metadata = MappingProxyType(meta)

    @classmethod
    def _trusted(cls, entries: dict[str, DeltaTensor], metadata: Mapping[str, str]) -> SparseDelta:
        """Build without validation, for entries produced by spdelta itself."""
        self = object.__new__(cls)
        self._tensors = MappingProxyType(dict(sorted(entries.items())))
        self._metadata = MappingProxyType(dict(metadata))
        return self

    @classmethod
    def from_support(
        cls,
        support: Mapping[str, Tensor],
        values: Mapping[str, Tensor],
        shapes: Mapping[str, Shape | torch.Size],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> SparseDelta:
        """Build a delta from a support dict, a values dict and the dense shapes.

        Args:
            support: Name -> 1-D int64 sorted indices.
            values: Name -> 1-D values aligned with ``support`` (same keys).
            shapes: Name -> dense shape; may hold more names than ``support``
                (e.g. ``{n: p.shape for n, p in base.items()}``).
            metadata: Optional ``str -> str`` metadata.

        Example:
            >>> import torch
            >>> one = {"w": torch.ones(1)}
            >>> d = SparseDelta.from_support({"w": torch.tensor([1])}, one, {"w": (2,)})
            >>> d.nnz
            1
        """
        if set(support) != set(values):
            raise KeyMismatchError(
                f"support and values must have the same names; only in support: "
                f"[{format_names(set(support) - set(values))}], only in values: "
                f"[{format_names(set(values) - set(support))}]."
            )
        return cls(
            {n: (tuple(shapes[n]), support[n], values[n]) for n in support}, metadata=metadata
        )

    @classmethod
    def from_dense(
        cls,
        tensors: Mapping[str, Tensor],
        *,
        density: float | None = None,
        k: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> SparseDelta:
        """Keep the top-|x| entries of each dense tensor.

        Without ``density`` or ``k`` every non-zero entry is kept. With one of them,
        exactly ``k`` (or ``floor(density * numel + 0.5)``) entries of each tensor
        are kept, zeros included if needed; ties go to the lower flat index.

        Args:
            tensors: Name -> dense float tensor of any shape.
            density: Fraction in ``[0, 1]`` of entries to keep per tensor.
            k: Number of entries to keep per tensor (capped at numel).
            metadata: Optional ``str -> str`` metadata.

        Returns:
            A ``SparseDelta`` whose values keep each tensor's dtype.

        Example:
            >>> import torch
            >>> d = SparseDelta.from_dense({"w": torch.tensor([[0.1, -3.0], [2.0, 0.0]])}, k=2)
            >>> d["w"].indices.tolist(), d["w"].values.tolist()
            ([1, 2], [-3.0, 2.0])
        """
        if density is not None and k is not None:
            raise ValueError("from_dense: pass density or k, not both.")
        if density is not None and not 0.0 <= density <= 1.0:
            raise ValueError(f"from_dense: density must lie in [0, 1]; found {density}.")
        if k is not None and k < 0:
            raise ValueError(f"from_dense: k must be >= 0; found {k}.")
        entries = {}
        for name, x in tensors.items():
            flat = x.detach().reshape(-1)
            if density is None and k is None:
                idx = torch.nonzero(flat).reshape(-1)
            else:
                kk = budget(density, flat.numel()) if density is not None else (k or 0)
                idx = topk_indices(flat.abs(), min(kk, flat.numel()))
            entries[name] = (tuple(x.shape), idx, flat[idx])
        return cls(entries, metadata=metadata)

    @property
    def values(self) -> dict[str, Tensor]:
        """Name -> 1-D values (a new dict; the tensors are shared)."""
        return {n: e.values for n, e in self._tensors.items()}

    @property
    def support(self) -> dict[str, Tensor]:
        """Name -> 1-D int64 sorted indices (a new dict; the tensors are shared)."""
        return {n: e.indices for n, e in self._tensors.items()}

    @property
    def shapes(self) -> dict[str, Shape]:
        """Name -> dense shape."""
        return {n: e.shape for n, e in self._tensors.items()}

    @property
    def nnz(self) -> int:
        """Total number of stored entries over all tensors."""
        return sum(e.nnz for e in self._tensors.values())

    @property
    def numel(self) -> int:
        """Total number of dense elements over all tensors."""
        return sum(e.numel for e in self._tensors.values())

    def to_dense(self, name: str) -> Tensor:
        """Return the dense delta of ``name``: zeros of its shape with the values scattered in.

        Example:
            >>> import torch
            >>> d = SparseDelta({"b": ((3,), torch.tensor([2]), torch.tensor([5.0]))})
            >>> d.to_dense("b").tolist()
            [0.0, 0.0, 5.0]
        """
        e = self._tensors[name]
        out = torch.zeros(e.numel, dtype=e.values.dtype, device=e.values.device)
        out[e.indices] = e.values
        return out.view(e.shape)

    def with_values(self, values: Mapping[str, Tensor]) -> SparseDelta:
        """Return a delta with the same support and new values for the named tensors.

        Example:
            >>> import torch
            >>> d = SparseDelta({"b": ((3,), torch.tensor([2]), torch.tensor([5.0]))})
            >>> d.with_values({"b": torch.tensor([1.0])})["b"].values.tolist()
            [1.0]
        """
        entries = dict(self._tensors)
        for name, v in values.items():
            e = entries[name]
            entries[name] = DeltaTensor(e.shape, e.indices, v)
        return SparseDelta(entries, metadata=self._metadata)

    def with_metadata(self, metadata: Mapping[str, str]) -> SparseDelta:
        """Return the same delta with ``metadata`` replacing the current metadata."""
        return SparseDelta._trusted(dict(self._tensors), metadata)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseDelta:
        """Move indices and values to ``device`` and cast values to ``dtype``."""
        entries = {
            n: DeltaTensor(e.shape, e.indices.to(device), e.values.to(device, dtype))
            for n, e in self._tensors.items()
        }
        return SparseDelta._trusted(entries, self._metadata)

    def __eq__(self, other: object) -> bool:
        """Exact equality of names, shapes, indices, value dtypes and values (not metadata)."""
        if not isinstance(other, SparseDelta):
            return NotImplemented
        if self.keys() != other.keys():
            return False
        return all(
            a.shape == b.shape
            and a.values.dtype == b.values.dtype
            and torch.equal(a.indices, b.indices)
            and torch.equal(a.values, b.values)
            for a, b in zip(self._tensors.values(), other._tensors.values(), strict=True)
        )

    def __repr__(self) -> str:
        numel = self.numel
        density = self.nnz / numel if numel else 0.0
        return f"SparseDelta({len(self)} tensors, nnz={self.nnz}, density={density:.4g})"


def _combine(problems: Sequence[SpdeltaError]) -> SpdeltaError:
    """One error of the first problem's class whose message lists every problem (max 10)."""
    first = problems[0]
    if len(problems) == 1:
        return first
    lines = [str(p) for p in problems[:10]]
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    err = type(first)(f"{len(problems)} problems:\n  " + "\n  ".join(lines) + more)
    return err
