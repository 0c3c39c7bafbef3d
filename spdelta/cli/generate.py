"""``spdelta generate --model DIR --delta NAME=FILE ... --prompts P -o OUT``: a delta per prompt."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from spdelta._io import atomic_write
from spdelta._progress import tqdm
from spdelta.cli._common import new_parser
from spdelta.errors import BaseMismatchError, DataError

NAME = "generate"


def _named_delta(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, e.g. sentiment=a.st; "
                                         f"found {text!r}")
    return name, path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate``."""
    p = new_parser(
        subparsers, NAME,
        "generate completions from one base model, each prompt with its own delta (or none), "
        "many deltas in one batch",
        ["spdelta generate --model ckpt/ --delta sentiment=a.st --delta sql=b.st "
         "--prompts prompts.jsonl -o out.jsonl",
         "spdelta generate --model ckpt/ --delta a=a.st --prompts p.jsonl -o out.jsonl "
         "--chat --max-new-tokens 128 --batch-size 32 --force",
         'prompts.jsonl lines: {"prompt": "Is this review positive? ...", "delta": '
         '"sentiment"}  ("delta" null or absent: the base model)'])
    p.add_argument("--model", required=True, metavar="DIR", help="base checkpoint directory")
    p.add_argument("--delta", action="append", default=[], type=_named_delta,
                   metavar="NAME=FILE", help="a delta file and the name prompts use (repeat it)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help='JSON lines with "prompt" and optionally "delta"; other keys are copied')
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="JSON lines to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per batch, deltas mixed in each (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights dtype (default float32)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message with the tokenizer's chat template")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="serve deltas whose base fingerprint differs from the model")
    return p


def read_prompts(path: str, names: set[str]) -> list[dict[str, Any]]:
    """The prompt rows of ``path``; each names a delta of ``names`` or none.

    Raises:
        DataError: A line is not a JSON object with a string ``prompt``, or its
            ``delta`` is not one of ``names``.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}); write one object a line.") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f'{where}: expected an object with a string "prompt"; found '
                                f"{line.strip()[:80]!r}.")
            delta = row.get("delta")
            if delta is not None and delta not in names:
                given = ", ".join(sorted(names)) or "none"
                raise DataError(f"{where}: delta {delta!r} was not given with --delta NAME=FILE "
                                f"(given: {given}).")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no prompts; write one JSON object a line.")
    return rows


def run(args: argparse.Namespace) -> int:
    """Generate a completion for every prompt and write them as JSON lines."""
    from spdelta.serve.text import TextServer  # lazy: the subcommand's model server

    names = [n for n, _ in args.delta]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"--delta: give each NAME once; repeated: {', '.join(twice)}.")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise DataError("--max-new-tokens and --batch-size must be at least 1.")
    rows = read_prompts(args.prompts, set(names))
    with atomic_write(args.output, overwrite=args.force) as out:
        try:
            server = TextServer.load(args.model, dict(args.delta),
                                     dtype=getattr(torch, args.dtype),
                                     check_base=not args.allow_base_mismatch)
        except BaseMismatchError as e:  # the library's remedy, in this command's words
            raise BaseMismatchError(f"{str(e).split(';')[0]}; use the model the delta was made "
                                    "for, or pass --allow-base-mismatch.") from None
        if args.chat and not server.has_chat_template:
            raise DataError(f"--chat: the tokenizer in {args.model} has no chat template; "
                            "drop --chat.")
        made, start = 0, time.perf_counter()
        with tqdm(total=len(rows), unit="prompt", desc=NAME, disable=None,
                  file=sys.stderr) as bar:
            for i in range(0, len(rows), args.batch_size):
                batch = rows[i:i + args.batch_size]
                done = server.complete([r["prompt"] for r in batch],
                                       [r.get("delta") for r in batch],
                                       max_new_tokens=args.max_new_tokens, chat=args.chat)
                for row, (text, count) in zip(batch, done, strict=True):
                    out.write((json.dumps({**row, "completion": text, "new_tokens": count},
                                          ensure_ascii=False) + "\n").encode())
                    made += count
                bar.update(len(batch))
        seconds = time.perf_counter() - start
    print(f"wrote {args.output}: {len(rows)} completions, {made} new tokens in {seconds:.1f} s "
          f"({made / max(seconds, 1e-9):.1f} tokens/s)")
    return 0
