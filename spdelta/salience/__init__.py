"""Salience metrics: score every entry of the target weights (higher = keep).

Each metric registers itself in :data:`METRICS`;
:func:`score` runs one by name.

Example:
    >>> from spdelta.salience import METRICS
    >>> sorted(METRICS)[:3]
    ['fisher', 'force', 'gradient']

References:
    Liu et al., "Refining Salience-Aware Sparse Fine-Tuning Strategies for Language
    Models", ACL 2025, https://arxiv.org/abs/2412.13488
"""

from spdelta.salience import (  # noqa: F401  (importing registers the metrics)
    first_order,
    fisher,
    grasp,
    magnitude,
    random,
    synflow,
)
from spdelta.salience._calib import Calibration, LossCallable
from spdelta.salience._registry import METRICS, Metric, register_metric
from spdelta.salience._score import score

__all__ = [
    "Calibration",
    "LossCallable",
    "METRICS",
    "Metric",
    "register_metric",
    "score",
]
