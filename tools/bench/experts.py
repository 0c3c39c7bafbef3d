"""Benchmark the fast path for fused MoE expert deltas against the reference path.

A random-init Mixtral (transformers 5: ``mlp.experts.gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I) per layer). One step is ``torch.func.grad_and_value`` of
``make_loss_fn(model)`` over delta values on every ``all-linear`` target (attention and
experts) at ``--density``, as ``spdelta train`` runs it. Variants:

  ``experts_fast``       expert deltas through :class:`ExpertsRouter` (the eager loop
                         over experts, each through the sparse-delta kernel, gradient
                         at the support); the model is built with the eager experts
                         implementation, the only one the router replaces.
  ``experts_reference``  the experts router switched off: each step merges the delta
                         into the whole 3-D tensors (kept for backward) and backward
                         builds their dense gradient, in transformers' experts kernel
                         ``--experts-implementation`` (default ``grouped_mm``; ``eager``
                         compares the same loop with and without the router).
  ``attention_only``     deltas on the attention projections only: the floor that the
                         expert deltas add to.

Time: all variants in this process, taking turns for ``--steps`` rounds after
``--warmup`` steps each; ``step_s`` is the median, and ``time_fast_over_reference_paired``
the median over rounds of the two variants' ratio within a round (robust to load from
other processes on a shared machine). Memory: each variant in a fresh child
process; ``peak_mb`` is ``VmHWM - VmRSS`` over ``--mem-steps`` steps after the model,
batch and values exist (the peak-RSS counter reset via ``/proc/self/clear_refs``; see
``train_step.py``). On a CUDA device (``--device cuda``) the memory is
``torch.cuda.max_memory_allocated`` above the allocation before the steps.

Usage: ``python tools/bench/experts.py [--json] [--device cuda] [--layers 4] ...``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import _reset_peak_rss, _status_kb  # noqa: E402

VARIANTS = ("experts_fast", "experts_reference", "attention_only")


def build(cfg: dict[str, Any], impl: str) -> tuple[Any, dict[str, Any], Any]:
    """The model (experts kernel ``impl``), one batch and a generator, on ``cfg['device']``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(cfg["seed"])
    config = MixtralConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                           num_hidden_layers=cfg["layers"], num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=cfg["vocab"],
                           num_local_experts=cfg["experts"], num_experts_per_tok=cfg["top_k"],
                           max_position_embeddings=cfg["seq"],
                           experts_implementation=impl)
    model = MixtralForCausalLM(config).to(cfg["device"]).train()
    gen = torch.Generator().manual_seed(cfg["seed"])
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
    batch = {"input_ids": ids.to(cfg["device"]), "labels": ids.to(cfg["device"])}
    return model, batch, gen


def make_step(name: str, cfg: dict[str, Any]) -> Any:
    """The step closure of variant ``name`` (returns the loss as a float)."""
    from torch.func import grad_and_value

    import spdelta.functional as functional
    from spdelta import make_loss_fn
    from spdelta.targets import resolve_targets
    from spdelta.train.spiel import random_support

    # The routed loop replaces the eager loop only (see spdelta/kernels/_experts.py).
    model, batch, gen = build(cfg, "eager" if name == "experts_fast" else
                              cfg["experts_implementation"])
    base = {n: p.detach() for n, p in model.named_parameters()}
    spec: Any = "all-linear" if name != "attention_only" else ["q_proj", "k_proj", "v_proj",
                                                              "o_proj"]
    names = resolve_targets(model, spec)
    support = random_support({n: tuple(base[n].shape) for n in names}, density=cfg["density"],
                             generator=gen, device=cfg["device"])
    values = {n: torch.zeros(i.numel(), device=cfg["device"]) for n, i in support.items()}
    router = functional.ExpertsRouter
    if name == "experts_reference":  # the same loss function, experts left to the merge
        functional.ExpertsRouter = type("Off", (), {  # type: ignore[misc]
            "__init__": lambda self, m: None, "names": frozenset(),
            "patch": lambda self, d: contextlib.nullcontext()})
    try:
        fn = grad_and_value(make_loss_fn(model))
    finally:
        functional.ExpertsRouter = router  # type: ignore[misc]

    def step() -> float:
        _, loss = fn(values, base, support, batch)
        if cfg["device"] != "cpu":
            torch.cuda.synchronize()
        return float(loss)

    return step


def measure_time(cfg: dict[str, Any]) -> dict[str, Any]:
    steps = {n: make_step(n, cfg) for n in cfg["variants"]}
    for step in steps.values():
        for _ in range(cfg["warmup"]):
            step()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(cfg["steps"]):
        for n, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t0)
    return {n: {"step_s": statistics.median(t), "step_s_all": t} for n, t in times.items()}


def measure_memory(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import gc

    step = make_step(name, cfg)
    gc.collect()
    if cfg["device"] != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(cfg["mem_steps"]):
            step()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20,
                "mem_method": "cuda.max_memory_allocated"}
    before = _status_kb("VmRSS")
    exact = _reset_peak_rss()
    for _ in range(cfg["mem_steps"]):
        step()
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024,
            "mem_method": "VmHWM-after-clear_refs" if exact else "VmHWM"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in (("hidden", 256), ("intermediate", 512), ("layers", 4), ("experts", 8),
                          ("top-k", 2), ("vocab", 2000), ("batch", 4), ("seq", 128),
                          ("steps", 7), ("warmup", 2), ("mem-steps", 3), ("threads", 2),
                          ("seed", 0)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts-implementation", default="grouped_mm")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="time only (no child processes)")
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = {k: v for k, v in vars(args).items() if k not in ("json", "_memory", "no_memory")}
    cfg["variants"] = args.variants.split(",")
    torch.set_num_threads(cfg["threads"])
    if args._memory:
        print(json.dumps(measure_memory(args._memory, cfg)))
        return 0
    result: dict[str, Any] = {"config": cfg, "variants": measure_time(cfg)}
    for name in [] if args.no_memory else cfg["variants"]:
        child = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]),
                                "--_memory", name], capture_output=True, text=True, check=True,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        result["variants"][name].update(json.loads(child.stdout.strip().splitlines()[-1]))
    v = result["variants"]
    if {"experts_fast", "experts_reference"} <= v.keys():
        fast, ref = v["experts_fast"], v["experts_reference"]
        result["time_fast_over_reference"] = fast["step_s"] / ref["step_s"]
        # Same-round ratios: load from other processes hits both steps of a round alike.
        result["time_fast_over_reference_paired"] = statistics.median(
            a / b for a, b in zip(fast["step_s_all"], ref["step_s_all"], strict=True))
        if not args.no_memory:
            result["peak_fast_over_reference"] = fast["peak_mb"] / ref["peak_mb"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for name, r in v.items():
            peak = f"   peak {r['peak_mb']:.1f} MB" if "peak_mb" in r else ""
            print(f"{name:18s} step {r['step_s']:.4f} s{peak}")
        for k in ("time_fast_over_reference", "peak_fast_over_reference"):
            if k in result:
                print(f"{k}: {result[k]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
