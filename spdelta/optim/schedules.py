"""Learning-rate schedules: pure functions ``schedule(step) -> lr`` (optax style).

``step`` is the number of updates taken before this one (0 for the first update), as in
optax's ``count`` and the Hugging Face ``LambdaLR`` schedules. The optimizers
(:func:`~spdelta.optim.adamw`, :func:`~spdelta.optim.sm3`) take a schedule wherever they
take a learning rate and keep the count in their state, so a run resumed from a saved
state continues the schedule where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from spdelta.errors import ParameterError

__all__ = ["SCHEDULES", "Schedule", "constant_schedule", "cosine_decay_schedule",
           "join_schedules", "linear_schedule", "resolve_warmup", "warmup_schedule"]

#: ``schedule(step) -> learning rate``; ``step >= 0`` is the number of updates already taken.
Schedule = Callable[[int], float]
ScheduleKind = Literal["constant", "linear", "cosine"]
#: The decays :func:`warmup_schedule` knows.
SCHEDULES: tuple[ScheduleKind, ...] = ("constant", "linear", "cosine")


def _finite(**kw: float) -> None:
    bad = {k: v for k, v in kw.items() if not math.isfinite(v)}
    if bad:
        raise ParameterError(f"schedule: expected finite values; found {bad}.")


def constant_schedule(value: float) -> Schedule:
    """``lr(t) = value`` for every step.

    Example:
        >>> constant_schedule(0.1)(7)
        0.1
    """
    _finite(value=value)

    def schedule(step: int) -> float:
        del step
        return value

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int,
                    transition_begin: int = 0) -> Schedule:
    """Go linearly from ``init_value`` to ``end_value`` over ``transition_steps`` steps.

    ``lr(t) = init + (end - init) * clip((t - begin) / transition_steps, 0, 1)``; with
    ``transition_steps = 0`` the value is ``init_value`` throughout (optax's convention).

    Args:
        init_value: The value up to step ``transition_begin``.
        end_value: The value from step ``transition_begin + transition_steps`` on.
        transition_steps: Length of the ramp, ``>= 0``.
        transition_begin: Step the ramp starts at, ``>= 0``.

    Returns:
        The schedule.

    Raises:
        ParameterError: A negative length or start, or a value that is not finite.

    Example:
        >>> s = linear_schedule(0.0, 1.0, 4)
        >>> [s(t) for t in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    _finite(init_value=init_value, end_value=end_value)
    if transition_steps < 0 or transition_begin < 0:
        raise ParameterError(f"linear_schedule: expected transition_steps >= 0 and "
                             f"transition_begin >= 0; found {transition_steps} and "
                             f"{transition_begin}.")

    def schedule(step: int) -> float:
        if transition_steps == 0:
            return init_value
        frac = min(max((step - transition_begin) / transition_steps, 0.0), 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over ``decay_steps``.

    ``lr(t) = init * ((1 - alpha) * (1 + cos(pi * min(t, T) / T)) / 2 + alpha)`` with
    ``T = decay_steps`` (Loshchilov & Hutter's SGDR without restarts; optax's
    ``cosine_decay_schedule``). With ``T = 0`` the value is ``init_value`` throughout.

    Args:
        init_value: The value at step 0.
        decay_steps: Steps to the end of the decay, ``>= 0``.
        alpha: The final value as a fraction of ``init_value``.

    Returns:
        The schedule.

    Raises:
        ParameterError: ``decay_steps < 0`` or a value that is not finite.

    Example:
        >>> s = cosine_decay_schedule(1.0, 4)
        >>> [round(s(t), 4) for t in range(5)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0]

    References:
        Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", 2017,
        https://arxiv.org/abs/1608.03983
    """
    _finite(init_value=init_value, alpha=alpha)
    if decay_steps < 0:
        raise ParameterError(f"cosine_decay_schedule: expected decay_steps >= 0; found "
                             f"{decay_steps}.")

    def schedule(step: int) -> float:
        if decay_steps == 0:
            return init_value
        frac = min(max(step, 0), decay_steps) / decay_steps
        return init_value * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, each counting its own steps from 0.

    Step ``t`` with ``boundaries[i-1] <= t < boundaries[i]`` gets
    ``schedules[i](t - boundaries[i-1])`` (``boundaries[-1]`` read as 0), as optax's
    ``join_schedules``.

    Raises:
        ParameterError: ``len(boundaries) != len(schedules) - 1``, or the boundaries are
            not non-decreasing and non-negative.

    Example:
        >>> s = join_schedules([constant_schedule(1.0), linear_schedule(1.0, 0.0, 2)], [3])
        >>> [s(t) for t in range(6)]
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    bounds = list(boundaries)
    if len(bounds) != len(schedules) - 1 or any(b < 0 for b in bounds) or bounds != sorted(bounds):
        raise ParameterError(f"join_schedules: expected {len(schedules) - 1} non-decreasing, "
                             f"non-negative boundaries; found {bounds}.")
    parts = list(schedules)

    def schedule(step: int) -> float:
        start = 0
        for i, b in enumerate(bounds):
            if step < b:
                return parts[i](step - start)
            start = b
        return parts[-1](step - start)

    return schedule


def resolve_warmup(warmup: float, total_steps: int) -> int:
    """Warmup steps from ``warmup`` given as a count (``>= 1``, whole) or a ratio (``< 1``).

    A ratio ``r`` gives ``ceil(r * total_steps)`` steps (the Hugging Face Trainer's rule
    for ``warmup_ratio``); 0 is no warmup.

    Args:
        warmup: Steps (a whole number ``>= 1``) or a fraction of the run in ``[0, 1)``.
        total_steps: Length of the run, ``>= 0``.

    Returns:
        The number of warmup steps, at most ``total_steps``.

    Raises:
        ParameterError: ``warmup`` is negative, or ``>= 1`` and not whole.

    Example:
        >>> resolve_warmup(0.1, 95), resolve_warmup(20, 95), resolve_warmup(500, 95)
        (10, 20, 95)
    """
    if not (0 <= warmup < 1 or (warmup >= 1 and float(warmup).is_integer())):
        raise ParameterError(f"warmup: expected a ratio in [0, 1) or a whole number of steps; "
                             f"found {warmup}.")
    steps = math.ceil(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(steps, max(total_steps, 0))


def warmup_schedule(kind: str, *, lr: float, total_steps: int, warmup: float = 0.0
                    ) -> Schedule:
    """Linear warmup from 0 to ``lr``, then ``kind`` decay to 0 at ``total_steps``.

    With ``W`` = :func:`resolve_warmup` steps and ``T = total_steps``, step ``t`` gets
    ``lr * t / W`` for ``t < W``, then: ``constant``: ``lr``; ``linear``:
    ``lr * (T - t) / (T - W)``; ``cosine``: ``lr * (1 + cos(pi * (t - W) / (T - W))) / 2``
    (clipped at 0 past ``T``). These are the Hugging Face schedules
    ``get_{constant,linear,cosine}_schedule_with_warmup`` times ``lr``; as there, the
    first update of a warmup has learning rate 0 (its gradient still enters the
    optimizer's moments).

    Args:
        kind: ``"constant"``, ``"linear"`` or ``"cosine"``.
        lr: The peak learning rate.
        total_steps: Length of the run, ``>= 0``.
        warmup: Warmup steps or ratio (see :func:`resolve_warmup`).

    Returns:
        The schedule.

    Raises:
        ParameterError: An unknown ``kind``, ``lr < 0``, ``total_steps < 0`` or a bad
            ``warmup``.

    Example:
        >>> s = warmup_schedule("linear", lr=1.0, total_steps=6, warmup=2)
        >>> [s(t) for t in range(6)]
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    """
    if kind not in SCHEDULES:
        raise ParameterError(f"schedule: expected one of {', '.join(SCHEDULES)}; found {kind!r}.")
    if not lr >= 0 or total_steps < 0:
        raise ParameterError(f"schedule: expected lr >= 0 and total_steps >= 0; found lr={lr}, "
                             f"total_steps={total_steps}.")
    w = resolve_warmup(warmup, total_steps)
    decay: Schedule
    if kind == "constant":
        decay = constant_schedule(lr)
    elif total_steps == w:  # no decay steps: the run ends with the warmup (0 from then on)
        decay = constant_schedule(0.0)
    elif kind == "linear":
        decay = linear_schedule(lr, 0.0, total_steps - w)
    else:
        decay = cosine_decay_schedule(lr, total_steps - w)
    if w == 0:
        return decay
    return join_schedules([linear_schedule(0.0, lr, w), decay], [w])
