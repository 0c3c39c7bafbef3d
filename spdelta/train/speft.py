"""SPEFT: score the target weights, keep the top-k entries, train only those."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from spdelta.delta import SparseDelta
from spdelta.errors import ParameterError
from spdelta.functional import apply_delta, make_loss_fn
from spdelta.ops import compose
from spdelta.optim import adamw
from spdelta.rules import KEY_TRAINING as TRAINING_KEY
from spdelta.rules import accumulate_dtype
from spdelta.salience import LossCallable, Metric, score
from spdelta.select import Scope, select_topk
from spdelta.targets import TargetSpec, resolve_targets
from spdelta.train._accum import MicroBatches
from spdelta.train._defaults import DEFAULT_SCHEDULE, DEFAULT_WARMUP, default_lr
from spdelta.train._loop import (
    clipped,
    cycle,
    init_train_state,
    learning_rate,
    make_train_step,
    run_steps,
)
from spdelta.types import Params

__all__ = ["TRAINING_KEY", "speft"]

# TRAINING_KEY is spdelta.rules.KEY_TRAINING: the key of the training record (JSON as a string).


def _record(delta: SparseDelta, settings: dict[str, Any]) -> SparseDelta:
    numel = delta.numel
    record = {**settings, "method": "speft", "nnz": delta.nnz,
              "achieved_density": delta.nnz / numel if numel else 0.0}
    return delta.with_metadata({TRAINING_KEY: json.dumps(record, sort_keys=True)})


class _Plain:
    """Re-iterable view of ``batches`` with micro-batches one by one (scoring reads plain ones)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for b in self.batches:
            yield from (b.batches if isinstance(b, MicroBatches) else (b,))


def _phase(model: nn.Module, base: Params, calibration: Iterable[Mapping[str, Any]],
           batches: Iterator[Any], names: list[str], steps: int, start: int,
           settings: dict[str, Any], opts: dict[str, Any]
           ) -> tuple[SparseDelta, list[dict[str, float]]]:
    """Score on ``base``, select, and train steps ``start .. start+steps-1`` with fresh AdamW."""
    scores = score(model, base, calibration, metric=opts["metric"], targets=names,
                   num_examples=settings["calibration_examples"], generator=opts["generator"],
                   loss=opts["loss"], progress=opts["progress"])
    support = select_topk(scores, density=settings["density"], lora_rank=settings["lora_rank"],
                          scope=settings["scope"])
    del scores
    values = {n: torch.zeros(i.numel(), dtype=accumulate_dtype(base[n].dtype), device=i.device)
              for n, i in support.items()}
    rate = learning_rate(settings["lr"], schedule=settings["lr_schedule"],
                         warmup=settings["warmup"], total_steps=settings["steps"], start=start)
    optimizer = clipped(adamw(rate, weight_decay=settings["weight_decay"]),
                        settings["max_grad_norm"])
    step = make_train_step(make_loss_fn(model, opts["loss"]), optimizer, base, support)
    state, history = run_steps(step, init_train_state(optimizer, values), batches, steps=steps,
                               progress=opts["progress"], desc="speft")
    shapes = {n: tuple(base[n].shape) for n in support}
    return SparseDelta.from_support(support, state.values, shapes), history


