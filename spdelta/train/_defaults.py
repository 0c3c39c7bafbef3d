"""Training defaults in one place, for ``spdelta train``, ``spdelta demo`` and the recipes.

They are the settings that won on validation in ``tools/bench/quality.py``'s sweep of
learning rate x schedule over two tasks (the README's "Benchmarks" gives the table and
the command that produced it).
"""

from __future__ import annotations

from spdelta.errors import ParameterError

__all__ = ["DEFAULT_LR", "DEFAULT_SCHEDULE", "DEFAULT_WARMUP", "default_lr"]

#: Peak learning rate per method (AdamW on the delta values).
DEFAULT_LR = {"speft": 1e-3, "spiel": 1e-3}
#: Learning-rate decay after the warmup (:func:`spdelta.optim.warmup_schedule`).
DEFAULT_SCHEDULE = "constant"
#: Warmup, as a ratio of the run (``< 1``) or whole steps.
DEFAULT_WARMUP = 0.0


def default_lr(method: str) -> float:
    """The default peak learning rate of ``method`` (``"speft"`` or ``"spiel"``).

    Raises:
        ParameterError: An unknown method.

    Example:
        >>> default_lr("speft") == DEFAULT_LR["speft"]
        True
    """
    if method not in DEFAULT_LR:
        raise ParameterError(f"method: expected one of {sorted(DEFAULT_LR)}; found {method!r}.")
    return DEFAULT_LR[method]
