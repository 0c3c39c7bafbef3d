"""``spdelta demo``: the offline main job (SPEFT sentiment delta on SmolLM2-135M-Instruct)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from spdelta.cli._common import fraction, new_parser, non_negative, positive
from spdelta.recipes._demo_config import DemoConfig

NAME = "demo"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo``."""
    d = DemoConfig()
    p = new_parser(
        subparsers, NAME,
        "train a sentiment delta on SmolLM2-135M-Instruct (offline), save, inspect and apply it",
        ["spdelta demo", "spdelta demo --steps 300 --out-dir runs/demo",
         "spdelta demo --bf16 --eval-examples 200"])
    p.add_argument("--out-dir", default=d.out_dir, help=f"outputs (default {d.out_dir})")
    p.add_argument("--cache-dir", default=None, help="model cache (default ~/.cache/spdelta)")
    p.add_argument("--density", type=fraction, default=d.density, help=f"default {d.density}")
    p.add_argument("--steps", type=int, default=d.steps, help=f"default {d.steps}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=positive, default=d.lr,
                   help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=d.schedule,
                   help=f"learning-rate decay after the warmup (default {d.schedule})")
    p.add_argument("--warmup", type=non_negative, default=d.warmup,
                   help=f"warmup steps (>= 1) or ratio of the run (< 1) (default {d.warmup:g})")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples,
                   help=f"held-out reviews (default {d.eval_examples})")
    p.add_argument("--bf16", action="store_true",
                   help="run in bfloat16 (fast only on CPUs with avx512_bf16 or on GPUs)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed options; 0 on success."""
    from spdelta.recipes.demo import run_demo  # lazy: transformers and datasets load here

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    opts = {k: v for k, v in vars(args).items() if k in fields}
    run_demo(DemoConfig(**opts))
    return 0
