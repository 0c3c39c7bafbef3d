"""``spdelta extract --base A --tuned B --density D -o OUT``: top-k delta of a fine-tune."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from spdelta._version import __version__
from spdelta.cli._common import VALUE_DTYPES, add_output, command_of, fraction, new_parser
from spdelta.errors import OutputExistsError
from spdelta.format import file_sha256, save_delta
from spdelta.format.constants import KEY_PROVENANCE
from spdelta.hf import checkpoint_shards, extract_delta

NAME = "extract"


def regex(text: str) -> str:
    """An argparse type: a valid Python regular expression (returned unchanged).

    Example:
        >>> regex("mlp|self_attn")
        'mlp|self_attn'
    """
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(
            f"not a valid regular expression ({exc}): {text!r}"
        ) from None
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``extract``."""
    p = new_parser(
        subparsers,
        NAME,
        "extract a sparse delta from a fully fine-tuned checkpoint (top-|tuned - base|)",
        [
            "spdelta extract --base ./llama --tuned ./llama-ft --density 0.01 -o d.st",
            "spdelta extract --base ./llama --tuned ./llama-ft --density 0.01 -o d.st "
            "--scope global",
            "spdelta extract --base ./llama --tuned ./llama-ft --density 0.05 -o d.st "
            "--targets 'mlp|self_attn' --value-dtype bf16 --force",
        ],
    )
    p.add_argument("--base", required=True, metavar="DIR", help="base checkpoint directory")
    p.add_argument("--tuned", required=True, metavar="DIR", help="fine-tuned checkpoint directory")
    p.add_argument(
        "--density", required=True, type=fraction, help="fraction in [0, 1] of entries to keep"
    )
    add_output(p)
    p.add_argument(
        "--scope",
        default="per_tensor",
        choices=("per_tensor", "global"),
        help="budget per tensor, or over all tensors together (default per_tensor)",
    )
    p.add_argument(
        "--targets",
        type=regex,
        metavar="REGEX",
        help="only tensors whose name matches (re.search); default: every floating tensor",
    )
    p.add_argument(
        "--value-dtype",
        choices=sorted(VALUE_DTYPES),
        help="store values in this dtype (default: the difference's, fp32 or fp64)",
    )
    return p


def _inputs(base: str, tuned: str) -> list[dict[str, Any]]:
    """Provenance of the two checkpoints: directory name, role and sha256 of each weight file."""
    out = []
    for role, root in (("base", base), ("tuned", tuned)):
        files = {s: file_sha256(Path(root) / s) for s in sorted(checkpoint_shards(root))}
        out.append({"dir": os.path.basename(os.path.normpath(root)), "files": files, "role": role})
    return out


def _provenance(args: argparse.Namespace, parameters: dict[str, Any]) -> str:
    record = {
        "command": command_of(args),
        "inputs": _inputs(args.base, args.tuned),
        "operation": "extract",
        "parameters": parameters,
        "spdelta_version": __version__,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def run(args: argparse.Namespace) -> int:
    """Extract ``args.tuned - args.base`` into ``args.output``; print a summary."""
    if os.path.lexists(args.output) and not args.force:  # fail before the long part
        raise OutputExistsError(f"{args.output!r} exists; pass --force to replace it.")
    delta = extract_delta(
        args.base, args.tuned, density=args.density, scope=args.scope, targets=args.targets
    )
    parameters = {"density": args.density, "scope": args.scope, "targets": args.targets}
    dtype = None if args.value_dtype is None else VALUE_DTYPES[args.value_dtype]
    if dtype is not None:
        parameters["value_dtype"] = args.value_dtype
    meta = {KEY_PROVENANCE: _provenance(args, parameters)}
    save_delta(delta, args.output, metadata=meta, value_dtype=dtype, overwrite=args.force)
    print(
        f"wrote {args.output}: {len(delta)} tensors, nnz {delta.nnz}, "
        f"{os.path.getsize(args.output)} bytes"
    )
    return 0
