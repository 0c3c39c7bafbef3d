"""``spdelta compose A B... -o OUT``: compose delta files in order (sums; patches chain)."""

from __future__ import annotations

import argparse
from typing import Any

from spdelta.cli._common import AtLeastTwo, add_output, command_of, new_parser
from spdelta.cli.merge import print_report
from spdelta.files import compose_files

NAME = "compose"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``compose``."""
    p = new_parser(
        subparsers,
        NAME,
        "compose delta files in order, streaming: additive deltas are summed (union of "
        "supports); patches chain, a later replacement winning (spec §6.5)",
        [
            "spdelta compose task.st style.st -o both.st",
            "spdelta compose a.st b.st c.st -o sum.st --force",
            "spdelta compose step-101.st step-102.st -o 100-to-102.st   # a patch chain",
        ],
    )
    p.add_argument(
        "inputs", nargs="+", action=AtLeastTwo, metavar="DELTA", help="two or more spdelta files"
    )
    add_output(p)
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="accept inputs whose base-model metadata differ",
    )
    p.add_argument("--dry-run", action="store_true", help="check inputs; write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Compose ``args.inputs`` into ``args.output``; print a summary."""
    report = compose_files(
        args.inputs,
        args.output,
        overwrite=args.force,
        allow_base_mismatch=args.allow_base_mismatch,
        command=command_of(args),
        dry_run=args.dry_run,
    )
    print_report(report, args.json)
    return 0
