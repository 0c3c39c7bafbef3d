"""SpIEL-AG under FSDP2: the schedule and regrowth of :mod:`spdelta.train.spiel`, on shards."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from spdelta._ranks import full_tensor, shard_like
from spdelta.dist._fsdp import (
    Batch,
    _delta_layers,
    _forward_backward,
    _value_params,
)
from spdelta.dist._sync import all_reduce_mean, assert_replicated
from spdelta.errors import ParameterError
from spdelta.optim import Transform, apply_updates
from spdelta.route import AttachedDelta
from spdelta.train._spiel_core import Regrowth, Schedule, SpielConfig, SpielState, regrow_if_due
from spdelta.types import Values

__all__ = ["fsdp_spiel_init", "make_fsdp_spiel_step"]


def fsdp_spiel_init(model: nn.Module, optimizer: Transform) -> SpielState:
    """Step-0 SpIEL state for a model from :func:`shard_with_deltas`.

    ``values`` are sharded DTensors (copies of the module's), ``support`` the full
    supports of the modules' ``support`` buffers (identical on every rank), the
    optimizer state is fresh and sharded like the values, ``grad_acc`` is empty and
    there is no generator state. Also the ``template`` to pass to
    :func:`~spdelta.dist.load_checkpoint` to resume at any world size.

    Args:
        model: From :func:`shard_with_deltas`.
        optimizer: An element-wise transform (e.g. :func:`spdelta.optim.adamw`).

    Returns:
        A :class:`~spdelta.train.spiel.SpielState` at step 0.

    Example:
        >>> state = fsdp_spiel_init(model, adamw(1e-3))  # doctest: +SKIP
    """
    values = {n: p.detach().clone() for n, p in _value_params(model).items()}
    layers = _delta_layers(model)
    support = {n: layers[n].support.clone() for n in values}
    return SpielState(values, support, optimizer.init(values), 0, {}, None)


def _write_supports(layers: Mapping[str, AttachedDelta], support: Mapping[str, Tensor]) -> None:
    """Copy ``support`` into the layers' ``support`` buffers (the state is the source of truth)."""
    with torch.no_grad():
        for n, layer in layers.items():
            layer.support.copy_(support[n])


def _accumulate(grad_acc: Values, weights: Mapping[str, nn.Parameter], values: Values) -> Values:
    """Add the weights' (sharded, rank-mean) dense gradients to ``grad_acc``; clear them."""
    out = dict(grad_acc)
    for n, w in weights.items():
        g = (w.grad if w.grad is not None else torch.zeros_like(w)).to(values[n].dtype)
        w.grad = None
        prev = out.get(n)
        if prev is not None and not isinstance(prev, DTensor):  # loaded whole: shard it
            prev = shard_like(prev.reshape(w.shape).to(g.dtype), g)
        out[n] = g if prev is None else prev + g  # (out, in), sharded like the weight
    return out


def make_fsdp_spiel_step(
    model: nn.Module, optimizer: Transform, *, total_steps: int, regrowth: Regrowth = "ag",
    update_every: int = 20, accumulate_steps: int = 5, initial_fraction: float = 0.2,
    schedule: Schedule = "linear", loss: Callable[[Any, Batch], Tensor] | None = None,
    group: dist.ProcessGroup | None = None, check_supports: bool = True,
) -> Callable[[SpielState, Batch], tuple[SpielState, dict[str, float]]]:
    """:func:`spdelta.train.spiel.make_spiel_step` (AG) for a model from :func:`shard_with_deltas`.

    The single-process step's :class:`~spdelta.train.SpielConfig` (schedule, checks)
    and regrowth (the same code: :mod:`spdelta.train.spiel`), on global gradients: step
    ``t`` regrows when ``t % update_every == 0`` and ``t < total_steps``, and AG sums
    the dense gradient of each target weight over the ``accumulate_steps`` steps
    ending there. During those steps the frozen base weights of the
    modules carrying a delta are marked as requiring a gradient, so FSDP2
    reduce-scatters their rank-mean dense gradient like the values' (the kernel
    computes ``dL/dW = g^T x`` once and gathers the values' gradient from it); the
    sum stays sharded like the weight in ``state.grad_acc`` (DTensors of shape
    ``(out, in)``, not flattened as in one process: FSDP shards rows, and an uneven
    row split has no flat DTensor layout). Each rank thus holds ``1/world`` of a
    dense gradient per target during the window, in the values' dtype.

    At a regrowth step, per tensor, the summed gradient and the values are gathered
    whole on every rank (transient), :func:`~spdelta.train.spiel.prune_regrow` (ties
    broken deterministically) picks the new support, which is written to the layer's
    ``support`` buffer; the new values and this tensor's optimizer state
    (:func:`~spdelta.optim.remap_state`: survivors keep theirs, regrown entries start
    at 0) are resharded like before. ``values`` keeps its shape (``nnz`` never changes).

    Each step first writes ``state.values`` and ``state.support`` into the modules, so
    ``state`` is the source of truth: resume from :func:`~spdelta.dist.load_checkpoint`
    with ``template=fsdp_spiel_init(model, optimizer)`` at any world size (a whole
    ``grad_acc``, e.g. from a single-process checkpoint, is sharded on first use).
    Loaded without a template at world size 1, the state continues under
    ``make_spiel_step`` once ``grad_acc`` is flattened (``g.reshape(-1)``).

    Args:
        model: From :func:`shard_with_deltas`; weights and values of one dtype.
        optimizer: An element-wise transform (e.g. :func:`spdelta.optim.adamw`).
        total_steps: Length of the run (the schedule's horizon).
        regrowth: Only ``"ag"``; ``"ma"`` raises (see Raises).
        update_every: ``R``, steps between regrowths.
        accumulate_steps: ``S``, AG window length, ``1 <= S <= R``.
        initial_fraction: Prune fraction at step 0, annealed to 0 by ``schedule``.
        schedule: ``"linear"`` or ``"cosine"``.
        loss: ``loss(output, batch)``; ``None`` uses ``output.loss``.
        group: Group for the reported loss (the rank mean) and the support check.
        check_supports: After each regrowth, verify with
            :func:`~spdelta.dist.assert_replicated` that all ranks hold the same supports.

    Returns:
        ``step(state, local_batch) -> (state, metrics)``; metrics ``loss`` (before the
        update, rank mean), ``step``, ``fraction`` and ``regrown`` (0 off regrowth steps).

    Raises:
        ParameterError: A hyperparameter is out of range, or ``regrowth="ma"``: MA
            scores by SM3's row and column accumulators, maxima over whole rows and
            columns, while FSDP shards the values by entry, so every SM3 update would
            need cross-rank reductions the element-wise sharded optimizer does not do.
            Use AG here, or :func:`~spdelta.dist.make_dist_spiel_step` for MA.

    Example:
        >>> model = shard_with_deltas(model, support)  # doctest: +SKIP
        >>> step = make_fsdp_spiel_step(model, adamw(1e-3), total_steps=1000)  # doctest: +SKIP
        >>> state, metrics = step(fsdp_spiel_init(model, adamw(1e-3)), batch)  # doctest: +SKIP

    References:
        Ansell et al., "Scaling Sparse Fine-Tuning to Large Language Models", 2024,
        https://arxiv.org/abs/2401.16405
    """
    config = SpielConfig(total_steps=total_steps, regrowth=regrowth, update_every=update_every,
                         accumulate_steps=accumulate_steps, initial_fraction=initial_fraction,
                         schedule=schedule)
    if config.regrowth == "ma":
        raise ParameterError("make_fsdp_spiel_step: regrowth='ma' is not supported under FSDP: "
                             "SM3's row/column accumulators mix entries that FSDP shards over "
                             "ranks; use regrowth='ag' (with adamw), or make_dist_spiel_step.")
    params = _value_params(model)
    named = dict(model.named_parameters())
    weights = {n: named[n] for n in params}  # the sharded base weights
    layers = _delta_layers(model)

    def fsdp_spiel_step(state: SpielState, batch: Batch) -> tuple[SpielState, dict[str, float]]:
        t = state.step + 1
        window = config.accumulates_at(t)
        _write_supports(layers, state.support)
        for w in weights.values():  # FSDP then reduce-scatters dL/dW too (AG's gradient)
            w.requires_grad_(window)
        try:
            grads, value = _forward_backward(model, params, state.values, batch, loss)
        finally:
            for w in weights.values():
                w.requires_grad_(False)
        grad_acc = _accumulate(state.grad_acc, weights, state.values) if window else (
            state.grad_acc)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.values)
        values = {n: v.detach() for n, v in apply_updates(state.values, updates).items()}
        state = state._replace(values=values, opt_state=opt_state, step=t, grad_acc=grad_acc)
        mean = all_reduce_mean({"l": value.reshape(1)}, group)["l"]
        sums = state.grad_acc  # (out, in) sharded sums: each gathered whole, one at a time
        state, regrown = regrow_if_due(config, state,
                                       lambda n: full_tensor(sums[n]).reshape(-1).abs())
        if config.regrows_at(t):
            _write_supports(layers, state.support)
            if check_supports:
                assert_replicated(state.support, group, what="SpIEL support")
        return state, {"loss": float(mean), "step": float(t), **regrown}

    return fsdp_spiel_step
