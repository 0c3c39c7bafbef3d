"""``spdelta quantize IN -o OUT --bits 8|4``: int8 / int4 values with per-block scales."""

from __future__ import annotations

import argparse
from typing import Any

from spdelta.cli._common import add_output, command_of, new_parser
from spdelta.cli.merge import print_report
from spdelta.files import quantize_file

NAME = "quantize"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``quantize``."""
    p = new_parser(
        subparsers,
        NAME,
        "quantize values to int8 / int4 with per-block float32 "
        "scales (format 1.1); prints the error",
        [
            "spdelta quantize d.st -o d8.st",
            "spdelta quantize d.st -o d4.st --bits 4 --block-size 32",
        ],
    )
    p.add_argument("input", metavar="IN", help="a spdelta file")
    add_output(p)
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="code bits (default 8)")
    p.add_argument("--block-size", type=int, default=64, help="values per scale (default 64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Quantize ``args.input`` into ``args.output``; print the errors."""
    report = quantize_file(
        args.input,
        args.output,
        bits=args.bits,
        block_size=args.block_size,
        overwrite=args.force,
        command=command_of(args),
    )
    print_report(report, args.json)
    return 0