def speft(
    model: nn.Module,
    base: Mapping[str, Tensor],
    batches: Iterable[Any],
    *,
    metric: str | Metric = "gradient",
    density: float | None = None,
    lora_rank: int | None = None,
    targets: TargetSpec = "all-linear",
    steps: int,
    lr: float | None = None,
    lr_schedule: str = DEFAULT_SCHEDULE,
    warmup: float = DEFAULT_WARMUP,
    max_grad_norm: float | None = None,
    weight_decay: float = 0.0,
    calibration_examples: int = 1024,
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    generator: torch.Generator | None = None,
    scope: Scope = "global",
    dynamic_every: int | None = None,
    loss: LossCallable | None = None,
    progress: bool = True,
) -> tuple[SparseDelta, list[dict[str, float]]]:
    """Salience-aware sparse fine-tuning: score, select top-k once, train the kept entries.

    Static (default): score the target weights of ``base`` with ``metric`` on up to
    ``calibration_examples`` examples, keep the top entries (:func:`spdelta.select_topk`
    with ``density`` or a LoRA-``lora_rank`` budget, ``scope``), then train only their
    delta values for ``steps`` steps of sparse AdamW (``torch.func.grad_and_value`` on
    :func:`spdelta.make_loss_fn`). Entries outside the mask never change.

    Dynamic (``dynamic_every=m``, the paper's variant): every ``m`` steps the current
    phase delta is merged into the base, the weights are re-scored on the merged base,
    a new mask is selected, and training restarts from zero values with a fresh AdamW
    state. Phase ``p`` trains on ``apply_delta(base, d_1 + ... + d_{p-1})`` (always
    built from the ORIGINAL ``base``), and the returned delta is ``d_1 + ... + d_P``
    (union of the phase supports, values summed in fp32), so
    ``apply_delta(base, delta)`` is the final model; its nnz may exceed the budget.

    The delta's metadata ``"spdelta.training"`` is a JSON object with ``method``
    (``"speft"``), ``metric``, ``density``, ``lora_rank``, ``scope``, ``targets`` (the
    spec as given), ``steps``, ``lr``, ``lr_schedule``, ``warmup``, ``max_grad_norm``,
    ``weight_decay``, ``calibration_examples``, ``dynamic_every``, ``nnz`` and
    ``achieved_density``.

    The learning rate follows ``lr_schedule`` over the whole run
    (:func:`~spdelta.optim.warmup_schedule`: a linear ``warmup`` to ``lr``, then
    constant, linear or cosine decay to 0 at ``steps``); a dynamic phase's fresh AdamW
    continues the schedule where the run is. ``max_grad_norm`` clips the values'
    gradient by its global norm before AdamW (:func:`~spdelta.optim.clip_by_global_norm`).

    Args:
        model: The module; ``model(**batch)`` must work. Not modified.
        base: Name -> tensor of the parameters (e.g. ``dict(model.named_parameters())``).
        batches: Re-iterable of training batch dicts (or
            :class:`~spdelta.train.MicroBatches`), cycled for ``steps`` steps.
        metric: Salience metric name (see :data:`spdelta.salience.METRICS`) or callable.
        density: Fraction of the target entries to train (exclusive with ``lora_rank``).
        lora_rank: Train as many entries as a rank-``r`` LoRA on the targets has.
        targets: Target weights (see :func:`spdelta.targets.resolve_targets`).
        steps: Number of optimizer steps, ``>= 0``.
        lr: AdamW (peak) learning rate; ``None``: ``DEFAULT_LR["speft"]``
            (:data:`spdelta.train.DEFAULT_LR`, chosen by ``tools/bench/quality.py``).
        lr_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay after the warmup.
        warmup: Warmup steps (a whole number ``>= 1``) or a ratio of ``steps`` (``< 1``).
        max_grad_norm: Clip the gradient to this global norm; ``None``: no clipping.
        weight_decay: AdamW decoupled decay; it pulls the delta toward zero.
        calibration_examples: Examples used for each scoring.
        calibration_batches: Batches for scoring; defaults to ``batches``.
        generator: Randomness (the ``random`` metric).
        scope: ``"global"`` or ``"per_tensor"`` top-k.
        dynamic_every: Re-select every this many steps; ``None`` keeps the mask static.
        loss: ``loss(output, batch) -> scalar``; ``None`` uses ``output.loss``.
        progress: Show tqdm progress bars.

    Returns:
        ``(delta, history)``: the trained :class:`~spdelta.SparseDelta` (values fp32,
        fp64 for fp64 weights) and one ``{"loss", "step", "phase"}`` dict per step.

    Raises:
        ParameterError: Not exactly one of ``density``/``lora_rank``, ``steps < 0``,
            ``dynamic_every < 1``, a bad ``lr_schedule``, ``warmup`` or
            ``max_grad_norm``; and errors of scoring/selection.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> batch = {"input": torch.ones(2, 4)}
        >>> delta, history = speft(model, dict(model.named_parameters()), [batch], density=0.5,
        ...                        steps=3, lr=0.1, loss=lambda out, b: out.pow(2).mean(),
        ...                        progress=False)
        >>> delta.nnz, len(history)
        (10, 3)

    References:
        Liu et al., "Refining Salience-Aware Sparse Fine-Tuning Strategies for Language
        Models", ACL 2025, https://arxiv.org/abs/2412.13488
    """
    if (density is None) == (lora_rank is None):
        raise ParameterError(f"speft: pass exactly one of density, lora_rank; found "
                           f"density={density}, lora_rank={lora_rank}.")
    if steps < 0 or (dynamic_every is not None and dynamic_every < 1):
        raise ParameterError(f"speft: expected steps >= 0 and dynamic_every >= 1 or None; found "
                           f"steps={steps}, dynamic_every={dynamic_every}.")
    lr = default_lr("speft") if lr is None else lr
    learning_rate(lr, schedule=lr_schedule, warmup=warmup, total_steps=steps)  # validates
    clipped(adamw(lr), max_grad_norm)
    base = {k: v.detach() for k, v in base.items()}  # never build graphs through the base
    names = resolve_targets(model, targets)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    settings = {"metric": metric_name,
                "density": density, "lora_rank": lora_rank, "scope": scope,
                "targets": targets if isinstance(targets, str) else list(targets), "steps": steps,
                "lr": lr, "lr_schedule": lr_schedule, "warmup": warmup,
                "max_grad_norm": max_grad_norm, "weight_decay": weight_decay,
                "dynamic_every": dynamic_every,
                "calibration_examples": calibration_examples}
    opts = {"metric": metric, "generator": generator, "loss": loss, "progress": progress}
    calibration = _Plain(batches) if calibration_batches is None else calibration_batches
    train_batches = cycle(batches)
    total: SparseDelta | None = None
    history: list[dict[str, float]] = []
    phase_base, done, phase = base, 0, 0
    while total is None or done < steps:
        n = min(dynamic_every or steps, steps - done)
        delta, h = _phase(model, phase_base, calibration, train_batches, names, n, done, settings,
                          opts)
        history += [{**m, "step": float(done + i + 1), "phase": float(phase)}
                    for i, m in enumerate(h)]
        total = delta if total is None else compose(total, delta)
        done, phase = done + n, phase + 1
        if done < steps:
            phase_base = apply_delta(base, total)
    return _record(total, settings), history
