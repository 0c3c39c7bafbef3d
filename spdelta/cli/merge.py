"""``spdelta merge A B [C...] -o OUT``: merge delta files with a method of ``spdelta.ops``."""

from __future__ import annotations

import argparse
from typing import Any

from spdelta.cli._common import (
    AtLeastTwo,
    add_output,
    command_of,
    float_list,
    fraction_list,
    new_parser,
    print_json,
    scalar_or_list,
)
from spdelta.files import FileReport, merge_files
from spdelta.ops import MERGE_METHODS

NAME = "merge"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``merge``."""
    p = new_parser(
        subparsers,
        NAME,
        "merge delta files of one base model, streaming one tensor at a time",
        [
            "spdelta merge a.st b.st -o out.st",
            "spdelta merge a.st b.st -o out.st --weights 0.5,0.5",
            "spdelta merge a.st b.st c.st -o out.st --method ties --density 0.2",
            "spdelta merge a.st b.st -o out.st --method dare --density 0.3 --seed 1",
            "spdelta-merge a.st b.st -o out.st --force",
        ],
    )
    p.add_argument(
        "inputs", nargs="+", action=AtLeastTwo, metavar="DELTA", help="two or more spdelta files"
    )
    add_output(p)
    p.add_argument(
        "--method",
        default="task_arithmetic",
        choices=sorted(MERGE_METHODS),
        help="merge method (default: task_arithmetic)",
    )
    p.add_argument(
        "--weights",
        type=float_list,
        help="one weight, or one per input (comma-separated); default 1 each",
    )
    p.add_argument(
        "--density",
        type=fraction_list,
        help="fraction kept, one or one per input (magnitude, ties, dare, dare_ties, breadcrumbs)",
    )
    p.add_argument("--seed", type=int, help="seed of the random methods (default 0)")
    p.add_argument(
        "--gamma",
        type=fraction_list,
        help="breadcrumbs: fraction of largest entries dropped (default 0.01)",
    )
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="accept inputs whose base-model metadata differ",
    )
    p.add_argument("--dry-run", action="store_true", help="check inputs and options; write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Merge ``args.inputs`` into ``args.output``; print a summary."""
    random = MERGE_METHODS[args.method].random
    seed = args.seed if args.seed is not None or not random else 0
    params = {} if args.gamma is None else {"gamma": scalar_or_list(args.gamma)}
    report = merge_files(
        args.inputs,
        args.output,
        method=args.method,
        weights=scalar_or_list(args.weights),
        density=scalar_or_list(args.density),
        seed=seed,
        params=params,
        overwrite=args.force,
        allow_base_mismatch=args.allow_base_mismatch,
        command=command_of(args),
        dry_run=args.dry_run,
    )
    print_report(report, args.json)
    return 0


def print_report(file_report: FileReport, as_json: bool) -> None:
    """Print a file tool's report: JSON, or one summary line."""
    report = file_report.to_dict()  # the fields that apply to this operation
    if as_json:
        print_json(report)
    elif not report["written"]:
        print(
            f"dry run: would {report['operation']} {len(report['inputs'])} files "
            f"({report['tensors']} tensors, {report['input_bytes']} bytes) into "
            f"{report['output']}"
        )
    else:
        extra = "".join(
            f", {k} {report[k]:.6g}" for k in ("max_abs_error", "relative_error") if k in report
        )
        nnz = f", nnz {report['nnz']}" if "nnz" in report else ""
        print(
            f"wrote {report['output']}: {report['tensors']} tensors{nnz}, "
            f"{report['output_bytes']} bytes{extra}"
        )
