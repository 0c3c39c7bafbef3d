"""A delta kept on a linear module for good: a ``values`` parameter, a ``support`` buffer.

FSDP2 cannot be driven by ``functional_call`` (it swaps its own gathered parameters into
the modules), so there the module owns the delta it trains. It runs the same routed
forward as :class:`~spdelta.route.LinearRouter`; only where ``(indices, values)`` come
from differs.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from spdelta.errors import KeyMismatchError
from spdelta.route._linear import _kind, routed_forward

__all__ = ["AttachedDelta", "attach_delta", "attached_deltas"]


def _attached_forward(module: nn.Module, transposed: bool, input: Tensor) -> Tensor:  # noqa: A002
    return routed_forward(module, transposed, module.support, module.values,  # type: ignore[arg-type]
                          input)


def attach_delta(module: nn.Module, support: Tensor) -> None:
    """Give a plain linear a trainable sparse delta that its own forward applies.

    Adds a ``values`` parameter (zeros, the weight's dtype and device) and a ``support``
    buffer to ``module`` (so a model's state-dict names gain ``<m>.values`` and
    ``<m>.support``; ``<m>.weight`` and ``<m>.bias`` are unchanged) and sets its instance
    ``forward`` to :func:`routed_forward` over them. The module's other attributes,
    hooks and class are kept, so wrappers such as FSDP2's ``fully_shard`` see the same
    module. The values are trained by ordinary autograd on the module.

    Args:
        module: A plain ``nn.Linear`` or transformers ``Conv1D`` (see
            :class:`LinearRouter`); changed in place.
        support: 1-D int64 sorted unique flat indices into ``module.weight``.

    Raises:
        KeyMismatchError: ``module`` is not a plain linear, or already has a delta.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> attach_delta(lin, torch.tensor([1]))
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_(), lin.values.fill_(3.0)
        >>> lin(torch.ones(1, 2)).tolist(), sorted(dict(lin.named_parameters()))
        ([[3.0]], ['values', 'weight'])
    """
    transposed = _kind(module)
    if transposed is None or "forward" in module.__dict__:
        raise KeyMismatchError(
            f"attach_delta: {type(module).__name__} is not a plain nn.Linear or Conv1D without "
            "a delta; deltas attach to the weight of such a layer only.")
    w = cast(Tensor, module.weight)
    module.values = nn.Parameter(torch.zeros(support.numel(), dtype=w.dtype, device=w.device))
    module.register_buffer("support", support.to(w.device, torch.int64))
    module.forward = partial(_attached_forward, module, transposed)  # type: ignore[method-assign]


class AttachedDelta(NamedTuple):
    """A delta that :func:`attach_delta` put on a module.

    Attributes:
        module: The module; its ``values`` parameter is read from it at call time (FSDP2
            swaps sharded and gathered parameters in and out).
        support: The module's ``support`` buffer itself (write it in place to move the
            support, e.g. on SpIEL regrowth).
        shape: The dense shape of the weight.
    """

    module: nn.Module
    support: Tensor
    shape: tuple[int, ...]


def attached_deltas(model: nn.Module) -> dict[str, AttachedDelta]:
    """Weight name -> its :class:`AttachedDelta`, for each module given one by :func:`attach_delta`.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> attach_delta(model[1], torch.tensor([0]))
        >>> {n: (d.support.tolist(), d.shape) for n, d in attached_deltas(model).items()}
        {'1.weight': ([0], (2, 2))}
    """
    out = {}
    for n, m in model.named_modules():
        forward = m.__dict__.get("forward")
        if isinstance(forward, partial) and forward.func is _attached_forward:
            out[f"{n}.weight" if n else "weight"] = AttachedDelta(
                m, cast(Tensor, m.support), tuple(cast(Tensor, m.weight).shape))
    return out
