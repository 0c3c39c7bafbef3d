"""Route delta'd ``nn.Linear`` and ``Conv1D`` weights to the sparse-delta linear kernel.

One mechanism for every way a delta reaches a linear: the module's instance ``forward``
is set to :func:`routed_forward`, which runs :func:`spdelta.kernels.sparse_delta_linear`
on the module's (unmerged) ``weight`` and a delta's ``(indices, values)``. Where those come
from is the only difference: :class:`LinearRouter` passes them for one ``functional_call``
(``make_loss_fn``'s fast path), and :func:`spdelta.route.attach_delta` keeps them on the
module (FSDP2 training, where the module must own what it trains).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import Tensor, nn

from spdelta.kernels import sparse_delta_linear

__all__ = [
    "LinearRouter", "is_plain_linear", "routed_forward", "swapped_forwards",
]


def routed_forward(module: nn.Module, transposed: bool, indices: Tensor, values: Tensor,
                   input: Tensor) -> Tensor:  # noqa: A002
    """``module``'s output with a sparse delta on its weight: ``x (W + D)^T + b``.

    ``module.weight`` is read at call time: the base that ``functional_call`` swapped in,
    or the parameter FSDP2 has just gathered.

    Args:
        module: A plain ``nn.Linear`` (``transposed=False``) or transformers ``Conv1D``
            (``transposed=True``, weight stored ``(in, out)``).
        transposed: Whether the weight is stored ``(in, out)``.
        indices: 1-D int64 sorted flat positions into ``module.weight``.
        values: 1-D values at ``indices`` (may be ``torch.func``-wrapped).
        input: ``(..., in_features)``.

    Returns:
        ``(..., out_features)``, as the module's own forward with the merged weight.

    Example:
        >>> import torch
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.zero_()
        >>> routed_forward(lin, False, torch.tensor([1]), torch.tensor([2.0]),
        ...                torch.ones(1, 2)).tolist()
        [[2.0]]
    """
    return sparse_delta_linear(input, module.weight, module.bias, indices,  # type: ignore[arg-type]
                               values, transposed=transposed)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether a delta on ``module.weight`` can be routed: a plain ``nn.Linear`` or ``Conv1D``.

    Example:
        >>> is_plain_linear(nn.Linear(2, 2)), is_plain_linear(nn.Embedding(2, 2))
        (True, False)
    """
    return _kind(module) is not None


def _kind(module: nn.Module) -> bool | None:
    """``False`` for a plain ``nn.Linear``, ``True`` for transformers' ``Conv1D``, else ``None``.

    Plain means the class does not override ``forward``: ``F.linear(x, W, b)``, or for
    ``Conv1D`` (weight stored ``(in, out)``) ``x @ W + b``.
    """
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return False
    for base in cls.__mro__:  # ``Conv1D`` itself, matched by name: no transformers import
        if base.__name__ == "Conv1D" and base.__module__.startswith("transformers"):
            return True if cls.forward is base.forward else None  # type: ignore[attr-defined]
    return None


class LinearRouter:
    """Finds the linear weights of a model that can take the fast path.

    A weight is eligible when its module is a plain ``nn.Linear`` (its class does
    not override ``forward``, so it computes ``F.linear(x, weight, bias)``) or a plain
    transformers ``Conv1D`` (GPT-2's transposed linear, ``x @ weight + bias``), and the
    weight is not shared (tied) with any other parameter name, so the merged
    weight is used by that module's forward only.

    Mechanism: :meth:`patch` sets an instance attribute ``forward`` on each routed
    module for the duration of one ``functional_call`` and removes it in
    ``finally``. ``nn.Module.__call__`` looks ``forward`` up on the instance, so
    hooks still run. The patched forward reads ``module.weight`` (the base tensor
    that ``functional_call`` swapped in) and closes over this call's
    ``(indices, values)``, which may be ``torch.func``-wrapped tensors. Like
    ``functional_call`` itself, this mutates the module during the call: do not
    run two loss functions on the *same* module object from different threads
    at once.

    Args:
        model: The module whose linears may be routed.

    Example:
        >>> import torch
        >>> LinearRouter(torch.nn.Sequential(torch.nn.Linear(2, 2))).names
        frozenset({'0.weight'})
    """

    def __init__(self, model: nn.Module) -> None:
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self._modules: dict[str, tuple[nn.Module, bool]] = {
            (f"{name}.weight" if name else "weight"): (m, kind)
            for name, m in model.named_modules()
            if (kind := _kind(m)) is not None and uses[id(m.weight)] == 1
        }

    @property
    def names(self) -> frozenset[str]:
        """State-dict names of the weights that can take the fast path."""
        return frozenset(self._modules)

    @contextmanager
    def patch(self, deltas: Mapping[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Route each ``name -> (indices, values)`` through the fast linear while open.

        Args:
            deltas: Weight name (one of :attr:`names`) -> ``(indices, values)``:
                1-D int64 sorted flat positions and the 1-D values.
        """
        forwards = []
        for name, (indices, values) in deltas.items():
            module, transposed = self._modules[name]
            forwards.append((module, partial(routed_forward, module, transposed, indices, values)))
        with swapped_forwards(forwards):
            yield


@contextmanager
def swapped_forwards(forwards: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Set each module's instance ``forward`` while open; restore the previous one after.

    ``nn.Module.__call__`` looks ``forward`` up on the instance, so hooks still run.

    Args:
        forwards: ``(module, forward)`` pairs; ``forward(input)`` replaces the module's.

    Example:
        >>> import torch
        >>> lin = nn.Linear(1, 1)
        >>> with swapped_forwards([(lin, lambda x: x * 0 + 7)]):
        ...     inside = lin(torch.ones(1, 1)).item()
        >>> inside, "forward" in lin.__dict__
        (7.0, False)
    """
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, forward in forwards:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward  # type: ignore[method-assign]
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
