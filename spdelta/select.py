"""Scores -> supports: exact top-k selection, global or per tensor, by density, k or LoRA budget."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from spdelta.errors import ParameterError, ShapeError
from spdelta.rules import accumulate_dtype, budget
from spdelta.types import Shape, Support

__all__ = ["budgets", "lora_budget", "select_topk"]

Scope = Literal["global", "per_tensor"]
_RADIX = 16  # bits per selection pass: 2 passes for fp32 scores, 4 for fp64


def lora_budget(shape: Shape, rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on a 2-D weight: ``rank * (rows + cols)``.

    A fused 3-D expert tensor ``(experts, rows, cols)`` counts one LoRA per expert,
    ``experts * rank * (rows + cols)`` (what peft's ``target_parameters`` trains on it).
    Other tensors (norms, 1-D) get no LoRA, so their budget is 0.

    Example:
        >>> lora_budget((64, 32), 8), lora_budget((4, 64, 32), 8)
        (768, 3072)
    """
    if len(shape) == 3:
        return shape[0] * rank * (shape[1] + shape[2])
    return rank * (shape[0] + shape[1]) if len(shape) == 2 else 0


def budgets(
    shapes: Mapping[str, Shape],
    *,
    density: float | None = None,
    k: int | None = None,
    lora_rank: int | None = None,
    scope: Scope = "global",
) -> dict[str, int]:
    """Number of entries :func:`select_topk` keeps; ``{"": total}`` for the global scope.

    Budgets: ``density`` -> :func:`spdelta.rules.budget` of the entries drawn from,
    ``floor(density * numel + 0.5)``; ``k`` -> ``k``;
    ``lora_rank=r`` -> ``sum(r * (rows + cols))`` over the 2-D tensors (one term per
    expert of a 3-D expert tensor; per tensor: that tensor's terms). Every budget is
    capped at the number of entries it draws from.

    Args:
        shapes: Name -> dense shape.
        density: Fraction in ``[0, 1]``.
        k: Number of entries, ``>= 0``.
        lora_rank: LoRA rank ``r >= 0`` whose trainable-parameter count to match.
        scope: ``"global"`` (one budget over all tensors) or ``"per_tensor"``.

    Returns:
        ``{"": total}`` for ``"global"``, else name -> budget.

    Raises:
        ParameterError: Not exactly one of ``density``, ``k``, ``lora_rank``, or one is out
            of range, or ``scope`` is unknown.

    Example:
        >>> budgets({"a": (4, 4), "b": (4,)}, lora_rank=1)
        {'': 8}
    """
    given = [x for x in (density, k, lora_rank) if x is not None]
    if len(given) != 1:
        raise ParameterError(
            "select_topk: pass exactly one of density, k, lora_rank; "
            f"found density={density}, k={k}, lora_rank={lora_rank}."
        )
    if density is not None and not 0.0 <= density <= 1.0:
        raise ParameterError(f"select_topk: density must lie in [0, 1]; found {density}.")
    if (k is not None and k < 0) or (lora_rank is not None and lora_rank < 0):
        raise ParameterError(
            f"select_topk: k and lora_rank must be >= 0; found k={k}, lora_rank={lora_rank}."
        )
    if scope not in ("global", "per_tensor"):
        raise ParameterError(
            f"select_topk: scope must be 'global' or 'per_tensor'; found {scope!r}."
        )
    numel = {n: math.prod(s) for n, s in shapes.items()}

    def raw(names: Sequence[str]) -> int:
        if density is not None:
            return budget(density, sum(numel[n] for n in names))
        if k is not None:
            return k
        return sum(lora_budget(tuple(shapes[n]), lora_rank or 0) for n in names)

    if scope == "global":
        return {"": min(raw(list(shapes)), sum(numel.values()))}
    return {n: min(raw([n]), numel[n]) for n in shapes}


def _keys(scores: Tensor) -> Tensor:
    """Int64 keys whose signed order is the float order of ``scores`` (flattened)."""
    s = scores.detach().reshape(-1)
    s = s.to(accumulate_dtype(s.dtype))  # compared in fp32 (fp64 scores as they are)
    s = s + 0.0  # -0.0 + 0.0 == +0.0: equal scores get equal keys
    if s.dtype == torch.float64:
        bits = s.view(torch.int64)
        return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    bits32 = s.view(torch.int32)
    return (bits32 ^ ((bits32 >> 31) & 0x7FFFFFFF)).to(torch.int64)


