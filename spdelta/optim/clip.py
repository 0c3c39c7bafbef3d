"""Gradient clipping by the global norm over all the values (``clip_grad_norm_``'s rule)."""

from __future__ import annotations

import torch
from torch import Tensor

from spdelta._ranks import full_tensor
from spdelta.errors import ParameterError
from spdelta.optim._base import Transform
from spdelta.types import Values

__all__ = ["clip_by_global_norm", "global_norm"]


def global_norm(grads: Values) -> Tensor:
    """The 2-norm of all the tensors of ``grads`` together, as ``clip_grad_norm_`` computes it.

    The norm of each tensor, then the norm of those norms (in that order, as
    ``torch.nn.utils.clip_grad_norm_``); sharded DTensors (FSDP) count whole.

    Args:
        grads: Name -> gradient tensor (any shape; empty tensors count 0).

    Returns:
        A 0-d tensor in the dtype the norms promote to (0 when ``grads`` is empty).

    Example:
        >>> import torch
        >>> float(global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([0.0, 4.0])}))
        5.0
    """
    # The norm of a sharded DTensor is a partial result; full_tensor() reduces it over ranks.
    norms = [full_tensor(torch.linalg.vector_norm(g, 2)) for g in grads.values()]
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)


def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale the gradients by ``min(1, max_norm / (norm + 1e-6))`` of their :func:`global_norm`.

    The rule of ``torch.nn.utils.clip_grad_norm_`` (the Hugging Face Trainer's
    ``max_grad_norm``) applied to the values of a sparse delta: the norm is over the
    trained entries only. Put it first in a :func:`~spdelta.optim.chain`, before the
    optimizer; it keeps no state (``None``).

    Args:
        max_norm: The largest global norm let through, ``> 0``.

    Returns:
        A :class:`~spdelta.optim.Transform`; ``update`` returns new gradient tensors.

    Raises:
        ParameterError: ``max_norm`` is not a positive finite number.

    Example:
        >>> import torch
        >>> from spdelta.optim import adamw, chain
        >>> clip = clip_by_global_norm(1.0)
        >>> g, _ = clip.update({"w": torch.tensor([3.0, 4.0])}, None, {})
        >>> [round(x, 4) for x in g["w"].tolist()]
        [0.6, 0.8]
        >>> opt = chain(clip_by_global_norm(1.0), adamw(1e-3))  # clip, then AdamW
    """
    if not 0 < max_norm < float("inf"):
        raise ParameterError(f"max_grad_norm: expected a positive finite number; found {max_norm}.")

    def init(params: Values) -> None:
        del params

    def update(grads: Values, state: None, params: Values) -> tuple[Values, None]:
        del params
        if not grads:
            return {}, state
        # A Python float multiplies plain tensors and DTensor shards alike, in their own dtype.
        coef = float(torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0))
        return {n: g * coef for n, g in grads.items()}, state

    return Transform(init, update)
