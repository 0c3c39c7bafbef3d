"""Which rows of a batch use which delta, laid out for one block-diagonal product per layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spdelta.errors import ShapeError
from spdelta.serve._bank import Bank

__all__ = ["RowPlan", "add_products"]


class RowPlan:
    """The layout of a batch whose row ``b`` uses slot ``slots[b]`` (``None``: the base).

    The slots present are ``S`` (sorted); ``G`` is the most rows any of them has. Slot
    position ``(g, j)`` (``g < G``, ``j < len(S)``) holds the ``g``-th row using ``S[j]``;
    a slot with fewer rows repeats its first row there, and those padding positions are
    computed but never added back (``keep``). Rows using no delta are in no position, so
    their outputs are left exactly as the base computed them.

    Args:
        slots: One slot index (or ``None``) per row of the batch.

    Example:
        >>> plan = RowPlan([1, None, 0, 1])
        >>> plan.present, plan.groups, plan.src.tolist(), plan.dest.tolist()
        ([0, 1], 2, [2, 0, 2, 3], [2, 0, 3])
    """

    def __init__(self, slots: Sequence[int | None]) -> None:
        self.slots = list(slots)
        self.present = sorted({s for s in self.slots if s is not None})
        members = [[b for b, s in enumerate(self.slots) if s == k] for k in self.present]
        self.groups = max((len(m) for m in members), default=0)
        src, keep = [], []
        for g in range(self.groups):
            for m in members:
                src.append(m[g] if g < len(m) else m[0])
                keep.append(g < len(m))
        self.src = torch.tensor(src, dtype=torch.long)  # position (g, j) -> row
        self.keep = None if all(keep) else torch.tensor(keep).nonzero().flatten()
        self.dest = self.src if self.keep is None else self.src[self.keep]
        self._matrices: dict[int, Tensor | None] = {}
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor | None]] = {}
        self._expanded: dict[int, RowPlan] = {}
        self._last: tuple[Tensor, int, torch.dtype, Tensor] | None = None

    def grouped_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x`` laid out for the block product: ``(slots * in, groups * tokens)`` of ``dtype``.

        Column ``(g, t)`` of block ``j`` is token ``t`` of the row at position ``(g, j)``.
        Layers fed the same tensor (q, k and v; gate and up) share it: the last one is
        kept, with a reference to ``x`` so that its memory cannot be reused meanwhile.
        """
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version and last[2] == dtype:
            return last[3]
        src = self.on(x.device)[0]
        k, g, in_features = len(self.present), self.groups, x.shape[-1]
        x3 = x.reshape(x.shape[0], -1, in_features)  # (rows, tokens, in)
        tokens = x3.shape[1]
        picked = x3.index_select(0, src).view(g, k, tokens, in_features)
        xt = torch.empty((k, in_features, g, tokens), dtype=dtype, device=x.device)
        xt.copy_(picked.permute(1, 3, 0, 2))
        xt2 = xt.view(k * in_features, g * tokens)
        self._last = (x, x._version, dtype, xt2)
        return xt2

    def for_rows(self, rows: int) -> RowPlan:
        """This plan for a batch of ``rows``: itself, or each row repeated ``rows / len`` times.

        ``generate`` repeats each row ``m`` times in place (``repeat_interleave``) for
        ``num_return_sequences=m`` or beam search; the copies use their row's delta.

        Raises:
            ShapeError: ``rows`` is not a multiple of the number of rows planned.
        """
        if rows == len(self.slots):
            return self
        if rows == 0 or rows % len(self.slots):
            raise ShapeError(f"a batch of {rows} rows reached a layer, but deltas were given "
                             f"for {len(self.slots)} rows; pass one delta name (or None) per row.")
        if rows not in self._expanded:
            m = rows // len(self.slots)
            self._expanded[rows] = RowPlan([s for s in self.slots for _ in range(m)])
        return self._expanded[rows]

    def matrix(self, bank: Bank) -> Tensor | None:
        """``blockdiag(D_s for s in present)`` of ``bank``, built once; ``None`` if empty."""
        key = id(bank)
        if key not in self._matrices:
            empty = sum(bank.nnz[s] for s in self.present) == 0
            self._matrices[key] = None if empty else bank.subset(self.present)
        return self._matrices[key]

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(src, dest, keep)`` on ``device`` (copied once per device)."""
        if device not in self._on:
            keep = None if self.keep is None else self.keep.to(device)
            self._on[device] = (self.src.to(device), self.dest.to(device), keep)
        return self._on[device]


def add_products(y: Tensor, x: Tensor, matrix: Tensor, plan: RowPlan) -> Tensor:
    """Add each planned row's ``x[b] @ D_{slot(b)}^T`` to ``y[b]``: one sparse product.

    Args:
        y: The base layer output, shape ``(rows, ..., out)``; updated in place unless it
            requires a gradient.
        x: The layer input, shape ``(rows, ..., in)``.
        matrix: ``blockdiag(D_s for s in plan.present)``, CSR, values in the dtype the
            products are taken in (fp32, or fp64).
        plan: The row layout (for ``rows`` rows).

    Returns:
        ``y`` with the products added (the same tensor when updated in place).
    """
    _, dest, keep = plan.on(x.device)
    k, g, out_features = len(plan.present), plan.groups, y.shape[-1]
    xt = plan.grouped_input(x, matrix.dtype)  # (k * in, g * tokens)
    tokens = xt.shape[1] // g
    yt = torch.sparse.mm(matrix, xt)  # (k * out, g * tokens)
    ys = torch.empty((g, k, tokens, out_features), dtype=y.dtype, device=y.device)
    ys.copy_(yt.view(k, out_features, g, tokens).permute(2, 0, 3, 1))
    ys3 = ys.view(g * k, tokens, out_features)
    if keep is not None:
        ys3 = ys3.index_select(0, keep)
    if not y.is_contiguous() or (y.requires_grad and torch.is_grad_enabled()):
        return y.reshape(y.shape[0], tokens, out_features).index_add(0, dest, ys3).view(y.shape)
    y3 = y.view(y.shape[0], tokens, out_features)
    y3.index_add_(0, dest, ys3)
    return y
