"""A training job's targets: their checkpoint layout, and what the job's log says of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

from spdelta.hf.layout import CheckpointLayout
from spdelta.route import ExpertsRouter, LinearRouter
from spdelta.targets import ALL_LINEAR, left_out, resolve_targets


class JobTargets(NamedTuple):
    """The target weights of a job and what the job reports about them."""

    names: list[str]  # model parameter names, sorted
    layout: Any  # spdelta.hf.layout.CheckpointLayout: the delta is written in checkpoint names
    left_out: dict[str, list[str]]  # what 'all-linear' skipped, by kind
    reference: list[str]  # targets without a fast kernel (a dense merge each step)


def job_targets(model: Any, spec: str) -> JobTargets:
    """Resolve ``spec`` on ``model``; its checkpoint layout, what was left out, slow ones."""
    names = resolve_targets(model, spec)
    fast = LinearRouter(model).names | ExpertsRouter(model).names
    return JobTargets(names, CheckpointLayout(model),
                      left_out(model, names) if spec == ALL_LINEAR else {},
                      sorted(set(names) - fast))


def say_targets(speak: Callable[[str], None], targets: JobTargets,
                shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Log the fused experts among the targets, what 'all-linear' left out, the slow ones."""
    experts = [n for n in targets.names if len(shapes[n]) == 3]
    if experts:
        speak(f"targets include {len(experts)} fused expert tensors "
              f"({sum(math.prod(shapes[n]) for n in experts):,} entries)")
    if targets.left_out:
        kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(targets.left_out.items()))
        shown = [n for v in targets.left_out.values() for n in v[:3]]
        more = any(len(v) > 3 for v in targets.left_out.values())
        speak(f"all-linear left out {kinds} weights (name them in --targets to train them): "
              + ", ".join(shown) + (" ..." if more else ""))
    if targets.reference:
        speak(f"reference path (a dense merge each step, no fast kernel) for "
              f"{len(targets.reference)} of {len(targets.names)} targets: "
              + ", ".join(targets.reference[:6]) + (" ..." if len(targets.reference) > 6 else ""))


def say_support(speak: Callable[[str], None], support: Mapping[str, Tensor],
                shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Log how many selected entries landed in fused expert tensors (a global top-k may
    leave them few: each expert sees only the tokens routed to it)."""
    experts = [n for n in support if len(shapes[n]) == 3]
    if experts:
        nnz = sum(int(i.numel()) for i in support.values())
        in_experts = sum(int(support[n].numel()) for n in experts)
        speak(f"selected {nnz:,} entries, {in_experts:,} of them in the fused experts")
