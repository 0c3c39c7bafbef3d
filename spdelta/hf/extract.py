"""Extract a sparse delta from a fully fine-tuned checkpoint: the top-k of ``tuned - base``."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor

from spdelta.delta import DeltaTensor, SparseDelta
from spdelta.errors import KeyMismatchError, ShapeError, format_names
from spdelta.format.constants import KEY_FINGERPRINT
from spdelta.hf.checkpoint import checkpoint_fingerprint, checkpoint_shards
from spdelta.rules import KEY_PROVENANCE, accumulate_dtype, budget, topk_indices

__all__ = ["extract_delta"]


def _pairs(base: Path, tuned: Path, pattern: str | None) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(name, base tensor, tuned tensor)`` for every floating tensor, one at a time."""
    b_shards, t_shards = checkpoint_shards(base), checkpoint_shards(tuned)
    b_keys = {k: s for s, ks in b_shards.items() for k in ks}
    t_keys = {k: s for s, ks in t_shards.items() for k in ks}
    if b_keys.keys() != t_keys.keys():
        raise KeyMismatchError(
            f"base and tuned checkpoints hold different tensors: only in base "
            f"[{format_names(b_keys.keys() - t_keys.keys())}], only in tuned "
            f"[{format_names(t_keys.keys() - b_keys.keys())}]; extract needs the same architecture."
        )
    regex = re.compile(pattern) if pattern else None
    for shard, keys in b_shards.items():
        with safe_open(str(base / shard), framework="pt") as fb:
            for key in keys:
                if regex is not None and not regex.search(key):
                    continue
                w = fb.get_tensor(key)
                if not w.dtype.is_floating_point:
                    continue
                with safe_open(str(tuned / t_keys[key]), framework="pt") as ft:
                    v = ft.get_tensor(key)
                if v.shape != w.shape:
                    raise ShapeError(
                        f"{key!r}: base has shape {list(w.shape)}, tuned has "
                        f"{list(v.shape)}; extract needs the same architecture."
                    )
                yield key, w, v


def _diff(w: Tensor, v: Tensor) -> Tensor:
    acc = accumulate_dtype(w.dtype)
    return (v.to(acc) - w.to(acc)).reshape(-1)


def _nonzero_entry(shape: tuple[int, ...], diff: Tensor, idx: Tensor) -> DeltaTensor:
    idx = idx[diff[idx] != 0]  # a zero delta carries nothing: drop it
    return DeltaTensor(shape, idx, diff[idx])


def _global_threshold(
    pairs: Iterator[tuple[str, Tensor, Tensor]], density: float
) -> tuple[float, int]:
    """The |diff| of the k-th largest entry over all tensors, and how many tie at it."""
    best = torch.zeros(0, dtype=torch.float64)
    numel = 0
    for _, w, v in pairs:
        numel += w.numel()
        k = budget(density, numel)
        mags = torch.cat([best, _diff(w, v).abs().double()])
        best = torch.topk(mags, min(k, mags.numel())).values
    k = budget(density, numel)
    if k == 0 or best.numel() == 0:
        return math.inf, 0
    threshold = float(best[k - 1])
    return threshold, int((best == threshold).sum())


def extract_delta(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    *,
    density: float,
    scope: Literal["per_tensor", "global"] = "per_tensor",
    targets: str | None = None,
) -> SparseDelta:
    """The sparse delta that best approximates a full fine-tune: top-|tuned - base|.

    Tensors are streamed one at a time. ``per_tensor`` keeps
    ``floor(density * numel + 0.5)`` entries of each tensor; ``global`` keeps that
    many over all considered tensors together (two passes; ties at the threshold go
    to earlier tensors in name order, then lower indices). Entries whose difference
    is exactly zero are dropped, so a tensor may keep fewer. Differences are taken
    in fp32 (fp64 for fp64 weights) and stored in that dtype.

    Args:
        base: Directory of the base safetensors checkpoint.
        tuned: Directory of the fine-tuned checkpoint (same tensors and shapes).
        density: Fraction in ``[0, 1]`` of entries to keep.
        scope: ``"per_tensor"`` or ``"global"`` budget.
        targets: Optional regex; only tensor names it matches (``re.search``) count.

    Returns:
        A ``SparseDelta`` with the fingerprint of the ``base`` checkpoint
        (``spdelta.base_model.fingerprint``, spec §5.1) and provenance metadata.

    Raises:
        CheckpointError, KeyMismatchError, ShapeError, ValueError (bad density/scope).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> save_file({"w": torch.zeros(4)}, a + "/model.safetensors")
        >>> save_file({"w": torch.tensor([0.0, 2.0, 0.1, 0.0])}, b + "/model.safetensors")
        >>> extract_delta(a, b, density=0.25)["w"].indices.tolist()
        [1]
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"extract: density must lie in [0, 1]; found {density}.")
    if scope not in ("per_tensor", "global"):
        raise ValueError(f"extract: scope must be 'per_tensor' or 'global'; found {scope!r}.")
    root_b, root_t = Path(base), Path(tuned)
    threshold, ties = math.inf, 0
    if scope == "global":
        threshold, ties = _global_threshold(_pairs(root_b, root_t, targets), density)
    entries = {}
    for key, w, v in _pairs(root_b, root_t, targets):
        diff = _diff(w, v)
        if scope == "per_tensor":
            idx = topk_indices(diff.abs(), budget(density, diff.numel()))
        else:
            above, at = diff.abs() > threshold, torch.nonzero(diff.abs() == threshold).reshape(-1)
            take, ties = at[:ties], ties - min(ties, at.numel())
            idx = torch.sort(torch.cat([torch.nonzero(above).reshape(-1), take])).values
        entry = _nonzero_entry(tuple(w.shape), diff, idx)
        if entry.nnz:
            entries[key] = entry
    meta = {
        KEY_FINGERPRINT: checkpoint_fingerprint(root_b),
        KEY_PROVENANCE: json.dumps(
            {"tool": "extract", "density": density, "scope": scope, "targets": targets},
            sort_keys=True,
        ),
    }
    return SparseDelta(entries, metadata=meta)
