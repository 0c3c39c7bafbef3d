"""``spdelta apply --base DIR --delta D -o OUT``: write ``base + alpha * delta`` as a checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from spdelta._io import refuse_overlap
from spdelta.cli._common import finite, new_parser
from spdelta.errors import ParameterError
from spdelta.format import load_delta, read_header
from spdelta.format.constants import KEY_RESULT_FINGERPRINT
from spdelta.hf import apply_to_checkpoint, checkpoint_shards
from spdelta.patch import apply_patch

NAME = "apply"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``apply``."""
    p = new_parser(
        subparsers,
        NAME,
        "apply a delta file to a Hugging Face safetensors checkpoint, one shard at a time",
        [
            "spdelta apply --base ./llama --delta d.st -o ./llama-tuned",
            "spdelta apply --base ./llama --delta d.st -o ./half --alpha 0.5 --force",
            "spdelta apply --base ./other --delta d.st -o ./out --allow-base-mismatch",
            "spdelta apply --base ./step-100 --delta step-101.st -o ./step-101  # exact patch",
        ],
    )
    p.add_argument(
        "--base", required=True, metavar="DIR",
        help="base checkpoint (single or sharded; a .safetensors file for a patch)"
    )
    p.add_argument("--delta", required=True, metavar="DELTA", help="a spdelta file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--alpha", type=finite, default=1.0, help="scale of the delta (default 1)")
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="apply even if the delta's base fingerprint differs from the checkpoint",
    )
    return p


def _is_patch(args: argparse.Namespace) -> bool:
    """Exact path (spdelta.patch): replacement tensors, a result fingerprint, or a file base."""
    meta, infos = read_header(args.delta)
    replaced = any(i.value_encoding == "replace" for i in infos.values())
    exact = replaced or KEY_RESULT_FINGERPRINT in meta or os.path.isfile(args.base)
    if exact and args.alpha != 1.0:
        raise ParameterError(
            f"{args.delta} is an exact patch: it cannot be scaled; drop --alpha." if replaced
            or KEY_RESULT_FINGERPRINT in meta else
            "--alpha needs a checkpoint directory as --base; drop --alpha for a file.")
    return exact


def _apply_patch(args: argparse.Namespace) -> int:
    report = apply_patch(args.base, args.delta, args.output, overwrite=args.force,
                         check_base=not args.allow_base_mismatch,
                         progress=sys.stderr.isatty())
    check = "result verified" if report["verified"] else "result not verified"
    print(f"wrote {args.output}: patched {report['patched_tensors']} of {report['tensors']} "
          f"tensors (nnz {report['nnz']}), {report['result_fingerprint']} ({check})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Patch ``args.base`` with ``args.delta`` into ``args.output``; print a summary."""
    refuse_overlap(args.output, {"base": args.base, "delta": args.delta})  # --force or not
    if _is_patch(args):
        return _apply_patch(args)
    delta = load_delta(args.delta)
    shards = checkpoint_shards(args.base)
    apply_to_checkpoint(
        args.base,
        delta,
        args.output,
        alpha=args.alpha,
        overwrite=args.force,
        check_base=not args.allow_base_mismatch,
        progress=sys.stderr.isatty(),
    )
    print(
        f"wrote {args.output}: patched {len(delta)} tensors (nnz {delta.nnz}, "
        f"alpha {args.alpha:g}) in {len(shards)} shards"
    )
    return 0
