"""The settings of ``spdelta demo``, apart from the demo so that the CLI reads them cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from spdelta.train._defaults import DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_WARMUP

__all__ = ["DemoConfig"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`spdelta.recipes.demo.run_demo`; the defaults finish in minutes on 2 cores.

    Attributes:
        out_dir: Where the delta, the applied checkpoint and the report go.
        cache_dir: Where the converted SmolLM2 checkpoint is cached (None: default).
        density: Fraction of the linear weights' entries trained (SPEFT, gradient).
        steps: Optimizer steps.
        batch_size: Reviews per step.
        lr: AdamW peak learning rate of the delta values.
        schedule: Learning-rate decay after the warmup (``constant``, ``linear``, ``cosine``).
        warmup: Warmup steps (whole, ``>= 1``) or ratio of ``steps`` (``< 1``).
        calibration_examples: Reviews used to score gradient salience.
        eval_examples: Held-out (validation) reviews used for accuracy.
        max_length: Tokens per sequence.
        bf16: Run in bfloat16: about 3x faster on CPUs with avx512_bf16, but far slower
            (25x measured) on CPUs without it, hence off by default.
        seed: Seed of the data split, the shuffle and everything random.
        threads: torch threads (None: leave as is).
    """

    out_dir: str = "spdelta-demo"
    cache_dir: str | None = None
    density: float = 0.01
    steps: int = 100
    batch_size: int = 8
    lr: float = DEFAULT_LR["speft"]
    schedule: str = DEFAULT_SCHEDULE
    warmup: float = DEFAULT_WARMUP
    calibration_examples: int = 64
    eval_examples: int = 300
    max_length: int = 96
    bf16: bool = False
    seed: int = 0
    threads: int | None = None
