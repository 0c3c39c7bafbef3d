"""Entry points ``spdelta`` and ``spdelta-merge``: parse, dispatch, turn errors into one line."""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from spdelta._version import __version__
from spdelta.cli._common import printable
from spdelta.errors import SpdeltaError, SpdeltaWarning
from spdelta.quant.nf4 import torchao_hidden

__all__ = ["build_parser", "cli_words", "main", "merge_main"]


def _commands() -> dict[str, ModuleType]:
    from spdelta.cli import (
        apply,
        compose,
        convert,
        demo,
        diff,
        extract,
        generate,
        inspect,
        merge,
        quantize,
        train,
        validate,
    )

    mods = [demo, train, inspect, validate, merge, compose, quantize, convert, apply, extract,
            generate, diff]
    return {m.NAME: m for m in mods}


def build_parser() -> argparse.ArgumentParser:
    """Return the ``spdelta`` parser with one subparser per command.

    Example:
        >>> "merge" in build_parser().format_help()
        True
    """
    parser = argparse.ArgumentParser(
        prog="spdelta",
        description="Sparse deltas: inspect, validate, merge, compose, "
        "quantize and convert spdelta files.",
        epilog="examples:\n  spdelta inspect d.safetensors\n"
        "  spdelta merge a.st b.st -o out.st --method ties --density 0.2\n"
        "  spdelta <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spdelta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in _commands().items():
        p = mod.add_parser(sub)
        p.add_argument("--debug", action="store_true", help="show the traceback on failure")
        p.set_defaults(_run=mod.run, _name=name)
    return parser


#: A library message names the keyword and, in parentheses, its flag (or the reverse):
#: ``pass overwrite=True (--force)``. The command line keeps only the flag.
_KEYWORD_AND_FLAG = re.compile(r"\b\w+=\w+ \((--[a-z][\w-]*)\)|(--[a-z][\w-]*) \(\w+=\w+\)")


def cli_words(message: str) -> str:
    """``message`` in the command line's words: flags, not keyword arguments.

    Example:
        >>> cli_words("'o.st' exists; pass overwrite=True (--force) to replace it.")
        "'o.st' exists; pass --force to replace it."
    """
    return _KEYWORD_AND_FLAG.sub(lambda m: m[1] or m[2], message)


@contextlib.contextmanager
def _one_line_warnings(prefix: str) -> Iterator[None]:
    """Show spdelta's own warnings as one line on stderr, ``spdelta merge: warning: ...``."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", SpdeltaWarning)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, SpdeltaWarning):
                line = printable(cli_words(str(message)).replace("\n", " "), backslash=False)
                print(f"{prefix}: warning: {line}", file=sys.stderr)
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        yield


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors
        return exc.code if isinstance(exc.code, int) else 2
    args._command = command + " " + shlex.join(argv)  # recorded in output provenance
    # torchao only for NF4: importing it (transformers does, when it is installed) prints
    # library-load lines and pytree warnings that are noise for every other command.
    quiet = contextlib.nullcontext() if getattr(args, "nf4", False) else torchao_hidden()
    try:
        with quiet, _one_line_warnings(f"{parser.prog} {args._name}"):
            return int(args._run(args))
    except (SpdeltaError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        message = printable(cli_words(str(exc)).replace("\n", " "), backslash=False)
        print(f"{parser.prog} {args._name}: error: {message}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spdelta`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 success, 1 failure (one line on stderr; ``--debug`` adds the
    traceback), 2 usage error.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        spdelta 0.1.0
    """
    return _dispatch(build_parser(), argv, "spdelta")


def merge_main(argv: Sequence[str] | None = None) -> int:
    """Run ``spdelta-merge a.st b.st -o out.st ...``: the same as ``spdelta merge``.

    Example:
        >>> merge_main(["--help"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return _dispatch(build_parser(), ["merge", *args], "spdelta")


if __name__ == "__main__":
    sys.exit(main())
