"""Part (a) of tools/bench/patch.py: the exact patch of a real, short full fine-tune."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

INT32_BF16 = 6  # bytes per entry of the (int32 flat index, bf16 value) layout


def save_bf16(model: torch.nn.Module, folder: Path, config_dir: Path) -> int:
    """The bf16 cast of the model's checkpoint tensors (what a trainer syncs); its bytes."""
    from spdelta.hf import checkpoint_tensors

    folder.mkdir(parents=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous()
               for k, v in checkpoint_tensors(model).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(config_dir / "config.json", folder / "config.json")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _bitwise_equal(a: Path, b: Path) -> bool:
    from spdelta.patch import bit_view

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and torch.equal(bit_view(x[k]), bit_view(y[k])) for k in x)


def _figures(report: dict[str, Any], ckpt_bytes: int, patch: Path, base: Path, tuned: Path,
             out: Path) -> dict[str, Any]:
    from spdelta.patch import apply_patch

    t0 = time.perf_counter()
    apply_patch(base, patch, out)
    apply_s = time.perf_counter() - t0
    nnz, size = report["nnz"], patch.stat().st_size
    return {"tensors": report["tensors"], "changed_tensors": report["changed_tensors"],
            "numel": report["numel"], "nnz": nnz, "changed_fraction": report["changed_fraction"],
            "patch_bytes": size, "checkpoint_bytes": ckpt_bytes,
            "bytes_per_changed_entry": size / nnz if nnz else 0.0,
            "patch_over_checkpoint": size / ckpt_bytes,
            "int32_bf16_bytes": INT32_BF16 * nnz,
            "over_int32_bf16": size / (INT32_BF16 * nnz) if nnz else 0.0,
            "apply_s": apply_s, "apply_is_bitwise_exact": _bitwise_equal(out, tuned)}


def finetune(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train ``args.steps`` AdamW steps in fp32, save bf16 casts, diff them, apply the diffs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spdelta.patch import diff_checkpoints
    from spdelta.recipes.assets import smollm2_checkpoint
    from spdelta.recipes.data import batches, load_rotten_tomatoes

    model_dir = Path(args.model) if args.model else smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = batches(tok, load_rotten_tomatoes()["train"], batch_size=args.batch,
                   max_length=args.max_length, generator=torch.Generator().manual_seed(0))
    last = args.steps
    ckpt_bytes = save_bf16(model, work / "step0", model_dir)
    losses, t0 = [], time.perf_counter()
    for step in range(1, last + 1):
        loss = model(**next(data)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step >= last - 1:
            save_bf16(model, work / f"step{step}", model_dir)
    train_s = time.perf_counter() - t0
    diffs = {}
    for name, (a, b) in {f"step0_to_{last}": (0, last),
                         f"step{last - 1}_to_{last}": (last - 1, last)}.items():
        base, tuned, patch = work / f"step{a}", work / f"step{b}", work / f"{name}.st"
        report = diff_checkpoints(base, tuned, patch)
        diffs[name] = _figures(report, ckpt_bytes, patch, base, tuned, work / f"{name}-out")
    return {"model": str(model_dir.name), "steps": last, "lr": args.lr, "optimizer": "AdamW",
            "master_weights": "fp32", "checkpoint_dtype": "bf16", "batch": args.batch,
            "max_length": args.max_length, "losses": losses, "train_s": train_s,
            "diffs": diffs}
