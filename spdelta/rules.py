"""The rules every other module follows, in one place: budget, top-k, accumulation dtype, keys.

Nothing here imports another spdelta module: it sits at the bottom of the import graph, so
the delta maths, the file format, training and the tools all take these rules from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EXT_PREFIX",
    "KEY_BASE_MISMATCH",
    "KEY_BASE_MODEL",
    "KEY_FINGERPRINT",
    "KEY_PRODUCER",
    "KEY_PROVENANCE",
    "KEY_RESULT_FINGERPRINT",
    "KEY_REVISION",
    "KEY_TENSORS",
    "KEY_TRAINING",
    "KEY_VERSION",
    "KNOWN_KEYS",
    "PREFIX",
    "accumulate_dtype",
    "budget",
    "topk_indices",
]

#: Reserved metadata namespace of a delta file, and the extension namespace readers ignore
#: (spec §5).
PREFIX = "spdelta."
EXT_PREFIX = "spdelta.ext."
KEY_VERSION = "spdelta.format_version"
KEY_TENSORS = "spdelta.tensors"
KEY_BASE_MODEL = "spdelta.base_model"
KEY_REVISION = "spdelta.base_model.revision"
KEY_FINGERPRINT = "spdelta.base_model.fingerprint"
KEY_BASE_MISMATCH = "spdelta.base_model.mismatch"
KEY_PRODUCER = "spdelta.producer"
KEY_PROVENANCE = "spdelta.provenance"
KEY_TRAINING = "spdelta.training"
KEY_RESULT_FINGERPRINT = "spdelta.result.fingerprint"
#: Every reserved key this library knows; any other ``spdelta.*`` key outside
#: ``spdelta.ext.*`` is refused by the writer (spec V4).
KNOWN_KEYS = frozenset(
    {
        KEY_BASE_MISMATCH,
        KEY_VERSION,
        KEY_TENSORS,
        KEY_BASE_MODEL,
        KEY_REVISION,
        KEY_FINGERPRINT,
        KEY_PRODUCER,
        KEY_PROVENANCE,
        KEY_TRAINING,
        KEY_RESULT_FINGERPRINT,
    }
)


def budget(fraction: float, n: int) -> int:
    """Number of entries a ``fraction`` of ``n`` keeps: ``min(n, floor(fraction * n + 0.5))``.

    The one budget rule of spdelta: ``SparseDelta.from_dense``, selection, SpIEL's
    support, ``prune``, the merge methods and ``extract`` all round this way. mergekit
    uses ``max(1, int(fraction * n))`` instead (see ``tools/compare_mergekit.py``).

    Args:
        fraction: Share of the entries to keep, normally in ``[0, 1]`` (not checked here:
            each caller checks its own argument and names it in its error).
        n: Number of entries drawn from, ``>= 0``.

    Returns:
        The number of entries kept, in ``[0, n]`` for a fraction in ``[0, 1]``.

    Example:
        >>> budget(0.5, 5), budget(0.01, 10), budget(1.0, 7)
        (3, 0, 7)
    """
    return min(n, math.floor(fraction * n + 0.5))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are taken in for a tensor of ``dtype``: fp64 for fp64, else fp32.

    Merges, optimizer states, scores and dequantised values all accumulate in it, then
    cast back to the stored dtype.

    Args:
        dtype: The dtype of the base tensor (or of the values being summed).

    Returns:
        ``torch.float64`` for ``torch.float64``, else ``torch.float32``.

    Example:
        >>> accumulate_dtype(torch.bfloat16), accumulate_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Sorted int64 indices of the ``k`` largest entries of 1-D ``scores``; ties to the lower index.

    The one top-k rule: ties at the threshold go to the lower flat index, so a selection
    is deterministic and the same on every device.

    Args:
        scores: 1-D float tensor of any length (NaN ranks above every number).
        k: Number of entries to keep; ``<= 0`` keeps none, ``>= scores.numel()`` keeps all.

    Returns:
        A 1-D int64 tensor of ``min(max(k, 0), scores.numel())`` strictly increasing
        positions, on ``scores.device``.

    Example:
        >>> topk_indices(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist()
        [1, 2]
    """
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if k >= scores.numel() or bool(torch.isnan(scores).any()):
        # A stable descending sort keeps equal scores in index order: deterministic ties.
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return torch.sort(order).values
    # Same result without sorting all of ``scores`` (9x faster for k << numel): take
    # everything above the k-th largest value, then the lowest-index entries equal to it.
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > kth).nonzero().flatten()
    ties = (scores == kth).nonzero().flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values
