"""Training defaults in one place, for ``spdelta train``, ``spdelta demo`` and the recipes.

They are the settings that won on validation in ``tools/bench/quality.py``'s sweep of
learning rate x schedule over two tasks, Rotten Tomatoes sentiment and Hamlet language
modelling (SmolLM2-135M-Instruct, 40 steps x batch 8, a 1 % budget; the README's
"Defaults and where they come from" gives the table, its standard errors and the
commands). Mean validation accuracy over the two tasks:

- gradient SPEFT: LR 3e-4 constant 0.563 (sentiment 0.775, Hamlet 0.351); 3e-4 with
  10 % warmup + cosine 0.552; 1e-4 constant 0.525. The earlier default, 1e-3, lost on the
  sentiment task in the first sweep (0.693 vs 0.807 at 3e-4).
- SpIEL-AG: LR 1e-3 constant 0.546 (sentiment 0.742, Hamlet 0.350), the one point run on
  both tasks; on Hamlet cosine scored 0.325, on sentiment 3e-4 scored 0.750 (one task).

The schedule is shared by both methods: constant (no warmup) won for each where both
were run. Differences between schedules are within about one standard error (0.04 on
the 120 sentiment rows, 0.01 on Hamlet).
"""

from __future__ import annotations

from spdelta.errors import ParameterError

__all__ = ["DEFAULT_LR", "DEFAULT_SCHEDULE", "DEFAULT_WARMUP", "default_lr"]

#: Peak learning rate per method (AdamW on the delta values).
DEFAULT_LR = {"speft": 3e-4, "spiel": 1e-3}
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
