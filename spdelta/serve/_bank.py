"""Every loaded delta of one linear layer, held as one block-diagonal CSR matrix.

Block ``k`` of the matrix (rows ``k*out .. (k+1)*out``, columns ``k*in .. (k+1)*in``)
is the delta ``D_k`` of slot ``k`` in ``(out, in)`` orientation. A batch whose rows use
the slots ``S`` multiplies the blocks of ``S`` with their rows' inputs in ONE sparse
product: ``Y = blockdiag(D_S) @ X`` where column ``(g, t)`` of block ``j`` holds token
``t`` of the ``g``-th row that uses slot ``S[j]``. Why this form (measured on the CPU,
2 threads, SmolLM2 shapes, 8 deltas at 1 %, 16 rows) is in ``tools/bench/serve_kernels.py``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Bank", "Part", "block_matrix", "part_from_indices"]


class Part(NamedTuple):
    """One delta on one linear, in ``(out, in)`` orientation, CSR by output row.

    Attributes:
        crow: ``(out + 1,)`` row pointers (row ``r``'s entries are ``crow[r]:crow[r+1]``).
        cols: ``(nnz,)`` input-feature index of each entry, ascending within a row.
        values: ``(nnz,)`` the delta values.
    """

    crow: Tensor
    cols: Tensor
    values: Tensor


def part_from_indices(indices: Tensor, values: Tensor, out_features: int, in_features: int,
                      *, transposed: bool, index_dtype: torch.dtype) -> Part:
    """Turn flat indices into the weight (as stored) into a :class:`Part`.

    Args:
        indices: 1-D int64 flat row-major positions into the stored weight, sorted.
        values: 1-D values, same length.
        out_features: Output features of the layer.
        in_features: Input features of the layer.
        transposed: The weight is stored ``(in, out)`` (GPT-2 ``Conv1D``), not ``(out, in)``.
        index_dtype: ``torch.int32`` or ``torch.int64`` for ``crow`` and ``cols``.

    Returns:
        The part; entries sorted by output row, then input feature.

    Example:
        >>> p = part_from_indices(torch.tensor([1, 4]), torch.tensor([1.0, 2.0]), 2, 3,
        ...                       transposed=False, index_dtype=torch.int64)
        >>> p.crow.tolist(), p.cols.tolist()
        ([0, 1, 2], [1, 1])
    """
    if transposed:  # stored (in, out): entry (i, o) is row o, column i of D
        rows, cols = indices % out_features, torch.div(indices, out_features, rounding_mode="floor")
        order = torch.argsort(rows * in_features + cols)
        rows, cols, values = rows[order], cols[order], values[order]
    else:
        rows, cols = torch.div(indices, in_features, rounding_mode="floor"), indices % in_features
    bounds = torch.arange(out_features + 1, device=indices.device)
    crow = torch.searchsorted(rows, bounds)
    return Part(crow.to(index_dtype), cols.to(index_dtype), values)


def block_matrix(parts: list[Part], out_features: int, in_features: int) -> Tensor:
    """The block-diagonal CSR matrix ``blockdiag(D_0, D_1, ...)`` of ``parts``.

    Args:
        parts: One :class:`Part` per block, all with the same index dtype, value dtype
            and device.
        out_features: Rows of each block.
        in_features: Columns of each block.

    Returns:
        A ``torch.sparse_csr`` tensor of shape ``(len(parts) * out, len(parts) * in)``.

    Example:
        >>> a = part_from_indices(torch.tensor([0]), torch.tensor([5.0]), 1, 2,
        ...                       transposed=False, index_dtype=torch.int64)
        >>> block_matrix([a, a], 1, 2).to_dense().tolist()
        [[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]]
    """
    crows, cols, offset = [parts[0].crow[:1]], [], 0
    for k, p in enumerate(parts):
        crows.append(p.crow[1:] + offset)
        cols.append(p.cols + k * in_features)
        offset += int(p.cols.numel())
    values = torch.cat([p.values for p in parts])
    shape = (len(parts) * out_features, len(parts) * in_features)
    with warnings.catch_warnings():  # torch warns (once) that CSR support is in beta.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.cat(crows), torch.cat(cols), values, shape,
                                       check_invariants=False)


class Bank:
    """The deltas of one linear layer, one block per loaded delta (a slot).

    Args:
        out_features: Output features of the layer.
        in_features: Input features of the layer.
        parts: One :class:`Part` per slot (``None`` where that delta leaves the layer alone).
        dtype: Value dtype of the products (fp32, or fp64 for an fp64 model).
        device: Where the matrix lives (the layer's device).
    """

    def __init__(self, out_features: int, in_features: int, parts: list[Part | None],
                 *, dtype: torch.dtype, device: torch.device) -> None:
        self.out_features, self.in_features = out_features, in_features
        self.dtype, self.device = dtype, device
        self.nnz = [0 if p is None else int(p.cols.numel()) for p in parts]
        self.starts = [sum(self.nnz[:k]) for k in range(len(parts) + 1)]  # block k's entries
        self.index_dtype = _index_dtype(len(parts), out_features, in_features, sum(self.nnz))
        full = [self._fill(p) for p in parts]
        self.matrix = block_matrix(full, out_features, in_features)

    def _fill(self, p: Part | None) -> Part:
        if p is None:
            empty = torch.zeros(0, dtype=self.index_dtype, device=self.device)
            return Part(torch.zeros(self.out_features + 1, dtype=self.index_dtype,
                                    device=self.device), empty,
                        torch.zeros(0, dtype=self.dtype, device=self.device))
        return Part(p.crow.to(self.device, self.index_dtype), p.cols.to(self.device,
                    self.index_dtype), p.values.to(self.device, self.dtype))

    @property
    def slots(self) -> int:
        """Number of blocks (loaded deltas)."""
        return len(self.nnz)

    def part(self, slot: int) -> Part:
        """Block ``slot`` as a :class:`Part` (views of the matrix where possible)."""
        crow = self.matrix.crow_indices()
        start, end = self.starts[slot], self.starts[slot + 1]
        return Part(crow[slot * self.out_features:(slot + 1) * self.out_features + 1] - start,
                    self.matrix.col_indices()[start:end] - slot * self.in_features,
                    self.matrix.values()[start:end])

    def parts(self) -> list[Part | None]:
        """Every block as a :class:`Part` (``None`` for an empty one)."""
        return [self.part(k) if n else None for k, n in enumerate(self.nnz)]

    def subset(self, slots: list[int]) -> Tensor:
        """``blockdiag(D_s for s in slots)``: the matrix itself when ``slots`` is every slot."""
        if slots == list(range(self.slots)):
            return self.matrix
        return block_matrix([self.part(s) for s in slots], self.out_features, self.in_features)

    def flat_entries(self, slot: int, *, transposed: bool) -> tuple[Tensor, Tensor]:
        """``(indices, values)`` of block ``slot`` as flat int64 positions into the stored weight.

        Three small ops on views of the matrix (it runs once per layer on every swap).
        The rows come from ``torch._convert_indices_from_csr_to_coo`` (what
        ``Tensor.to_sparse_coo`` uses): ``repeat_interleave`` of the row counts gives the
        same rows but starts a parallel region for any size, which took 12 ms (median,
        9 us at best) per call on a busy 2-core machine against 10 us for this.
        """
        crow, out_f, in_f = self.matrix.crow_indices(), self.out_features, self.in_features
        start, end = self.starts[slot], self.starts[slot + 1]
        cols = self.matrix.col_indices()[start:end]  # slot * in + c
        rows = torch._convert_indices_from_csr_to_coo(  # r, int64
            crow[slot * out_f:(slot + 1) * out_f + 1] - start, cols, out_int32=False)[0]
        if transposed:  # stored (in, out): c * out + r
            flat = torch.add(rows, cols, alpha=out_f).sub_(slot * in_f * out_f)
        else:  # r * in + c
            flat = torch.add(cols, rows, alpha=in_f).sub_(slot * in_f)
        return flat, self.matrix.values()[start:end]


def _index_dtype(slots: int, out_features: int, in_features: int, nnz: int) -> torch.dtype:
    """int32 (what MKL and cuSPARSE run fastest) unless a position could overflow it."""
    biggest = max(slots * max(out_features, in_features), nnz) + 1
    return torch.int32 if biggest < 2**31 else torch.int64
