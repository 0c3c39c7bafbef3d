"""Entry points ``spdelta`` and ``spdelta-merge``: parse, dispatch, turn errors into one line."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from spdelta.errors import SpdeltaError, SpdeltaWarning

__all__ = ["build_parser", "main", "merge_main"]


def _commands() -> dict[str, ModuleType]:
    from spdelta.cli import (
        apply,
        compose,
        convert,
        demo,
        diff,
        extract,
        inspect,
        merge,
        quantize,
        train,
        validate,
    )

    mods = [demo, train, inspect, validate, merge, compose, quantize, convert, apply, extract, diff]
    return {m.NAME: m for m in mods}


def build_parser() -> argparse.ArgumentParser:
    """Return the ``spdelta`` parser with one subparser per command.

    Example:
        >>> "merge" in build_parser().format_help()
        True
    """
    from spdelta import __version__

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


@contextlib.contextmanager
def _one_line_warnings(prefix: str) -> Iterator[None]:
    """Show spdelta's own warnings as one line on stderr, ``spdelta merge: warning: ...``."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", SpdeltaWarning)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, SpdeltaWarning):
                print(f"{prefix}: warning: {message}", file=sys.stderr)
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
    try:
        with _one_line_warnings(f"{parser.prog} {args._name}"):
            return int(args._run(args))
    except (SpdeltaError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        message = str(exc).replace("\n", " ")
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
