"""``spdelta convert IN -o OUT``: change the index encoding and/or the value dtype."""

from __future__ import annotations

import argparse
from typing import Any

from spdelta.cli._common import VALUE_DTYPES, add_output, command_of, new_parser
from spdelta.cli.merge import print_report
from spdelta.files import convert_file
from spdelta.format.constants import ENCODINGS

NAME = "convert"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert``."""
    p = new_parser(
        subparsers,
        NAME,
        "re-encode a delta file (index encoding, value dtype)",
        [
            "spdelta convert d.st -o small.st --value-dtype bf16",
            "spdelta convert d.st -o abs.st --index-encoding abs64 --force",
        ],
    )
    p.add_argument("input", metavar="IN", help="a spdelta file")
    add_output(p)
    p.add_argument(
        "--index-encoding",
        default="auto",
        choices=("auto", *ENCODINGS),
        help="index encoding (default auto: smallest per tensor)",
    )
    p.add_argument(
        "--value-dtype",
        choices=sorted(VALUE_DTYPES),
        help="cast values (quantized ones are dequantized); default: keep",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` into ``args.output``; print a summary."""
    dtype = None if args.value_dtype is None else VALUE_DTYPES[args.value_dtype]
    report = convert_file(
        args.input,
        args.output,
        index_encoding=args.index_encoding,
        value_dtype=dtype,
        overwrite=args.force,
        command=command_of(args),
    )
    print_report(report, args.json)
    return 0
