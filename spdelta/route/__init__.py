"""How a delta reaches a layer: its module runs the sparse-delta kernel on the unmerged weight.

:class:`LinearRouter` (plain ``nn.Linear`` / ``Conv1D``) and :class:`ExpertsRouter` (fused
MoE experts) route a delta for one ``functional_call`` (``make_loss_fn``'s fast path);
:func:`attach_delta` puts a trainable delta on a linear for good (FSDP2). Both set the
module's instance ``forward`` to :func:`routed_forward`; the kernels are in
:mod:`spdelta.kernels`.

Example:
    >>> import torch
    >>> from spdelta.route import LinearRouter
    >>> router = LinearRouter(torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False)))
    >>> sorted(router.names)
    ['0.weight']
"""

from spdelta.route._attach import AttachedDelta, attach_delta, attached_deltas
from spdelta.route._experts import ExpertsRouter
from spdelta.route._linear import LinearRouter, is_plain_linear, routed_forward, swapped_forwards

__all__ = [
    "AttachedDelta",
    "ExpertsRouter",
    "LinearRouter",
    "attach_delta",
    "attached_deltas",
    "is_plain_linear",
    "routed_forward",
    "swapped_forwards",
]