def _kth_key(tensors: Sequence[Tensor], k: int, nbits: int) -> tuple[int, int]:
    """Radix-select the ``k``-th largest key over ``tensors`` (``1 <= k <= total``).

    Returns ``(key, take)``: the threshold key and how many entries equal to it are
    taken. Memory is one key tensor of the tensor being scanned, never a concatenation.
    """
    prefix, remaining = 0, k
    for shift in range(nbits - _RADIX, -1, -_RADIX):
        counts = torch.zeros(1 << _RADIX, dtype=torch.int64)
        for t in tensors:
            key = _keys(t)
            if shift == nbits - _RADIX:
                digit = (key >> shift) + (1 << (_RADIX - 1))  # signed top digit -> [0, 2^16)
            else:
                key = key[(key >> (shift + _RADIX)) == prefix]
                digit = (key >> shift) & ((1 << _RADIX) - 1)
            counts += torch.bincount(digit, minlength=1 << _RADIX).cpu()
        from_top = counts.flip(0).cumsum(0)  # entries with digit >= 65535 - j
        j = int(torch.searchsorted(from_top, torch.tensor([remaining])).item())
        d = (1 << _RADIX) - 1 - j
        remaining -= int(from_top[j]) - int(counts[d])
        if shift == nbits - _RADIX:
            prefix = d - (1 << (_RADIX - 1))
        else:
            prefix = (prefix << _RADIX) + d
    return prefix, remaining


def _select(scores: Mapping[str, Tensor], names: Sequence[str], k: int) -> Support:
    """Top-``k`` over the named tensors together; ties to earlier name, then lower index."""
    total = sum(scores[n].numel() for n in names)
    if k >= total or k == 0:
        return {
            n: torch.arange(scores[n].numel() if k else 0, device=scores[n].device) for n in names
        }
    nbits = 64 if any(scores[n].dtype == torch.float64 for n in names) else 32
    tensors = [scores[n] if nbits == 32 else scores[n].to(torch.float64) for n in names]
    threshold, take = _kth_key(tensors, k, nbits)
    out: Support = {}
    for n, t in zip(names, tensors, strict=True):
        key = _keys(t)
        mask = key > threshold
        equal = torch.nonzero(key == threshold).reshape(-1)[:take]
        take -= equal.numel()
        mask[equal] = True
        out[n] = torch.nonzero(mask).reshape(-1)
    return out


def select_topk(
    scores: Mapping[str, Tensor],
    *,
    density: float | None = None,
    k: int | None = None,
    lora_rank: int | None = None,
    shapes: Mapping[str, Shape | torch.Size] | None = None,
    scope: Scope = "global",
) -> Support:
    """Keep the highest-scoring entries: name -> sorted int64 flat indices.

    Exactly the budget is selected (see :func:`budget`): with ``scope="global"`` the
    total over all tensors, with ``"per_tensor"`` each tensor's own. Ties are broken
    deterministically: among equal scores, entries of the tensor whose name sorts
    first win, then lower flat indices (``-0.0`` equals ``0.0``). The global top-k is
    exact and never concatenates the scores: an MSD radix select over the float bits
    (16 bits per pass, one pass over every tensor each) finds the k-th largest score.

    Args:
        scores: Name -> dense scores (any shape, float dtype; higher = keep). NaN is
            rejected.
        density: Fraction in ``[0, 1]`` of entries to keep.
        k: Number of entries to keep (capped at the number available).
        lora_rank: Keep as many entries as a rank-``r`` LoRA on the same tensors has
            parameters: ``sum(r * (rows + cols))`` over the 2-D tensors.
        shapes: Name -> dense shape used for the LoRA budget when ``scores`` are
            flattened; defaults to each score tensor's shape.
        scope: ``"global"`` or ``"per_tensor"``.

    Returns:
        Name -> 1-D int64 sorted unique flat row-major indices, for every name in
        ``scores`` (possibly empty), on the scores' device.

    Raises:
        ParameterError: Bad budget arguments, or NaN scores.
        ShapeError: A ``shapes`` entry does not have the score's number of elements.

    Example:
        >>> import torch
        >>> s = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.9, 0.2])}
        >>> {n: i.tolist() for n, i in select_topk(s, k=3).items()}
        {'a': [1, 2], 'b': [0]}
        >>> {n: i.tolist() for n, i in select_topk(s, k=1, scope="per_tensor").items()}
        {'a': [1], 'b': [0]}

    References:
        Liu et al., "Refining Salience-Aware Sparse Fine-Tuning Strategies for
        Language Models", ACL 2025, https://arxiv.org/abs/2412.13488
    """
    names = sorted(scores)
    dense = {
        n: tuple(shapes[n]) if shapes is not None and n in shapes else tuple(scores[n].shape)
        for n in names
    }
    bad = [n for n in names if math.prod(dense[n]) != scores[n].numel()]
    if bad:
        raise ShapeError(
            f"select_topk: shapes of [{', '.join(map(repr, bad[:10]))}] do not match "
            "the number of scores; pass the dense shape of each scored tensor."
        )
    nan = [n for n in names if scores[n].is_floating_point() and bool(torch.isnan(scores[n]).any())]
    if nan:
        raise ParameterError(
            f"select_topk: scores of [{', '.join(map(repr, nan[:10]))}] contain "
            "NaN; check the calibration data and the metric."
        )
    counts = budgets(dense, density=density, k=k, lora_rank=lora_rank, scope=scope)
    if scope == "global":
        return _select(scores, names, counts[""])
    out: Support = {}
    for n in names:
        out.update(_select(scores, [n], counts[n]))
    return out
