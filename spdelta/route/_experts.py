"""Route delta'd fused expert tensors (transformers' MoE ``*Experts`` modules) to the fast kernel.

Transformers 5 stores a mixture-of-experts block's routed experts as two 3-D parameters,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), and runs them in one module
(``MixtralExperts``, ``Qwen3MoeExperts``, ...). On the reference path a delta on them is
merged into the whole 3-D tensor each step, that merged copy is kept for backward, and
backward builds the dense (E, 2I, H) gradient. :class:`ExpertsRouter` runs such a module,
for one ``functional_call``, as its eager loop over the experts that received tokens, with
each expert's matrices through :func:`spdelta.kernels.sparse_delta_linear` and that
expert's slice of the support: no merged 3-D copy, gradients at the support only.

Only modules that run that eager loop anyway (``experts_implementation="eager"``) are
routed, because that is where it pays: ``tools/bench/experts.py`` (random Mixtral, 4
layers, 8 experts top-2, 1 % of all-linear, shared 2-core CPU, 2026-12-06) measured the
routed loop at 0.80x the peak memory of the eager reference and about its step time
(0.82x and 1.09x in two runs; hidden 256, 512 tokens), but at 1.9x the step time of
transformers' default ``grouped_mm`` reference (1.87x, same-round median 1.95x; 1.38x at
hidden 512, intermediate 1408, 64 tokens) for 0.86x its peak (0.50x there, where the
expert weights dominate). With ``grouped_mm`` (or another kernel) the experts stay
on the reference path, and ``spdelta train`` names them in its log; load the model with
``experts_implementation="eager"`` to trade that time for the memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdelta.kernels import sparse_delta_linear
from spdelta.route._linear import swapped_forwards

__all__ = ["ExpertsRouter"]

_PARTS = ("gate_up_proj", "down_proj")

Delta = tuple[Tensor, Tensor]  # (sorted flat indices, values)


def _eligible(module: nn.Module) -> bool:
    """A transformers experts module computing ``down(act(gate) * up)`` per expert, plainly.

    ``use_experts_implementation`` marks those with ``has_gate``, ``has_bias``,
    ``is_transposed``, ``is_concatenated`` and ``has_post_expert_norm``; only the plain
    layout (gate then up, no bias, not transposed, no norm) running the eager loop
    (``config._experts_implementation`` ``"eager"`` or unset) is routed.
    """
    gate_up, down = (getattr(module, p, None) for p in _PARTS)
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return (impl in (None, "eager") and isinstance(gate_up, Tensor)
            and isinstance(down, Tensor) and gate_up.dim() == 3 and down.dim() == 3
            and getattr(module, "has_gate", False) is True
            and getattr(module, "is_concatenated", False) is True
            and not getattr(module, "has_bias", True) and not getattr(module, "is_transposed", True)
            and not getattr(module, "has_post_expert_norm", True)
            and callable(getattr(module, "_apply_gate", None)))


def _per_expert(delta: Delta | None, shape: torch.Size) -> list[Delta | None]:
    """Expert ``e``'s ``(indices into its (out, in) matrix, values)``: slices of the support."""
    if delta is None:
        return [None] * shape[0]
    indices, values = delta
    per = shape[1] * shape[2]
    starts = torch.arange(shape[0] + 1, device=indices.device, dtype=torch.long) * per
    bounds = torch.searchsorted(indices, starts).tolist()  # the support is data, not traced
    return [(indices[lo:hi] - e * per, values[lo:hi])
            for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]


def _linear(x: Tensor, weight: Tensor, delta: Delta | None) -> Tensor:
    if delta is None or delta[0].numel() == 0:
        return F.linear(x, weight)
    return sparse_delta_linear(x, weight, None, delta[0], delta[1])


def _forward(module: nn.Module, deltas: Mapping[str, Delta], hidden_states: Tensor,
             top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' eager experts loop, each expert matrix through the sparse-delta kernel."""
    gate_up: Tensor = module.gate_up_proj  # type: ignore[assignment]  # (E, 2I, H)
    down: Tensor = module.down_proj  # type: ignore[assignment]  # (E, H, I)
    slices = {p: _per_expert(deltas.get(p), getattr(module, p).shape) for p in _PARTS}
    num_experts = gate_up.shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().reshape(-1).tolist()
    for e in hit:
        if e == num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        gated = _linear(hidden_states[token_idx], gate_up[e], slices["gate_up_proj"][e])
        h = module._apply_gate(gated)  # type: ignore[operator]  # act(gate) * up
        out = _linear(h, down[e], slices["down_proj"][e])
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


class ExpertsRouter:
    """Finds the fused expert tensors of a model that can take the fast path.

    Eligible: ``gate_up_proj`` and ``down_proj`` of a transformers experts module in
    the plain layout running the eager loop (see :func:`_eligible` and the module
    docstring for the measurements), neither shared with another name. While
    :meth:`patch` is open, such a module's ``forward`` is its eager loop over the
    experts that received tokens, computing ``x W_e^T`` with
    :func:`spdelta.kernels.sparse_delta_linear` on expert ``e``'s slice of the support
    (the same mechanism and caveats as :class:`spdelta.route.LinearRouter`).

    Args:
        model: The module whose experts may be routed.

    Example:
        >>> import torch
        >>> ExpertsRouter(torch.nn.Linear(2, 2)).names
        frozenset()
    """

    def __init__(self, model: nn.Module) -> None:
        tied = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                if n not in dict(model.named_parameters())}
        self._modules: dict[str, tuple[nn.Module, str]] = {}
        for name, m in model.named_modules():
            if _eligible(m) and not {id(getattr(m, p)) for p in _PARTS} & tied:
                for part in _PARTS:
                    self._modules[f"{name}.{part}" if name else part] = (m, part)

    @property
    def names(self) -> frozenset[str]:
        """Parameter names of the expert tensors that can take the fast path."""
        return frozenset(self._modules)

    @contextmanager
    def patch(self, deltas: Mapping[str, Delta]) -> Iterator[None]:
        """Route each ``name -> (indices, values)`` through the experts fast path while open."""
        per_module: dict[int, tuple[nn.Module, dict[str, Delta]]] = {}
        for name, delta in deltas.items():
            module, part = self._modules[name]
            per_module.setdefault(id(module), (module, {}))[1][part] = delta
        with swapped_forwards([(m, partial(_forward, m, parts))
                               for m, parts in per_module.values()]):
            yield
