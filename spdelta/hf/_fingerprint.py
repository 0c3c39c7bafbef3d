"""The base-model fingerprint (spec §5.1) of a checkpoint directory or of a loaded model."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn

from spdelta.format.fingerprint import fingerprint_tensors
from spdelta.hf._layout import checkpoint_tensors
from spdelta.hf.checkpoint import checkpoint_fingerprint

__all__ = ["fingerprint"]


def fingerprint(source: nn.Module | Mapping[str, Tensor] | str | os.PathLike[str]) -> str:
    """The base fingerprint (``base1:<32 hex>``, spec §5.1) of a model or checkpoint.

    Every delta made for one base carries the same fingerprint, whatever its targets:
    it covers every tensor of the checkpoint (names, dtypes, shapes and 1,024 elements
    each at exact integer positions). A loaded model gives the fingerprint of the
    checkpoint ``save_pretrained`` would write for it (tied tensors once), so a model
    loaded in its checkpoint's dtype and the checkpoint directory agree. A model
    loaded in another dtype (e.g. ``dtype=torch.bfloat16`` from an fp32 checkpoint) is
    another base: its fingerprint differs.

    Args:
        source: A checkpoint directory, an ``nn.Module``, or checkpoint name -> tensor.

    Returns:
        ``"base1:"`` followed by 32 hex digits.

    Raises:
        CheckpointError: A directory without a readable safetensors checkpoint.
        ParameterError: A tensor on the meta device, or of a dtype safetensors cannot hold.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> fingerprint(lin) == fingerprint({"weight": lin.weight, "bias": lin.bias})
        True
    """
    if isinstance(source, nn.Module):
        return fingerprint_tensors(checkpoint_tensors(source))
    if isinstance(source, Mapping):
        return fingerprint_tensors(source)
    return checkpoint_fingerprint(source)
