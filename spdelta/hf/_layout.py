"""A loaded model's tensors under the names and layout its checkpoint stores them in."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["checkpoint_tensors"]


def _storage_key(t: Tensor) -> tuple[object, ...]:
    """Equal for two views of the same memory with the same layout (tied weights)."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def checkpoint_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint name -> tensor: what ``save_pretrained`` writes for ``model``.

    The model's state dict (parameters and persistent buffers; not non-persistent
    buffers such as Llama's ``inv_freq``), minus the keys the model declares as not
    saved (``_keys_to_ignore_on_save``), with each group of tied tensors (one memory,
    e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``) counted once under the
    name that comes first in the state dict, as ``save_pretrained`` keeps it. This is
    the one place that maps a loaded model to checkpoint names; the fingerprint of a
    model (spec §5.1) is computed over exactly these tensors.

    Args:
        model: Any ``nn.Module``; a Hugging Face ``PreTrainedModel`` for checkpoint names.

    Returns:
        Name -> tensor (views of the model's own memory, detached; nothing is copied).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> sorted(checkpoint_tensors(torch.nn.ModuleDict({"a": lin, "b": lin})))
        ['a.bias', 'a.weight']
    """
    state = model.state_dict(keep_vars=False)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    out: dict[str, Tensor] = {}
    seen: set[tuple[object, ...]] = set()
    for name, t in state.items():
        key = _storage_key(t)
        if t.numel() and t.device.type != "meta" and key in seen:
            continue  # a tied alias of a tensor already kept
        seen.add(key)
        out[name] = t
    return out
