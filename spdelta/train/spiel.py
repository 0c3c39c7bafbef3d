"""SpIEL: sparse fine-tuning at a fixed density with periodic prune and regrow.

References:
    Ansell, Vulić, Sterz, Korhonen & Ponti, "Scaling Sparse Fine-Tuning to Large
    Language Models", 2024, https://arxiv.org/abs/2401.16405
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from spdelta._progress import tqdm
from spdelta.delta import SparseDelta
from spdelta.errors import ParameterError, SpdeltaError
from spdelta.functional import LossFn, eager_grad_and_value, make_loss_fn
from spdelta.optim import SM3State, Transform, adamw, apply_updates, sm3
from spdelta.rules import KEY_TRAINING as TRAINING_KEY
from spdelta.targets import resolve_targets
from spdelta.train._accum import MicroBatches, accumulate
from spdelta.train._defaults import DEFAULT_SCHEDULE, DEFAULT_WARMUP, default_lr
from spdelta.train._loop import clipped, learning_rate
from spdelta.train._spiel_core import (
    PruneRegrowResult,
    Regrowth,
    Schedule,
    SpielConfig,
    SpielState,
    prune_fraction,
    prune_regrow,
    random_support,
    regrow_if_due,
)
from spdelta.train.checkpoint import load_state, save_state
from spdelta.types import Params, Shape, Support, Values

__all__ = ["PruneRegrowResult", "SpielConfig", "SpielState", "load_state", "make_spiel_step",
           "prune_fraction", "prune_regrow", "random_support", "save_state", "spiel", "spiel_init"]

LRSchedule = Callable[[int], float]


def spiel_init(values: Values, support: Support, optimizer: Transform, *,
               generator: torch.Generator | None = None) -> SpielState:
    """The state at step 0: the given values and support and a fresh optimizer state.

    Example:
        >>> import torch
        >>> from spdelta.optim import adamw
        >>> s = spiel_init({"w": torch.zeros(2)}, {"w": torch.tensor([0, 3])}, adamw(0.1))
        >>> s.step, s.grad_acc
        (0, {})
    """
    rng = generator.get_state() if generator is not None else None
    return SpielState(dict(values), dict(support), optimizer.init(dict(values)), 0, {}, rng)


def _find_sm3(state: Any) -> SM3State | None:
    if isinstance(state, SM3State):
        return state
    if type(state) is tuple:
        for s in state:
            found = _find_sm3(s)
            if found is not None:
                return found
    return None


def _ma_scores(opt_state: Any, name: str, shape: Shape) -> Tensor:
    sm3_state = _find_sm3(opt_state)
    if sm3_state is None:
        raise SpdeltaError("regrowth='ma' scores candidates by SM3 accumulators, but the optimizer "
                           "state holds no SM3State; use spdelta.optim.sm3 or regrowth='ag'.")
    accs = sm3_state.accumulators[name]
    dims = tuple(shape) or (1,)
    score = accs[0].reshape(-1, *([1] * (len(dims) - 1)))
    for d, a in enumerate(accs[1:], start=1):  # outer product r_i * c_j * ...
        score = score * a.reshape(*([1] * d), -1, *([1] * (len(dims) - d - 1)))
    return score.reshape(-1)


def _grad(loss_fn: LossFn, values: Values, base: Params, support: Support,
          batch: Mapping[str, Any]) -> tuple[Values, Tensor]:
    # The outermost gradient: plain autograd (no create_graph, unlike torch.func), so
    # saved activations are freed during backward. ``base`` is closed over, never a
    # differentiated input (an NF4 base must reach ``.to(dtype)`` unwrapped).
    return eager_grad_and_value(lambda v: loss_fn(v, base, support, batch))(values)


def _dense_grads(loss_fn: LossFn, state: SpielState, base: Params, batch: Mapping[str, Any]
                 ) -> tuple[Values, Values, Tensor]:
    """Gradients at the support plus the dense gradients of the target weights (AG).

    One backward pass that differentiates the target base weights as well as the
    values. As ``W' = W + D``, ``dL/dW`` is the dense gradient AG accumulates, and the
    fast kernel computes it as one dense ``g^T x`` per linear and gathers the values'
    gradient from it (no SDDMM over the full tensor; see
    :class:`spdelta.kernels.SparseDeltaLinear`). The base is only marked as requiring
    a gradient (``detach``: no copy; an NF4 base stays 4-bit).

    Returns:
        ``(grads, dense, loss)``: support gradients (values' dtype), dense flat
        gradients of the targets (values' dtype, computed in the base's), the loss.
    """
    names = sorted(state.support)
    weights = {n: base[n].detach().requires_grad_() for n in names}
    values = {n: state.values[n].detach().requires_grad_() for n in names}
    with torch.enable_grad():
        loss = loss_fn(values, {**base, **weights}, state.support, batch)
    grads = torch.autograd.grad(loss, [*weights.values(), *values.values()], allow_unused=True)
    g_w, g_v = grads[:len(names)], grads[len(names):]
    dense = {n: (torch.zeros(base[n].numel(), dtype=state.values[n].dtype,
                             device=state.values[n].device) if g is None
                 else g.reshape(-1).to(state.values[n].dtype))
             for n, g in zip(names, g_w, strict=True)}
    support = {n: torch.zeros_like(values[n]) if g is None else g
               for n, g in zip(names, g_v, strict=True)}
    return support, dense, loss.detach()


def make_spiel_step(
    loss_fn: LossFn,
    base: Params,
    optimizer: Transform,
    *,
    total_steps: int,
    regrowth: Regrowth = "ag",
    update_every: int = 20,
    accumulate_steps: int = 5,
    initial_fraction: float = 0.2,
    schedule: Schedule = "linear",
) -> Callable[[SpielState, Any], tuple[SpielState, dict[str, float]]]:
    """Build ``spiel_step(state, batch) -> (state, metrics)``: one update, then maybe prune/regrow.

    ``batch`` is one batch, or a :class:`~spdelta.train.MicroBatches` whose gradients
    (the dense AG gradients too) are accumulated before the update.

    The hyperparameters make a :class:`SpielConfig` (the schedule, checked once, shared
    with the DDP and FSDP2 steps): step ``t`` (1-based, after the update) is a
    *regrowth step* when ``t % update_every == 0`` and ``t < total_steps``. There, per
    tensor (budgets are per tensor: each keeps its ``nnz``), :func:`prune_regrow`
    replaces ``prune_fraction(t, total_steps)`` of the entries and the optimizer state
    is remapped (:func:`~spdelta.optim.remap_state`, for any optimizer whose state
    declares its per-entry fields): survivors keep value and state, regrown entries
    start at 0 with zero state.

    Regrowth scores: ``"ag"`` sums the dense gradient of each target weight over the
    ``accumulate_steps`` steps ending at the regrowth step (one backward pass gives both
    the dense gradient and the support gradient used for the update: it differentiates
    the target base weights too, and the fast kernel gathers the support gradient from
    the dense one). Memory: one dense buffer per target weight, in the values' dtype
    (for fp32 targets, 4 bytes per target parameter) during those steps, plus the
    dense gradient of the pass. ``"ma"`` scores each candidate by the
    product of its SM3 accumulators (``r_i * c_j``), needs no dense gradient, and builds
    one transient dense score tensor per target at the regrowth step only.

    Args:
        loss_fn: From :func:`spdelta.make_loss_fn`.
        base: Name -> base tensor (dense or NF4) for every parameter of the model.
        optimizer: Transform over the values; ``"ma"`` needs an SM3 state in it.
        total_steps: Length of the run (the schedule's horizon).
        regrowth: ``"ag"`` (accumulated gradients) or ``"ma"`` (SM3 momentum estimate).
        update_every: ``R``, steps between regrowths.
        accumulate_steps: ``S``, AG window length, ``1 <= S <= R``.
        initial_fraction: Prune fraction at step 0, annealed to 0 by ``schedule``.
        schedule: ``"linear"`` or ``"cosine"``.

    Returns:
        ``spiel_step``; its metrics are ``loss`` (before the update), ``step``,
        ``fraction`` and ``regrown`` (0 off regrowth steps).

    Raises:
        ParameterError: A hyperparameter is out of range.

    Example:
        >>> import torch
        >>> from spdelta import make_loss_fn
        >>> from spdelta.optim import adamw
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> fn = make_loss_fn(model, loss=lambda out, batch: (out - 1).pow(2).sum())
        >>> base = {"weight": torch.zeros(1, 3)}
        >>> step = make_spiel_step(fn, base, adamw(0.1), total_steps=4, update_every=2,
        ...                        accumulate_steps=1, initial_fraction=1.0)
        >>> state = spiel_init({"weight": torch.zeros(2)}, {"weight": torch.tensor([0, 2])},
        ...                    adamw(0.1))
        >>> for _ in range(2):
        ...     state, metrics = step(state, {"input": torch.tensor([[0.0, 2.0, 1.0]])})
        >>> state.support["weight"].tolist(), state.values["weight"][0].item(), metrics["regrown"]
        ([1, 2], 0.0, 1.0)
    """
    config = SpielConfig(total_steps=total_steps, regrowth=regrowth, update_every=update_every,
                         accumulate_steps=accumulate_steps, initial_fraction=initial_fraction,
                         schedule=schedule)
    # A base that requires a gradient (e.g. ``dict(model.named_parameters())``) would make
    # the fast kernel build a dense dL/dW on every step; only the AG window asks for one.
    base = {n: t.detach() for n, t in base.items()}

    def scores(state: SpielState) -> Callable[[str], Tensor]:
        if config.regrowth == "ag":
            return lambda n: state.grad_acc[n].abs()
        return lambda n: _ma_scores(state.opt_state, n, tuple(base[n].shape))

    def spiel_step(state: SpielState, batch: Mapping[str, Any] | MicroBatches
                   ) -> tuple[SpielState, dict[str, float]]:
        t = state.step + 1
        grad_acc = state.grad_acc
        if config.accumulates_at(t):
            grads, g_dense, loss = accumulate(lambda b: _dense_grads(loss_fn, state, base, b),
                                              batch)
            grad_acc = {n: grad_acc[n] + g if n in grad_acc else g for n, g in g_dense.items()}
        else:
            grads, loss = accumulate(
                lambda b: _grad(loss_fn, state.values, base, state.support, b), batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.values)
        state = state._replace(values=apply_updates(state.values, updates), opt_state=opt_state,
                               step=t, grad_acc=grad_acc)
        state, regrown = regrow_if_due(config, state, scores(state))
        return state, {"loss": float(loss.detach()), "step": float(t), **regrown}

    return spiel_step


def _next_batch(it: Iterator[Any], steps: int) -> Any:
    try:
        return next(it)
    except StopIteration:
        raise ParameterError(f"spiel: batches ran out before steps={steps}; pass at least "
                             "that many (e.g. itertools.cycle over a loader).") from None


def _start(base: Params, shapes: dict[str, Shape], *, density: float, lr: LRSchedule,
           max_grad_norm: float | None, config: SpielConfig, optimizer: str,
           generator: torch.Generator, checkpoint: str | None) -> tuple[SpielState, Transform]:
    """The initial state (random support, zero values) or the checkpoint's, and the optimizer."""
    if optimizer not in ("auto", "adamw", "sm3"):
        raise ParameterError(f"optimizer must be 'auto', 'adamw' or 'sm3'; found {optimizer!r}.")
    if config.regrowth == "ma" and optimizer == "adamw":
        raise ParameterError("regrowth='ma' scores candidates by SM3 accumulators; use "
                             "optimizer='sm3' (or 'auto'), or regrowth='ag' with adamw.")
    support = {n: i.to(base[n].device) for n, i in
               random_support(shapes, density=density, generator=generator).items()}
    values = {n: torch.zeros(s.numel(), dtype=base[n].dtype, device=s.device)
              for n, s in support.items()}
    kind = ("sm3" if config.regrowth == "ma" else "adamw") if optimizer == "auto" else optimizer
    opt = clipped(sm3(lr, support=support, shapes=shapes) if kind == "sm3" else adamw(lr),
                  max_grad_norm)
    state = spiel_init(values, support, opt, generator=generator)
    if checkpoint is not None and os.path.exists(checkpoint):
        state = load_state(checkpoint, template=state)
        if not isinstance(state, SpielState):
            raise SpdeltaError(f"spiel: {checkpoint!r} holds a {type(state).__name__}, not the "
                               "SpielState of a spiel() run; pass another checkpoint path.")
        if state.rng_state is not None:
            generator.set_state(state.rng_state)
    return state, opt


def spiel(
    model: nn.Module,
    base: Params,
    batches: Iterable[Any],
    *,
    density: float,
    targets: Sequence[str] | str,
    steps: int,
    generator: torch.Generator,
    lr: float | None = None,
    lr_schedule: str = DEFAULT_SCHEDULE,
    warmup: float = DEFAULT_WARMUP,
    max_grad_norm: float | None = None,
    regrowth: Regrowth = "ag",
    optimizer: Literal["auto", "adamw", "sm3"] = "auto",
    update_every: int = 20,
    accumulate_steps: int = 5,
    initial_fraction: float = 0.2,
    schedule: Schedule = "linear",
    loss: Callable[[Any, Mapping[str, Any]], Tensor] | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
    checkpoint_every: int = 0,
) -> tuple[SparseDelta, list[dict[str, float]]]:
    """Train a sparse delta with SpIEL: random support at ``density``, then update/prune/regrow.

    Budgets are per tensor: each target keeps ``floor(density * numel + 0.5)`` entries
    throughout. ``optimizer="auto"`` is AdamW for AG and SM3 for MA (MA needs SM3).
    With ``checkpoint``, the state is saved atomically every ``checkpoint_every`` steps
    and at the end; if the file exists when called, the run resumes from it (skipping
    the batches already consumed: ``batches`` must replay the same sequence), giving
    the same result as an uninterrupted run.

    Args:
        model: The module (only its structure is used; weights come from ``base``).
        base: Name -> tensor for every parameter; targets may be NF4 (:mod:`spdelta.quant`).
        batches: Yields ``model.forward`` keyword dicts (or
            :class:`~spdelta.train.MicroBatches`); at least ``steps`` of them.
        density: Fraction of each target's entries that are trainable, in ``[0, 1]``.
        targets: Weight names, module-name suffixes, a regex or ``"all-linear"``
            (see :func:`spdelta.targets.resolve_targets`).
        steps: Number of optimizer steps.
        generator: Draws the initial support.
        lr: (Peak) learning rate; ``None``: ``DEFAULT_LR["spiel"]``
            (:data:`spdelta.train.DEFAULT_LR`, chosen by ``tools/bench/quality.py``).
        lr_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` learning-rate decay after
            the warmup (:func:`~spdelta.optim.warmup_schedule`), to 0 at ``steps``.
        warmup: Warmup steps (a whole number ``>= 1``) or a ratio of ``steps`` (``< 1``).
        max_grad_norm: Clip the values' gradient to this global norm before the
            optimizer; ``None``: no clipping.
        regrowth: ``"ag"`` or ``"ma"`` (see :func:`make_spiel_step`).
        optimizer: ``"auto"``, ``"adamw"`` or ``"sm3"``.
        update_every: Steps between regrowths (``R``).
        accumulate_steps: AG window (``S``).
        initial_fraction: Initial prune fraction.
        schedule: ``"linear"`` or ``"cosine"`` annealing of the prune fraction to 0.
        loss: ``loss(output, batch)``; ``None`` uses ``output.loss``.
        progress: Show a tqdm progress bar.
        checkpoint: Path of the resumable state file, or ``None``.
        checkpoint_every: Save every this many steps (0: only at the end).

    Returns:
        ``(delta, log)``: the trained :class:`~spdelta.SparseDelta` and one metrics dict
        per step taken in this call.

    Raises:
        ParameterError: A hyperparameter is out of range.
        KeyMismatchError: A target is not in ``base`` or matches nothing.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> base = dict(model.named_parameters())
        >>> batch = {"input": torch.ones(2, 4)}
        >>> delta, log = spiel(model, base, [batch] * 4, density=0.5, targets="all-linear",
        ...                    steps=4, lr=0.01, generator=torch.Generator().manual_seed(0),
        ...                    loss=lambda out, b: out.pow(2).mean(), update_every=2,
        ...                    accumulate_steps=1, progress=False)
        >>> delta.nnz, len(log)
        (10, 4)
    """

    config = SpielConfig(total_steps=steps, regrowth=regrowth, update_every=update_every,
                         accumulate_steps=accumulate_steps, initial_fraction=initial_fraction,
                         schedule=schedule)
    names = resolve_targets(model, targets)
    shapes = {n: tuple(base[n].shape) for n in names}
    lr = default_lr("spiel") if lr is None else lr
    rate = learning_rate(lr, schedule=lr_schedule, warmup=warmup, total_steps=steps)
    state, opt = _start(base, shapes, density=density, lr=rate, max_grad_norm=max_grad_norm,
                        config=config, optimizer=optimizer, generator=generator,
                        checkpoint=checkpoint)
    # The fast path takes NF4 targets too: it dequantises them per op, keeping no dense W.
    loss_fn = make_loss_fn(model, loss, impl="fast")
    step_fn = make_spiel_step(loss_fn, base, opt, **dataclasses.asdict(config))
    log: list[dict[str, float]] = []
    it = iter(batches)
    for _ in range(state.step):  # replay: skip the batches the saved run consumed
        _next_batch(it, steps)
    with tqdm(total=steps, initial=state.step, disable=not progress, desc="spiel") as bar:
        while state.step < steps:
            state, metrics = step_fn(state, _next_batch(it, steps))
            log.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if checkpoint is not None and (state.step == steps or (
                    checkpoint_every and state.step % checkpoint_every == 0)):
                save_state(state, checkpoint)
    # The settings go in the training record, like speft's: a key such as
    # "spdelta.spiel.regrowth" is reserved by the format (spec V4) and the file would not save.
    record = {"method": "spiel", "optimizer": optimizer, "density": density, "steps": steps,
              "lr": lr, "lr_schedule": lr_schedule, "warmup": warmup,
              "max_grad_norm": max_grad_norm, **dataclasses.asdict(config)}
    del record["total_steps"]  # it is ``steps``
    meta = {TRAINING_KEY: json.dumps(record, sort_keys=True)}
    return SparseDelta.from_support(state.support, state.values, shapes, metadata=meta), log
