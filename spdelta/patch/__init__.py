"""Exact patches: ``diff`` two checkpoints or state dicts, apply bit for bit, chain by fingerprint.

A patch (format 1.3) holds, per changed tensor, the positions whose bits changed and their
new values in the tensor's own dtype (:class:`ReplaceTensor`), with the fingerprints of
the checkpoint it applies to and of the one it gives (spec §5.1). Applying it reproduces
the tuned checkpoint bit for bit, every dtype (NaN payloads, ``-0.0``, subnormals, inf);
applied to any other step of a chain it is refused before anything is written.

- :func:`diff` / :func:`apply_`: tensors in memory (a live model, CPU or CUDA).
- :func:`diff_checkpoints` / :func:`apply_patch`: checkpoints on disk, one tensor at a
  time (``spdelta diff`` and ``spdelta apply``).
- :func:`compose_patches`: one patch for a chain of them (spec §6.5).

Example:
    >>> import torch
    >>> old = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    >>> new = {"w": torch.tensor([0.0, float("nan"), -0.0], dtype=torch.bfloat16)}
    >>> p = diff(old, new)
    >>> p["w"].indices.tolist()
    [1, 2]
    >>> bit_view(apply_(old, p)["w"]).tolist() == bit_view(new["w"]).tolist()
    True
"""

from spdelta._replace import Patch, ReplaceTensor, bit_view
from spdelta.format import load_patch
from spdelta.patch._apply_files import apply_patch
from spdelta.patch._diff_files import diff_checkpoints
from spdelta.patch._memory import apply_, compose_patches, diff, diff_tensor

__all__ = [
    "Patch",
    "ReplaceTensor",
    "apply_",
    "apply_patch",
    "bit_view",
    "compose_patches",
    "diff",
    "diff_checkpoints",
    "diff_tensor",
    "load_patch",
]
