"""``spdelta train --model DIR --data FILE -o d.st``: train a sparse delta on an HF model."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from spdelta.cli._common import fraction, new_parser, non_negative, positive, print_json
from spdelta.optim import SCHEDULES
from spdelta.recipes._job_config import TrainConfig
from spdelta.salience import METRICS
from spdelta.train import DEFAULT_LR

NAME = "train"


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(","))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train``."""
    d = TrainConfig(model="", data="", output="")
    p = new_parser(
        subparsers, NAME,
        "train a sparse delta (SPEFT or SpIEL) on a Hugging Face causal LM checkpoint",
        ["spdelta train --model ckpt/ --data train.jsonl -o d.st --steps 200",
         "spdelta train --model ckpt/ --data reviews.csv --label-names negative,positive "
         "--density 0.005 --epochs 2 -o sentiment.st",
         "spdelta train --model ckpt/ --data rows.json --method spiel --regrowth ma -o d.st",
         "spdelta train ... --checkpoint-every 50 --resume   # continue an interrupted run",
         "spdelta train ... --eval-fraction 0.1 --keep best --micro-batch-size 4",
         "spdelta train ... --chat-template none --template 'Review: {text} Sentiment:'",
         "torchrun --standalone --nproc_per_node 2 -m spdelta train --model ckpt/ "
         "--data d.jsonl -o d.st"])
    p.add_argument("--model", required=True, help="checkpoint directory (or cached hub id)")
    p.add_argument("--data", required=True,
                   help=".csv/.tsv/.json/.jsonl/.parquet file, save_to_disk dir, or dataset name")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="delta file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["speft", "spiel"], default=d.method,
                   help=f"default {d.method}")
    g.add_argument("--metric", choices=sorted(METRICS), default=d.metric,
                   help=f"SPEFT salience (default {d.metric})")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--density", type=fraction,
                        help="fraction of target entries (default 0.01)")
    budget.add_argument("--lora-rank", type=int, help="as many entries as a rank-r LoRA")
    g.add_argument("--targets", default=d.targets,
                   help="'all-linear', module suffixes or a regex (default all-linear)")
    g.add_argument("--regrowth", choices=["ag", "ma"], default=d.regrowth,
                   help="SpIEL regrowth (default ag)")
    g.add_argument("--update-every", type=int, default=d.update_every,
                   help=f"SpIEL steps between regrowths (default {d.update_every})")
    g.add_argument("--accumulate-steps", type=int, default=d.accumulate_steps,
                   help=f"SpIEL-AG gradient window (default {d.accumulate_steps})")
    g.add_argument("--calibration-examples", type=int, default=d.calibration_examples,
                   help=f"SPEFT scoring examples (default {d.calibration_examples})")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=positive, default=None,
                   help="peak learning rate (default: " + ", ".join(
                       f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")")
    o.add_argument("--schedule", choices=list(SCHEDULES), default=d.schedule,
                   help=f"learning-rate decay after the warmup (default {d.schedule})")
    o.add_argument("--warmup", type=non_negative, default=d.warmup,
                   help=f"warmup steps (>= 1) or ratio of the run (< 1) (default {d.warmup:g})")
    o.add_argument("--max-grad-norm", type=positive, default=d.max_grad_norm,
                   help="clip the gradient to this global norm (default: no clipping)")
    o.add_argument("--weight-decay", type=non_negative, default=d.weight_decay)
    length = o.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=positive, help="passes over the data (default 1)")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch (default {d.batch_size})")
    o.add_argument("--micro-batch-size", type=int,
                   help="rows per forward/backward; gradients accumulate to --batch-size")
    o.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"tokens per sequence (default {d.max_length})")
    o.add_argument("--bf16", action="store_true", help="bfloat16 base (fast on GPUs/avx512_bf16)")
    o.add_argument("--nf4", action="store_true", help="4-bit NF4 base targets (needs torchao)")
    o.add_argument("--device", help="cpu, cuda or cuda:N (default: this process's GPU if "
                   "there is one, else the CPU)")
    o.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard base, values and optimizer state (FSDP2)")
    o.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    f = p.add_argument_group("data format")
    f.add_argument("--split", default=d.split, help=f"default {d.split}")
    f.add_argument("--prompt-column", help="default: prompt/instruction/question/input")
    f.add_argument("--response-column", help="default: response/completion/output/answer")
    f.add_argument("--text-column", default=d.text_column, help="text + label format")
    f.add_argument("--label-column", default=d.label_column, help="text + label format")
    f.add_argument("--label-names", type=_names,
                   help="comma-separated response text per label id (e.g. negative,positive)")
    f.add_argument("--template", help="prompt template over the columns, e.g. 'Review: {text}'")
    f.add_argument("--system", help="system message for chat templates")
    f.add_argument("--chat-template", default=d.chat_template, metavar="auto|none|FILE",
                   help="prompt layout: the tokenizer's chat template (auto), plain prompt + "
                        "response text (none), or a Jinja template file (default auto)")
    e = p.add_argument_group("evaluation")
    held = e.add_mutually_exclusive_group()
    held.add_argument("--eval-data", help="held-out rows (same formats as --data)")
    held.add_argument("--eval-split", help="a split of --data to hold out (dataset dirs/names)")
    held.add_argument("--eval-fraction", type=fraction,
                      help="hold out this fraction of the training rows (drawn with --seed)")
    e.add_argument("--eval-every", type=int,
                   help="evaluate every N steps and at the end (default: about 10 times a run)")
    e.add_argument("--keep", choices=["last", "best"], default=d.keep,
                   help="write the last step's delta, or the best evaluation's (default last)")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints, 0 for none (default {d.checkpoint_every})")
    c.add_argument("--checkpoint-dir", help="default OUT.ckpt")
    c.add_argument("--resume", action="store_true", help="continue from the checkpoint if any")
    c.add_argument("--stop-after", type=int, help="stop after N steps in this run (resumable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the job; print a summary. 0 on success (also when stopped by ``--stop-after``)."""
    from spdelta.recipes.job import train_job  # lazy: transformers and datasets load here

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    opts = {k: v for k, v in vars(args).items() if k in fields}
    opts["progress"] = not args.no_progress
    summary = train_job(TrainConfig(**opts), say=(lambda _: None) if args.json else print)
    if args.json:
        print_json(summary)
    return 0
