"""Type aliases shared across spdelta."""

from __future__ import annotations

from typing import TypeAlias

import torch
from torch import Tensor

__all__ = ["Params", "Shape", "Support", "Values", "is_plain"]

#: A flat parameter tree keyed by Hugging Face state-dict name.
Params: TypeAlias = dict[str, Tensor]
#: Name -> 1-D int64 flat row-major indices into the dense tensor.
Support: TypeAlias = dict[str, Tensor]
#: Name -> 1-D float values, aligned with the support.
Values: TypeAlias = dict[str, Tensor]
#: A dense tensor shape.
Shape: TypeAlias = tuple[int, ...]


def is_plain(t: Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor: no subclass (DTensor, NF4), no ``torch.func`` wrapper.

    Example:
        >>> import torch
        >>> is_plain(torch.zeros(1)), is_plain(torch.nn.Parameter(torch.zeros(1)))
        (True, True)
    """
    return type(t) in (Tensor, torch.nn.Parameter) and not (
        torch._C._functorch.is_functorch_wrapped_tensor(t))
