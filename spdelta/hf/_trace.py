"""A tensor stand-in that records where entries move, for tracing weight-layout conversions.

Transformers describes how a checkpoint's tensors become a model's parameters (and back)
as a chain of operations: stack a list of per-expert matrices, concatenate, chunk,
transpose, squeeze. Those operations only move entries. :class:`Trace` stands in for a
tensor of a given shape but holds only a few tracked entries (their coordinates and an
id each); transformers' own operations move it through ``__torch_function__``, so the
result says where each tracked entry lands. Memory is proportional to the tracked
entries, never to the tensor: it is right for 3-D expert tensors of billions of entries.

Example:
    >>> import torch
    >>> a = Trace.of(("a",), (2, 3), torch.tensor([4]), torch.tensor([7]))  # entry (1, 1)
    >>> b = Trace.of(("b",), (2, 3), torch.tensor([], dtype=torch.long),
    ...              torch.tensor([], dtype=torch.long))
    >>> t = torch.stack([a, b]).transpose(0, 1)  # (2, 2, 3): entry now at (1, 0, 1)
    >>> t.shape, t.flat_indices().tolist(), t.ids.tolist(), t.sources
    (torch.Size([2, 2, 3]), [7], [7], ('a', 'b'))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Trace", "UntraceableError"]


class UntraceableError(Exception):
    """A conversion uses an operation that does not only move entries (or is not known)."""


def _unravel(flat: Tensor, shape: Sequence[int]) -> Tensor:
    """Flat row-major positions (n,) -> coordinates (n, len(shape)), int64."""
    coords = torch.empty(flat.numel(), len(shape), dtype=torch.long)
    rest = flat.to(torch.long)
    for d in range(len(shape) - 1, -1, -1):
        coords[:, d] = rest % shape[d] if shape[d] else 0
        rest = rest // max(shape[d], 1)
    return coords


def _ravel(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Coordinates (n, len(shape)) -> flat row-major positions (n,), int64."""
    flat = torch.zeros(coords.shape[0], dtype=torch.long)
    for d, size in enumerate(shape):
        flat = flat * size + coords[:, d]
    return flat


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class Trace:
    """Stands in for a tensor of ``shape``; tracks some of its entries as they move.

    Attributes:
        shape: The shape of the tensor it stands for.
        coords: ``(n, ndim)`` int64 coordinates of the tracked entries.
        ids: ``(n,)`` int64 caller-chosen id of each tracked entry.
        sources: Names of the tensors whose entries make up this one (sorted).
    """

    __slots__ = ("coords", "ids", "shape", "sources")

    def __init__(self, shape: Sequence[int], coords: Tensor, ids: Tensor,
                 sources: Sequence[str]) -> None:
        self.shape = torch.Size(shape)
        self.coords, self.ids = coords, ids
        self.sources = tuple(sorted(set(sources)))

    @classmethod
    def of(cls, sources: Sequence[str], shape: Sequence[int], flat: Tensor, ids: Tensor) -> Trace:
        """A trace of ``shape`` tracking the entries at flat positions ``flat`` as ``ids``."""
        return cls(shape, _unravel(flat, shape), ids.to(torch.long), sources)

    def flat_indices(self) -> Tensor:
        """Flat row-major positions of the tracked entries, in tracking order."""
        return _ravel(self.coords, self.shape)

    def _like(self, shape: Sequence[int], coords: Tensor, ids: Tensor | None = None) -> Trace:
        return Trace(shape, coords, self.ids if ids is None else ids, self.sources)

    # -- the tensor surface conversion operations use ------------------------------------
    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def dim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        """The shape, or its size along ``dim``."""
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        """Number of entries of the tensor it stands for."""
        return math.prod(self.shape)

    def contiguous(self, *args: Any, **kwargs: Any) -> Trace:
        """Itself: memory layout does not move entries."""
        return self

    clone = detach = to = contiguous

    def narrow(self, dim: int, start: int, length: int) -> Trace:
        """Entries with ``start <= coord[dim] < start + length``, shifted to 0."""
        dim = _dim(dim, self.ndim)
        keep = (self.coords[:, dim] >= start) & (self.coords[:, dim] < start + length)
        coords = self.coords[keep].clone()
        coords[:, dim] -= start
        shape = list(self.shape)
        shape[dim] = length
        return self._like(shape, coords, self.ids[keep])

    def split(self, split_size: int | Sequence[int], dim: int = 0) -> tuple[Trace, ...]:
        """As ``torch.split``."""
        dim, n = _dim(dim, self.ndim), self.shape[_dim(dim, self.ndim)]
        sizes = ([split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
                 if isinstance(split_size, int) else list(split_size))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(self.narrow(dim, s, size) for s, size in zip(starts, sizes, strict=True))

    def chunk(self, chunks: int, dim: int = 0) -> tuple[Trace, ...]:
        """As ``torch.chunk``: pieces of ``ceil(n / chunks)`` (the last may be smaller)."""
        n = self.shape[_dim(dim, self.ndim)]
        return self.split(max(1, -(-n // chunks)), dim)

    def transpose(self, dim0: int, dim1: int) -> Trace:
        """Swap two dimensions."""
        order = list(range(self.ndim))
        a, b = _dim(dim0, self.ndim), _dim(dim1, self.ndim)
        order[a], order[b] = order[b], order[a]
        return self.permute(*order)

    def t(self) -> Trace:
        """Transpose of a 2-D tensor."""
        return self.transpose(0, 1)

    def permute(self, *dims: Any) -> Trace:
        """Reorder the dimensions."""
        order = [_dim(d, self.ndim) for d in (dims[0] if len(dims) == 1 and
                                                 not isinstance(dims[0], int) else dims)]
        return self._like([self.shape[d] for d in order], self.coords[:, order])

    def squeeze(self, dim: int | None = None) -> Trace:
        """Drop size-1 dimensions (only ``dim`` when given)."""
        drop = ([d for d in range(self.ndim) if self.shape[d] == 1] if dim is None
                else [_dim(dim, self.ndim)] if self.shape[_dim(dim, self.ndim)] == 1 else [])
        keep = [d for d in range(self.ndim) if d not in drop]
        return self._like([self.shape[d] for d in keep], self.coords[:, keep])

    def unsqueeze(self, dim: int) -> Trace:
        """Insert a size-1 dimension at ``dim``."""
        dim = dim + self.ndim + 1 if dim < 0 else dim
        shape = list(self.shape)
        shape.insert(dim, 1)
        zeros = torch.zeros(self.coords.shape[0], 1, dtype=torch.long)
        return self._like(shape, torch.cat([self.coords[:, :dim], zeros, self.coords[:, dim:]], 1))

    def reshape(self, *shape: Any) -> Trace:
        """Row-major reshape (a ``-1`` is inferred)."""
        dims = list(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = self.numel() // max(known, 1)
        if math.prod(dims) != self.numel():
            raise UntraceableError(f"reshape of {list(self.shape)} to {dims}")
        return self._like(dims, _unravel(self.flat_indices(), dims))

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Trace:
        """Merge dimensions ``start_dim..end_dim``."""
        a, b = _dim(start_dim, self.ndim), _dim(end_dim, self.ndim)
        return self.reshape(*self.shape[:a], math.prod(self.shape[a:b + 1]), *self.shape[b + 1:])

    def __getitem__(self, key: Any) -> Trace:
        keys = key if isinstance(key, tuple) else (key,)
        out, dim = self, 0
        for k in keys:
            if isinstance(k, int):
                out = out.narrow(dim, k % out.shape[dim], 1).squeeze(dim)
            elif isinstance(k, slice) and k.step in (None, 1):
                start, stop, _ = k.indices(out.shape[dim])
                out, dim = out.narrow(dim, start, max(0, stop - start)), dim + 1
            else:
                raise UntraceableError(f"indexing with {k!r}")
        return out

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.stack, torch.cat, torch.concat, torch.concatenate):
            return _join(list(args[0]), kwargs.get("dim", args[1] if len(args) > 1 else 0),
                         new_dim=func is torch.stack)
        method = _FUNCTIONS.get(func)
        if method is None:
            raise UntraceableError(getattr(func, "__name__", repr(func)))
        return getattr(args[0], method)(*args[1:], **kwargs)


_FUNCTIONS: dict[Any, str] = {
    torch.chunk: "chunk", torch.split: "split", torch.narrow: "narrow",
    torch.transpose: "transpose", torch.permute: "permute", torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", torch.flatten: "flatten",
    torch.t: "t", Tensor.contiguous: "contiguous", Tensor.clone: "clone",
}


def _join(parts: list[Trace], dim: int, *, new_dim: bool) -> Trace:
    """``torch.stack`` (``new_dim``) or ``torch.cat`` of traces along ``dim``."""
    if not all(isinstance(p, Trace) for p in parts):
        raise UntraceableError("stack/cat of a trace with a real tensor")
    if new_dim:
        parts = [p.unsqueeze(dim) for p in parts]
    dim = _dim(dim, parts[0].ndim)
    coords, offset = [], 0
    for p in parts:
        c = p.coords.clone()
        c[:, dim] += offset
        coords.append(c)
        offset += p.shape[dim]
    shape = list(parts[0].shape)
    shape[dim] = offset
    sources = [s for p in parts for s in p.sources]
    return Trace(shape, torch.cat(coords) if coords else parts[0].coords,
                 torch.cat([p.ids for p in parts]), sources)
