"""A generic training loop over sparse delta values: ``train_step(state, batch)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from spdelta._progress import tqdm
from spdelta.errors import SpdeltaError
from spdelta.functional import LossFn, eager_grad_and_value
from spdelta.optim import Schedule, Transform, apply_updates, chain, clip_by_global_norm
from spdelta.optim.schedules import warmup_schedule
from spdelta.train._accum import MicroBatches, accumulate
from spdelta.types import Params, Support, Values

__all__ = ["TrainState", "TrainStepFn", "clipped", "cycle", "init_train_state", "learning_rate",
           "make_train_step", "run_steps"]

Batch = Mapping[str, Any]
#: What a train step takes: one batch, or the micro-batches of one step.
StepInput = Batch | MicroBatches


class TrainState(NamedTuple):
    """State of sparse training.

    Attributes:
        values: Name -> 1-D delta values being trained (aligned with a support).
        opt_state: The optimizer state (e.g. :class:`~spdelta.optim.AdamWState`).
        step: Number of steps taken.
    """

    values: Values
    opt_state: Any
    step: int


#: ``train_step(state, batch) -> (new_state, metrics)``; metrics map str -> float.
TrainStepFn = Callable[[TrainState, StepInput], tuple[TrainState, dict[str, float]]]


def learning_rate(lr: float, *, schedule: str = "constant", warmup: float = 0.0,
                  total_steps: int, start: int = 0) -> Schedule:
    """The recipes' learning rate: :func:`~spdelta.optim.warmup_schedule`, seen from ``start``.

    Args:
        lr: Peak learning rate.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay after the warmup.
        warmup: Warmup steps (whole, ``>= 1``) or ratio of ``total_steps`` (``< 1``).
        total_steps: Length of the whole run.
        start: The run's step at which the optimizer that gets this schedule takes its
            first update (a phase of dynamic SPEFT starts a fresh optimizer mid-run).

    Returns:
        ``schedule(k) = warmup_schedule(...)(start + k)``.

    Raises:
        ParameterError: A bad ``schedule``, ``lr`` or ``warmup``.

    Example:
        >>> learning_rate(1e-3, schedule="linear", total_steps=10, start=5)(0)
        0.0005
    """
    full = warmup_schedule(schedule, lr=lr, total_steps=total_steps, warmup=warmup)
    return full if start == 0 else (lambda k: full(k + start))


def clipped(optimizer: Transform, max_grad_norm: float | None) -> Transform:
    """``optimizer`` after :func:`~spdelta.optim.clip_by_global_norm` (``None``: as it is).

    Example:
        >>> from spdelta.optim import adamw
        >>> len(clipped(adamw(0.1), 1.0).init({}))
        2
    """
    if max_grad_norm is None:
        return optimizer
    return chain(clip_by_global_norm(max_grad_norm), optimizer)


def init_train_state(optimizer: Transform, values: Values) -> TrainState:
    """A step-0 state for ``values`` with a fresh optimizer state.

    Example:
        >>> import torch
        >>> from spdelta.optim import adamw
        >>> init_train_state(adamw(0.1), {"w": torch.zeros(3)}).step
        0
    """
    return TrainState(values, optimizer.init(values), 0)


def make_train_step(
    loss_fn: LossFn, optimizer: Transform, base: Params, support: Support
) -> TrainStepFn:
    """Build a pure ``train_step(state, batch) -> (state, metrics)`` with a fixed support.

    One step: ``grads, loss = eager_grad_and_value(loss_fn)(values, base, support,
    batch)``, then ``updates, opt_state = optimizer.update(grads, opt_state, values)``
    and ``values = apply_updates(values, updates)``. ``base`` and ``support`` are data
    closed over, never differentiated; only ``values`` are. A
    :class:`~spdelta.train.MicroBatches` in place of the batch accumulates the
    gradient over its micro-batches (:func:`~spdelta.train.micro_batches`), one
    forward and backward at a time, before the one update.

    The gradient is :func:`spdelta.functional.eager_grad_and_value` (``torch.autograd.grad``
    without ``create_graph``), not ``torch.func.grad_and_value``: each saved activation
    is freed as soon as backward has used it (measured 1274 MB vs 2984 MB peak on the
    default ``tools/bench/train_step.py`` model). The maths is the same; gradients that
    accumulate over several paths may differ from ``torch.func``'s in the last ulps
    (summation order). Results are deterministic run to run.

    Args:
        loss_fn: ``fn(values, base, support, batch) -> scalar``, e.g. from
            :func:`spdelta.make_loss_fn`.
        optimizer: An ``(init, update)`` transform, e.g. :func:`spdelta.optim.adamw`.
        base: Name -> tensor; not modified.
        support: Name -> 1-D int64 sorted indices of the trained entries.

    Returns:
        ``train_step``; its metrics are ``{"loss": float, "step": float}`` (the loss
        before the update, the step count after it).

    Example:
        >>> import torch
        >>> from spdelta import make_loss_fn
        >>> from spdelta.optim import adamw
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> fn = make_loss_fn(model, loss=lambda out, batch: out.sum())
        >>> opt = adamw(0.5)
        >>> base, support = {"weight": torch.zeros(1, 2)}, {"weight": torch.tensor([1])}
        >>> step = make_train_step(fn, opt, base, support)
        >>> state, metrics = step(init_train_state(opt, {"weight": torch.zeros(1)}),
        ...                       {"input": torch.tensor([[1.0, 1.0]])})
        >>> state.values["weight"].tolist(), metrics["loss"]
        ([-0.5], 0.0)
    """
    grad_fn = eager_grad_and_value(loss_fn)

    def train_step(state: TrainState, batch: StepInput) -> tuple[TrainState, dict[str, float]]:
        grads, loss = accumulate(lambda b: grad_fn(state.values, base, support, b), batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.values)
        values = {n: v.detach() for n, v in apply_updates(state.values, updates).items()}
        new = TrainState(values, opt_state, state.step + 1)
        return new, {"loss": float(loss.detach()), "step": float(new.step)}

    return train_step


def cycle(batches: Iterable[StepInput]) -> Iterator[StepInput]:
    """Yield from ``batches`` forever, re-iterating it when it is exhausted.

    Raises:
        SpdeltaError: (when iterated) ``batches`` yields nothing, e.g. an exhausted
            one-shot iterator.

    Example:
        >>> it = cycle([{"x": 1}, {"x": 2}])
        >>> [next(it)["x"] for _ in range(3)]
        [1, 2, 1]
    """
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise SpdeltaError("training batches: the iterable yielded no batch; pass a "
                               "non-empty list or a re-iterable such as a DataLoader.")


def run_steps(
    train_step: TrainStepFn,
    state: TrainState,
    batches: Iterator[StepInput],
    *,
    steps: int,
    progress: bool = True,
    desc: str = "train",
) -> tuple[TrainState, list[dict[str, float]]]:
    """Run ``steps`` steps drawing batches from the iterator ``batches``.

    Args:
        train_step: From :func:`make_train_step` (or any ``TrainStepFn``).
        state: The state to start from.
        batches: An iterator (wrap a list with :func:`cycle` to loop over it).
        steps: Number of steps, ``>= 0``.
        progress: Show a tqdm bar with the running loss.
        desc: Bar label.

    Returns:
        The final state and one metrics dict per step.

    Raises:
        SpdeltaError: ``batches`` ran out before ``steps`` steps.

    Example:
        >>> state = TrainState({}, None, 0)
        >>> step = lambda s, b: (s._replace(step=s.step + 1), {"loss": 0.0})
        >>> state, history = run_steps(step, state, cycle([{}]), steps=2, progress=False)
        >>> state.step, len(history)
        (2, 2)
    """
    history: list[dict[str, float]] = []
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        for _ in range(steps):
            batch = next(batches, None)
            if batch is None:
                raise SpdeltaError(f"training batches ran out after {len(history)} of {steps} "
                                   "steps; pass more batches or wrap them with cycle().")
            state, metrics = train_step(state, batch)
            history.append(metrics)
            bar.update(1)
            if "loss" in metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
    return state, history
