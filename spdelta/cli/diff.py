"""``spdelta diff BASE TUNED -o PATCH``: the exact patch between two checkpoints."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spdelta.cli._common import VALUE_DTYPES, add_output, command_of, new_parser, print_json
from spdelta.cli.extract import fraction, regex
from spdelta.patch import diff_checkpoints

NAME = "diff"


def count(text: str) -> int:
    """An argparse type: an integer >= 0.

    Example:
        >>> count("1000")
        1000
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, e.g. 1000; found {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``diff``."""
    p = new_parser(
        subparsers,
        NAME,
        "write the exact patch from BASE to TUNED (every element whose bits differ), or a "
        "lossy additive top-k delta with --density/--topk",
        [
            "spdelta diff ./step-100 ./step-101 -o step-101.st     # exact: apply gives step-101",
            "spdelta diff base.safetensors tuned.safetensors -o p.st --force",
            "spdelta diff ./llama ./llama-ft -o d.st --density 0.01 --value-dtype bf16  # lossy",
        ],
    )
    p.add_argument("base", metavar="BASE", help="checkpoint directory or .safetensors file")
    p.add_argument("tuned", metavar="TUNED", help="checkpoint of the same tensors, changed")
    add_output(p)
    lossy = p.add_mutually_exclusive_group()
    lossy.add_argument("--density", type=fraction,
                       help="lossy: keep this fraction of each tensor's largest |changes|")
    lossy.add_argument("--topk", type=count, metavar="K",
                       help="lossy: keep the K largest |changes| of each tensor")
    p.add_argument("--targets", type=regex, metavar="REGEX",
                   help="lossy only: tensors whose name matches (re.search)")
    p.add_argument("--value-dtype", choices=sorted(VALUE_DTYPES),
                   help="lossy only: store values in this dtype (default fp32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Diff ``args.base`` and ``args.tuned`` into ``args.output``; print a summary."""
    report = diff_checkpoints(
        args.base,
        args.tuned,
        args.output,
        density=args.density,
        k=args.topk,
        targets=args.targets,
        value_dtype=None if args.value_dtype is None else VALUE_DTYPES[args.value_dtype],
        overwrite=args.force,
        command=command_of(args),
        progress=sys.stderr.isatty(),
    )
    if args.json:
        print_json(report)
    else:
        print(f"wrote {args.output}: {report['mode']} patch, {report['changed_tensors']} of "
              f"{report['tensors']} tensors changed, nnz {report['nnz']} "
              f"({report['changed_fraction']:.4%} of elements), {report['output_bytes']} bytes "
              f"({report['bytes_per_entry']:.3f} per entry)")
    return 0
