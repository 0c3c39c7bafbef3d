"""A loaded model's tensors under the names and layout its checkpoint stores them in."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from spdelta.hf.layout import CheckpointLayout, state_tensors

__all__ = ["checkpoint_tensors"]


def checkpoint_tensors(model: nn.Module) -> Mapping[str, Tensor]:
    """Checkpoint name -> tensor: what ``save_pretrained`` writes for ``model``.

    The tensors of :func:`spdelta.hf.layout.state_tensors` (the state dict without
    ignored keys, each group of tied tensors once), under the checkpoint's names and in
    its layout: where transformers converts weights at load time (a mixture-of-experts
    model's fused 3-D experts), the per-expert tensors ``save_pretrained`` writes,
    computed lazily one conversion group at a time (see
    :class:`spdelta.hf.layout.CheckpointLayout`). This is the one place that maps a
    loaded model to checkpoint names; the fingerprint of a model (spec §5.1) is computed
    over exactly these tensors.

    Args:
        model: Any ``nn.Module``; a Hugging Face ``PreTrainedModel`` for checkpoint names.

    Returns:
        Name -> tensor: views of the model's own memory, detached, except converted
        tensors (computed on access).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> sorted(checkpoint_tensors(torch.nn.ModuleDict({"a": lin, "b": lin})))
        ['a.bias', 'a.weight']
    """
    stored = state_tensors(model)
    layout = CheckpointLayout(model)
    return stored if layout.is_identity else layout.checkpoint_tensors(stored)
