"""``spdelta validate FILE... [--json]``: every problem of each file against spec §7."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from spdelta.cli._common import new_parser, print_json, printable
from spdelta.errors import SpdeltaError
from spdelta.format import validate_file

NAME = "validate"


class ValidationFailed(SpdeltaError):
    """At least one file broke a rule (the problems were printed)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``validate``."""
    p = new_parser(
        subparsers,
        NAME,
        "check delta files against every rule of the spec; exit 1 if any problem",
        [
            "spdelta validate a.safetensors b.safetensors",
            "spdelta validate delta.safetensors --json",
        ],
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="spdelta files")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Validate every file; print the problems; raise ``ValidationFailed`` if any."""
    report = []
    for path in args.files:
        problems = [asdict(p) for p in validate_file(path)]
        report.append({"file": path, "valid": not problems, "problems": problems})
    if args.json:
        print_json(report)
    else:
        for entry in report:
            print(f"{printable(entry['file'])}: {'ok' if entry['valid'] else 'INVALID'}")
            for p in entry["problems"]:
                where = f" [{printable(p['tensor'])}]" if p["tensor"] is not None else ""
                line = f"  {p['rule']} {p['error']}{where}: {p['message']}".replace("\n", " ")
                print(printable(line, backslash=False))  # the message quotes names with repr
    bad = [e for e in report if not e["valid"]]
    if bad:
        count = sum(len(e["problems"]) for e in bad)
        raise ValidationFailed(f"{count} problems in {len(bad)} of {len(report)} files.")
    return 0
