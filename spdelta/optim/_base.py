"""Pure optimizer transforms: ``(init, update)`` pairs over dicts of value tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple, TypeAlias, get_type_hints

import torch
from torch import Tensor

from spdelta.types import Support, Values, is_plain

__all__ = ["EntryValues", "StateSupport", "Transform", "apply_updates", "chain",
           "empty_like_flat", "is_state", "state_fields"]

#: Annotation of an optimizer-state field that holds one entry per delta value (name ->
#: 1-D tensor aligned with the support): a support change remaps it entry by entry.
EntryValues: TypeAlias = Annotated[Values, "spdelta.per_entry"]
#: Annotation of an optimizer-state field that holds the support itself (name -> indices):
#: a support change replaces it with the new support.
StateSupport: TypeAlias = Annotated[Support, "spdelta.support"]

InitFn = Callable[[Values], Any]
UpdateFn = Callable[[Values, Any, Values], tuple[Values, Any]]


class Transform(NamedTuple):
    """A stateful gradient transform as two pure functions (optax style).

    Attributes:
        init: ``init(params) -> state``; ``params`` maps name -> 1-D values.
        update: ``update(grads, state, params) -> (updates, new_state)``; the new
            parameters are ``apply_updates(params, updates)``. Never mutates inputs.
    """

    init: InitFn
    update: UpdateFn


def is_state(x: object) -> bool:
    """Whether ``x`` is a state record: a ``NamedTuple`` instance (not a plain tuple).

    Example:
        >>> from spdelta.optim import AdamWState
        >>> is_state(AdamWState({}, {}, {})), is_state(({}, {}))
        (True, False)
    """
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


@functools.cache
def state_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fields of a state class annotated :data:`EntryValues` and :data:`StateSupport`.

    An optimizer state (a ``NamedTuple``) says in its annotations which fields follow
    the support; everything that moves or stores states generically
    (:func:`~spdelta.optim.remap_state`, the training checkpoints) reads them here, so a
    new optimizer needs no change elsewhere. The class must be defined at module level
    (its annotations are resolved in its module).

    Args:
        cls: A ``NamedTuple`` class.

    Returns:
        ``(per_entry, support)``: field names, in declaration order.

    Example:
        >>> from spdelta.optim import AdamWState, SM3State
        >>> state_fields(AdamWState), state_fields(SM3State)
        ((('steps', 'mu', 'nu'), ()), (('momentum',), ('support',)))
    """
    hints = get_type_hints(cls, include_extras=True)
    names = getattr(cls, "_fields", ())

    def marked(tag: str) -> tuple[str, ...]:
        return tuple(f for f in names if tag in getattr(hints.get(f), "__metadata__", ()))

    return marked("spdelta.per_entry"), marked("spdelta.support")


def apply_updates(params: Values, updates: Values) -> Values:
    """Return ``{n: params[n] + updates[n]}`` (new tensors, in each param's dtype).

    The results are views into one new buffer per dtype and device (see
    :func:`empty_like_flat`); the inputs are not modified.

    Example:
        >>> import torch
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})["w"].tolist()
        [1.5, 0.0]
    """
    out = empty_like_flat(params)
    for n, p in params.items():
        out[n].copy_(p).add_(updates[n].to(p.dtype))
    return out


def empty_like_flat(tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Values:
    """New uninitialised tensors shaped like ``tensors``: views into one buffer per dtype, device.

    An optimizer step replaces its whole state, and a sparse delta has many small
    tensors (a 1 % delta of a Llama block is seven of 3k-7k entries). Made one by one,
    each is a small heap allocation that lands in a hole left by backward's transients,
    and the old state leaves new holes when freed: on the ``train_step`` benchmark the
    process kept ~9 MB of such holes. One buffer per state field is one allocation,
    served by ``mmap`` once large and returned whole when the next step replaces it.
    Tensor subclasses (DTensor, NF4) and ``torch.func``-wrapped tensors get one
    ``empty_like`` each. Any one view keeps its whole buffer alive, and ``torch.save``
    of a single view writes the whole buffer (a dict of them writes it once; ``.clone()``
    a view to keep it alone).

    Args:
        tensors: Name -> tensor; the results have the same names, shapes and devices.
        dtype: Dtype of the results; ``None`` keeps each tensor's own.

    Returns:
        Name -> new tensor with unspecified contents (fill it before reading).

    Example:
        >>> import torch
        >>> out = empty_like_flat({"a": torch.ones(2), "b": torch.ones(3)})
        >>> out["a"].shape, out["b"].untyped_storage().nbytes()
        (torch.Size([2]), 20)
    """
    out: Values = {}
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for n, t in tensors.items():
        if is_plain(t):
            groups.setdefault((dtype or t.dtype, t.device), []).append(n)
        else:
            out[n] = torch.empty_like(t, dtype=dtype)
    for (dt, device), names in groups.items():
        buf = torch.empty(sum(tensors[n].numel() for n in names), dtype=dt, device=device)
        for n, part in zip(names, buf.split([tensors[n].numel() for n in names]), strict=True):
            out[n] = part.view(tensors[n].shape)
    return {n: out[n] for n in tensors}


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right; the state is a tuple of their states.

    Example:
        >>> import torch
        >>> from spdelta.optim import adamw
        >>> t = chain(adamw(0.1))
        >>> state = t.init({"w": torch.zeros(2)})
        >>> len(state)
        1
    """

    def init(params: Values) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Values, state: tuple[Any, ...], params: Values) -> tuple[Values, Any]:
        new_state = []
        for t, s in zip(transforms, state, strict=True):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return Transform(init, update)
