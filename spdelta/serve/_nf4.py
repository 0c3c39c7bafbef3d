"""Quantise a model's linear weights to NF4 in place, for serving deltas on a 4-bit base."""

from __future__ import annotations

from torch import nn

from spdelta.quant.nf4 import is_nf4, to_nf4
from spdelta.serve._load import linear_targets

__all__ = ["quantize_nf4"]


def quantize_nf4(model: nn.Module, *, block_size: int = 64) -> list[str]:
    """Replace every untied linear weight but the output head's with a 4-bit NF4 tensor.

    What QLoRA quantises: the linear layers of the blocks; the embeddings, norms and
    the output head stay as they are. A weight whose number of values is not a
    multiple of ``block_size`` is left dense. The model keeps one 4-bit copy (the
    dense weight is released); each forward dequantises per op (``torchao``).
    :class:`~spdelta.serve.DeltaModel` serves deltas per row on such a model; load
    the deltas first, since a base fingerprint is taken over the dense weights.

    Args:
        model: The model, changed in place.
        block_size: Values per absmax scale (see :func:`spdelta.quant.to_nf4`).

    Returns:
        The names of the weights now in NF4.

    Raises:
        SpdeltaError: ``torchao`` is not installed.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
        >>> quantize_nf4(model)  # doctest: +SKIP
        ['0.weight']
    """
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    skip = id(getattr(head, "weight", None))
    done = []
    for name, t in linear_targets(model).items():
        weight = t.weight
        if id(weight) == skip or is_nf4(weight) or weight.numel() % block_size:
            continue
        q = to_nf4({name: weight.detach()}, [name], block_size=block_size)[name]
        t.module.weight = nn.Parameter(q, requires_grad=False)
        done.append(name)
    return done
