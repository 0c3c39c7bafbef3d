"""FSDP2 (``fully_shard``) training of sparse deltas: base weights and values sharded per layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from spdelta.delta import SparseDelta
from spdelta.dist._sync import all_reduce_mean
from spdelta.errors import KeyMismatchError, SpdeltaError, format_names
from spdelta.optim import Transform, apply_updates
from spdelta.route import AttachedDelta, attach_delta, attached_deltas, is_plain_linear
from spdelta.train import TrainState
from spdelta.train.spiel import SpielState
from spdelta.types import Support, Values

__all__ = ["fsdp_delta", "fsdp_init", "make_fsdp_train_step", "shard_with_deltas"]

Batch = Mapping[str, Any]
_VALUES = "values"


def _default_wrap(name: str, module: nn.Module) -> bool:
    del name
    return type(module).__name__.endswith(("DecoderLayer", "Block"))


def shard_with_deltas(
    model: nn.Module, support: Support, *,
    wrap: Callable[[str, nn.Module], bool] | None = None, **fsdp_kwargs: Any,
) -> nn.Module:
    """Put a trainable sparse delta on each supported linear weight, then ``fully_shard``.

    Each ``<m>.weight`` in ``support`` gets a delta by :func:`spdelta.route.attach_delta`
    (parameter ``<m>.values``, buffer ``<m>.support``; the module runs the same routed
    forward as ``make_loss_fn``'s fast path); every other parameter is frozen.
    ``fully_shard`` is applied to each module ``wrap`` selects (default: classes named
    ``*DecoderLayer``/``*Block``), then to the root, so a layer's base weights and values
    are all-gathered just before it runs and freed after; values' gradients are
    reduce-scattered (averaged over ranks).
    The model is changed in place (as FSDP2 itself does) and returned.

    ``functional_call`` cannot drive FSDP2: FSDP swaps its own gathered parameters into
    the modules in pre-forward hooks, replacing what ``functional_call`` swapped in. So
    here the values live in the module as parameters, and the step is ordinary autograd.

    Args:
        model: The model on its compute device, the same weights on every rank.
        support: ``<m>.weight`` -> sorted int64 indices, for plain ``nn.Linear`` (or
            transformers ``Conv1D``) modules.
        wrap: ``wrap(name, module) -> bool`` chooses the sharding units.
        **fsdp_kwargs: Passed to ``fully_shard`` (e.g. ``mesh``, ``reshard_after_forward``).

    Returns:
        ``model``, sharded.

    Raises:
        KeyMismatchError: A support name is not the ``weight`` of a plain linear.

    Example:
        >>> support = {"model.layers.0.mlp.up_proj.weight": idx}  # doctest: +SKIP
        >>> model = shard_with_deltas(model, support)  # under torchrun  # doctest: +SKIP
    """
    modules = dict(model.named_modules())
    bad = [n for n in support if not n.endswith(".weight")
           or not is_plain_linear(modules.get(n[: -len(".weight")], nn.Identity()))]
    if bad:
        raise KeyMismatchError(f"shard_with_deltas: FSDP training supports deltas on plain "
                               "nn.Linear or Conv1D weights only; these are not: "
                               f"[{format_names(bad)}].")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in sorted(support):
        attach_delta(modules[name[: -len(".weight")]], support[name])
    choose = wrap or _default_wrap
    for name, module in model.named_modules():
        if name and choose(name, module):
            fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def _value_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """HF weight name -> the ``values`` parameter of its attached delta."""
    out = {n[: -len(_VALUES)] + "weight": p for n, p in model.named_parameters()
           if n.endswith("." + _VALUES)}
    if not out:
        raise SpdeltaError("no delta values in the model; call shard_with_deltas first.")
    return out


def _delta_layers(model: nn.Module) -> dict[str, AttachedDelta]:
    """HF weight name -> the delta attached to its module (``support`` buffer, shape)."""
    return attached_deltas(model)


def _forward_backward(model: nn.Module, params: Mapping[str, nn.Parameter], values: Values,
                      batch: Batch, loss: Callable[[Any, Batch], Tensor] | None
                      ) -> tuple[Values, Tensor]:
    """Load ``values`` into the module, run forward and backward; the values' grads and the loss."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    out = model(**batch)
    value = out.loss if loss is None else loss(out, batch)
    value.backward()
    grads: Values = {}
    for n, p in params.items():  # DTensors: the optimizer's element-wise ops run per shard
        grads[n] = p.grad if p.grad is not None else torch.zeros_like(values[n])
        p.grad = None
    return grads, value.detach()


def fsdp_init(model: nn.Module, optimizer: Transform) -> TrainState:
    """Step-0 state: the values as sharded DTensors and a fresh optimizer state for them.

    The optimizer must be element-wise (e.g. :func:`spdelta.optim.adamw`): its state is
    then DTensors sharded like the values (ZeRO-style), which
    :func:`~spdelta.dist.save_checkpoint` stores per shard and
    :func:`~spdelta.dist.load_checkpoint` reshards to any world size (pass this state
    as ``template``; without one, it loads whole tensors for a single process). SM3
    mixes the entries of a row and is not supported here.

    Example:
        >>> state = fsdp_init(model, adamw(1e-3))  # doctest: +SKIP
    """
    values = {n: p.detach().clone() for n, p in _value_params(model).items()}
    return TrainState(values, optimizer.init(values), 0)


def make_fsdp_train_step(
    model: nn.Module, optimizer: Transform, *,
    loss: Callable[[Any, Batch], Tensor] | None = None, group: dist.ProcessGroup | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, float]]]:
    """Build ``step(state, local_batch)`` for a model from :func:`shard_with_deltas`.

    Forward and backward run through FSDP2 (per-layer all-gather, reduce-scatter of the
    mean gradient); the pure ``optimizer`` then updates this rank's value shards, which
    are written back into the module. ``state.values`` and the optimizer state hold
    DTensors (this rank stores its shard only).

    Args:
        model: From :func:`shard_with_deltas`.
        optimizer: An element-wise transform (e.g. :func:`spdelta.optim.adamw`).
        loss: ``loss(output, batch)``; ``None`` uses ``output.loss``.
        group: Group for the reported loss (the rank mean).

    Returns:
        The step function; metrics ``loss`` (before the update, rank mean) and ``step``.

    Example:
        >>> state, metrics = make_fsdp_train_step(model, opt)(state, batch)  # doctest: +SKIP
    """
    params = _value_params(model)

    def fsdp_train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, float]]:
        grads, value = _forward_backward(model, params, state.values, batch, loss)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.values)
        values = {n: v.detach() for n, v in apply_updates(state.values, updates).items()}
        mean = all_reduce_mean({"l": value.reshape(1)}, group)["l"]
        return TrainState(values, opt_state, state.step + 1), {"loss": float(mean),
                                                               "step": float(state.step + 1)}

    return fsdp_train_step


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def fsdp_delta(model: nn.Module, state: TrainState | SpielState) -> SparseDelta:
    """The full trained delta from the ranks' shards (every rank calls it; all get it).

    Args:
        model: From :func:`shard_with_deltas`.
        state: From :func:`make_fsdp_train_step` (supports: the layers' buffers) or
            :func:`make_fsdp_spiel_step` (supports: ``state.support``, which the step
            keeps equal to the buffers).

    Returns:
        A :class:`~spdelta.SparseDelta` with whole values, identical on every rank.

    Example:
        >>> delta = fsdp_delta(model, state)  # doctest: +SKIP
    """
    layers = _delta_layers(model)
    supports = state.support if isinstance(state, SpielState) else {}
    support, values, shapes = {}, {}, {}
    with torch.no_grad():
        for n in _value_params(model):
            support[n] = supports.get(n, layers[n].support).clone()
            values[n] = _whole(state.values[n]).detach().clone()
            shapes[n] = layers[n].shape
    return SparseDelta.from_support(support, values, shapes)
