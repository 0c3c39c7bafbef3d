"""Helpers shared by the subcommands: common options, argument types, output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "VALUE_DTYPES",
    "AtLeastTwo",
    "add_output",
    "command_of",
    "finite",
    "float_list",
    "fraction",
    "fraction_list",
    "new_parser",
    "non_negative",
    "positive",
    "printable",
    "print_json",
]

#: ``--value-dtype`` choices.
VALUE_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f64": torch.float64,
}


def new_parser(
    subparsers: Any, name: str, help_text: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """A subparser whose help ends with an examples epilog."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_output(parser: argparse.ArgumentParser) -> None:
    """``-o/--output`` (required) and ``--force``."""
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


class AtLeastTwo(argparse.Action):
    """A ``nargs="+"`` positional that needs at least two values (a usage error otherwise)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if len(values) < 2:
            parser.error(f"{self.dest}: give at least two delta files; found {len(values)}")
        setattr(namespace, self.dest, list(values))


def _number(text: str, low: float, high: float, *, low_open: bool = False) -> float:
    """``text`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    bad = not math.isfinite(value) or value > high or value < low or (low_open and value == low)
    if bad:
        left = "(" if low_open else "["
        where = "" if (low, high) == (-math.inf, math.inf) else f" in {left}{low:g}, {high:g}]"
        raise argparse.ArgumentTypeError(f"expected a finite number{where}; found {text!r}")
    return value


def finite(text: str) -> float:
    """An argparse type: any finite number (not nan, inf, or past float range).

    Example:
        >>> finite("-0.5")
        -0.5
    """
    return _number(text, -math.inf, math.inf)


def fraction(text: str) -> float:
    """An argparse type: a number in ``[0, 1]``.

    Example:
        >>> fraction("0.01")
        0.01
    """
    return _number(text, 0.0, 1.0)


def positive(text: str) -> float:
    """An argparse type: a finite number ``> 0`` (a learning rate, a number of epochs).

    Example:
        >>> positive("1e-4")
        0.0001
    """
    return _number(text, 0.0, math.inf, low_open=True)


def non_negative(text: str) -> float:
    """An argparse type: a finite number ``>= 0`` (a weight decay).

    Example:
        >>> non_negative("0")
        0.0
    """
    return _number(text, 0.0, math.inf)


def float_list(text: str) -> list[float]:
    """An argparse type: ``"0.5,0.5"`` -> ``[0.5, 0.5]``; every number finite.

    Example:
        >>> float_list("0.5, 1e-2")
        [0.5, 0.01]
    """
    return [_list_item(x, text, finite) for x in text.split(",")]


def fraction_list(text: str) -> list[float]:
    """An argparse type: comma-separated numbers in ``[0, 1]``.

    Example:
        >>> fraction_list("0.2,1")
        [0.2, 1.0]
    """
    return [_list_item(x, text, fraction) for x in text.split(",")]


def _list_item(item: str, text: str, kind: Callable[[str], float]) -> float:
    try:
        return kind(item.strip())
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(
            f"{e} (in {text!r}); give comma-separated numbers, e.g. 0.5,0.5") from None


def scalar_or_list(values: list[float] | None) -> float | list[float] | None:
    """One number stays a scalar (broadcast to every input); several stay a list."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def printable(text: str, *, backslash: bool = True) -> str:
    r"""``text`` safe to print on a terminal: control and format characters escaped.

    Escape sequences in a tensor name or metadata value (``\x1b[2J`` clears the screen,
    ``\u202e`` reverses the text) are shown as escapes, as ``repr`` does, and so is a
    backslash (unless ``backslash`` is false, for text already quoted with ``repr``),
    so that the output is unambiguous.

    Example:
        >>> print(printable("w\x1b[31m\u202e\\"))
        w\x1b[31m\u202e\\
    """
    return "".join(ch if ch.isprintable() and (ch != "\\" or not backslash) else _escape(ch)
                   for ch in text)


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def command_of(args: argparse.Namespace) -> str | None:
    """The command line that invoked this run (recorded in the provenance)."""
    return getattr(args, "_command", None)


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
