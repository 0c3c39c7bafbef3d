"""Quality benchmark: sparse fine-tuning vs full fine-tuning and LoRA on SmolLM2 + Rotten Tomatoes.

Model: SmolLM2-135M-Instruct (``spdelta.hf.assets.smollm2_checkpoint``, fp32 by
default). Data: ``spdelta.data.load_rotten_tomatoes(seed=--seed)``, a fixed seeded
split. The first ``--val-examples`` validation reviews choose the learning rate; the
first ``--test-examples`` test reviews (>= 1000 by default) are used once per method,
for the winner only, and never for any choice. Accuracy is
``spdelta.data.sentiment_accuracy`` (the larger of the "negative"/"positive"
next-token logits), the same reading as the demo.

Methods (``--methods``):
  zero_shot        no training
  full             every parameter, torch.optim.AdamW (weight decay 0)
  lora             peft LoRA on the same targets as the sparse methods (spdelta's
                   ``"all-linear"``: every linear layer but ``lm_head``), alpha = 2r,
                   dropout 0, torch.optim.AdamW (weight decay 0); r = the rank whose
                   parameter count is closest to ``--density`` of the targets
                   (``--lora-rank`` overrides). That count is THE budget: the sparse
                   methods train exactly as many entries (SpIEL: per-tensor rounding)
  speft_gradient   spdelta.train.speft, gradient salience (``--calibration-examples``
                   training reviews), static global top-k, sparse AdamW
  speft_magnitude  the same with magnitude salience
  spiel_ag         spdelta.train.spiel, random start at the budget's density per tensor,
                   accumulated-gradient regrowth every ``--spiel-update-every`` steps
                   (window ``--spiel-accumulate-steps``), linear prune schedule, AdamW

Every trained method runs ``--steps`` steps on the same batches in the same order
(a fresh ``torch.Generator().manual_seed(seed)`` shuffle of the train split per run)
once per learning rate of its grid (``--lrs-*``), each run from the pretrained
weights. The run with the best validation accuracy wins (ties: the first LR listed);
its model, kept in memory, is evaluated once on the test set (no retraining).

The two-point grids come from earlier runs, on validation only: the sparse methods
first shared [1e-3, 3e-3]. 3e-3 diverged for gradient SPEFT (val 0.540 and 0.467)
and SpIEL (0.710, 0.507), and gradient SPEFT at 40 steps reached val 0.693 at 1e-3
but 0.807 at 3e-4; magnitude SPEFT was best at 3e-3 (0.800 vs 0.747). A likely
reason, not tested: entries chosen for their large gradients move the loss most per
step, entries chosen for their large weights the least.

Seeds: every run starts from ``torch.manual_seed(--seed)`` as well as its own
generators, so LoRA's random A matrices are the same in every run. (Before
2026-11-23 they were not seeded; torch seeds each new process at random, so LoRA's
test accuracy was a fresh draw per run: 0.811 and 0.835 in two runs of that day.)

Processes: each method runs in a fresh child process (multiprocessing ``spawn``),
``--jobs`` (2) at a time, longest first, with ``--threads`` = cores / jobs torch
threads each; every method runs under the same conditions, so step times are
comparable across methods, not across ``--jobs`` settings.

Memory is the resident set (RSS), not a tensor count, measured apart from the timed
runs. Exact RSS peaks need freed buffers to leave the process (glibc's
``M_MMAP_THRESHOLD`` at 128 KiB, as in ``train_step.py``), and that makes every large
buffer a fresh mapping: training steps measured 1.5-1.7x slower with it (9-12 s vs
5.8-8.3 s per step, 6-step runs, two 1-thread children). Without it glibc keeps freed
memory, and the peaks measured 1.4-2.2x too high in the first run of a process and
too low in the next; setting the threshold with ``mallopt`` after such runs, in the
same process, still measured 1.7x too high. So the LR runs are timed under glibc's
defaults, and each method's memory is measured by a probe in a child of its own that
sets the small threshold (``mallopt``) before anything else: a fresh model, the
method's first LR (shapes, not values, set the memory), ``--probe-steps`` steps (SpIEL
with ``update_every = accumulate_steps``, so that its dense AG window and a regrowth
fall inside them). Before them the child reads ``VmRSS`` (``rss_before``) and resets
the kernel's high-water mark (``/proc/self/clear_refs``); after them, it reads
``VmHWM``. ``peak_train_mb`` = ``VmHWM - rss_before``: what
training adds on top of the resident model (activations, gradients, optimizer state,
SPEFT's salience scoring, SpIEL's dense AG buffers). ``peak_total_mb`` = ``model_mb +
peak_train_mb`` with ``model_mb`` = the RSS the first model and data added over the
RSS after imports. Where ``clear_refs`` cannot be written, ``ru_maxrss`` is used and
``mem_method`` says so.

Time: ``step_s_median`` is the median wall time of a training step (batch fetch and
encoding included, measured between successive batch requests; SPEFT's one-off
scoring and selection are excluded, and reported in ``setup_s``); ``step_s_mean`` is
the mean (for SpIEL it includes the AG window and the regrowth steps).

bf16 (``--bf16``) is off by default: on this project's AMD EPYC CPUs without
avx512_bf16, bf16 training measured about 25x slower than fp32 (contrary to the 3x
speed-up ASSETS.md reports for CPUs that have it).

The estimate printed at the start (``estimate_seconds``) adds up ``STEP_S``,
``EVAL_S`` and the other constants below per method, scaled linearly with batch size
and with ``min(max_length, 96)`` (reviews rarely need more than 96 tokens), and
schedules the methods ``--jobs`` at a time, then the memory probes. ``STEP_S`` is the
median step of the full 60-step run of 2026-11-23 (two 1-thread children, glibc's
defaults; it took 40.9 min where constants from 6-step runs had estimated 56); the
rest come from the 40-step run of that day, which had the small mmap threshold
throughout (an evaluated review 0.20-0.27 s, gradient scoring of 64 reviews 80 s),
so the estimate still errs long.

Example:
    SPDELTA_CACHE=/tmp/spcache python tools/bench/quality.py --out bench-quality
    OMP_NUM_THREADS=1 python tools/bench/quality.py --steps 2 --val-examples 16 \\
        --test-examples 16 --out /tmp/q   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn
from train_step import _reset_peak_rss, _status_kb

METHODS = ("zero_shot", "full", "lora", "speft_gradient", "speft_magnitude", "spiel_ag")
SPARSE = ("speft_gradient", "speft_magnitude", "spiel_ag")
#: Seconds per training step, fp32, batch 8, max_length 96, 1 thread per child, two children
#: at once on 2 cores, glibc's default malloc (see the docstring); PROBE_SLOWDOWN for the
#: memory probes' small mmap threshold.
STEP_S = {"full": 5.8, "lora": 4.6, "speft_gradient": 5.9, "speft_magnitude": 4.8,
          "spiel_ag": 4.6}
PROBE_SLOWDOWN = 1.6
#: Seconds per evaluated review (batches of 32), per gradient-calibration example, per
#: SPEFT top-k selection, per child process (spawn, imports, data, model) and per LR run.
EVAL_S, CALIB_S, SELECT_S, CHILD_S, RUN_S = 0.23, 1.1, 10.0, 15.0, 2.0
Batch = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """Benchmark settings (see ``--help``); the defaults fit about 60 minutes on 2 cores."""

    methods: tuple[str, ...] = METHODS
    steps: int = 60
    batch_size: int = 8
    max_length: int = 96
    val_examples: int = 150
    test_examples: int = 1000
    eval_batch_size: int = 32
    density: float = 0.01
    lora_rank: int | None = None
    lrs: dict[str, list[float]] = field(default_factory=dict)
    calibration_examples: int = 64
    spiel_update_every: int = 20
    spiel_accumulate_steps: int = 5
    seed: int = 0
    threads: int | None = None
    jobs: int = 2
    bf16: bool = False
    cache_dir: str | None = None
    probe_steps: int = 6


def method_seconds(cfg: Config, method: str) -> float:
    """Expected wall time of one method's child (see the docstring)."""
    scale = cfg.batch_size / 8 * min(cfg.max_length, 96) / 96
    eval_s = EVAL_S * min(cfg.max_length, 96) / 96
    total = CHILD_S + cfg.test_examples * eval_s
    if method == "zero_shot":
        return total + cfg.val_examples * eval_s
    setup = SELECT_S if method.startswith("speft") else 0.0
    setup += CALIB_S * cfg.calibration_examples if method == "speft_gradient" else 0.0
    per_run = cfg.steps * STEP_S[method] * scale + cfg.val_examples * eval_s + setup + RUN_S
    return total + len(cfg.lrs[method]) * per_run


def probe_seconds(cfg: Config, method: str) -> float:
    """Expected wall time of one method's memory probe child."""
    scale = cfg.batch_size / 8 * min(cfg.max_length, 96) / 96
    setup = SELECT_S if method.startswith("speft") else 0.0
    setup += CALIB_S * cfg.calibration_examples if method == "speft_gradient" else 0.0
    return CHILD_S + setup + cfg.probe_steps * STEP_S[method] * scale * PROBE_SLOWDOWN


def estimate_seconds(cfg: Config) -> float:
    """Expected wall time of the run on an idle 2-core machine (see the docstring).

    The children run ``cfg.jobs`` at a time in the order :func:`run` submits them:
    the methods longest first (as long as :func:`method_seconds` says), then the
    memory probes (:func:`probe_seconds`).
    """
    order = sorted(cfg.methods, key=lambda m: -method_seconds(cfg, m))
    times = [method_seconds(cfg, m) for m in order]
    times += [probe_seconds(cfg, m) for m in order if m != "zero_shot"]
    workers = [0.0] * max(1, cfg.jobs)
    for t in times:
        i = workers.index(min(workers))
        workers[i] += t
    return max(workers)


# ---------------------------------------------------------------- child process


def _timed(batches: Iterator[Batch], stamps: list[float]) -> Iterator[Batch]:
    """Yield from ``batches``, recording the time of each request (step boundaries)."""
    for batch in batches:
        stamps.append(time.perf_counter())
        yield batch


def _train_batches(tok: Any, train: Any, cfg: Config) -> Iterator[Batch]:
    """Endless seeded epochs of encoded training batches: the same sequence every call."""
    from spdelta.data import batches

    gen = torch.Generator().manual_seed(cfg.seed)
    while True:
        yield from batches(tok, train, batch_size=cfg.batch_size, max_length=cfg.max_length,
                           generator=gen)


def target_names(model: nn.Module) -> list[str]:
    """The sparse methods' targets (spdelta ``"all-linear"``), also LoRA's."""
    from spdelta.targets import resolve_targets

    return resolve_targets(model, "all-linear")


def lora_rank_for(model: nn.Module, density: float, rank: int | None = None) -> dict[str, Any]:
    """The shared trainable budget: the LoRA rank closest to ``density``, and its count.

    The count is linear in the rank, so the closest rank is ``round(nnz / count(r=1))``
    (``rank`` overrides it). Every trained method but full fine-tuning then gets that
    count: LoRA as rank ``r``, SPEFT as ``lora_rank=r`` (exactly ``sum r*(m+n)``
    entries, global top-k), SpIEL as the same fraction of each target.
    """
    from spdelta.select import budget

    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in target_names(model)}
    per_rank = budget(shapes, lora_rank=1)[""]
    r = rank or max(1, round(budget(shapes, density=density)[""] / per_rank))
    total = sum(math.prod(s) for s in shapes.values())
    return {"lora_rank": r, "budget": r * per_rank, "target_entries": total,
            "budget_density": r * per_rank / total}


def _train_module(model: nn.Module, params: list[nn.Parameter], batches: Iterator[Batch],
                  cfg: Config, lr: float, desc: str) -> list[float]:
    """``cfg.steps`` steps of forward, backward and torch.optim.AdamW over ``params``."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    with tqdm(total=cfg.steps, desc=desc, unit="step") as bar:
        for batch in islice(batches, cfg.steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    return losses


def train(method: str, model: nn.Module, data: dict[str, Any], cfg: Config, lr: float,
          batches: Iterator[Batch]) -> tuple[nn.Module, list[float], int]:
    """Train ``model`` with ``method`` at ``lr``; return the trained model, losses, trainable."""
    from spdelta.hf import apply_to_model
    from spdelta.train import speft, spiel

    if method == "full":
        params = list(model.parameters())
        return model, _train_module(model, params, batches, cfg, lr, f"full lr={lr:g}"), sum(
            p.numel() for p in params)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        r = lora_rank_for(model, cfg.density, cfg.lora_rank)["lora_rank"]
        mods = [n.removesuffix(".weight") for n in target_names(model)]
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                      target_modules=mods))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        losses = _train_module(peft_model, params, batches, cfg, lr, f"lora r={r} lr={lr:g}")
        return peft_model, losses, sum(p.numel() for p in params)
    base = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(cfg.seed)
    shared = lora_rank_for(model, cfg.density, cfg.lora_rank)
    if method == "spiel_ag":
        delta, log = spiel(model, base, batches, density=shared["budget_density"],
                           targets="all-linear",
                           steps=cfg.steps, lr=lr, generator=gen, regrowth="ag",
                           update_every=cfg.spiel_update_every,
                           accumulate_steps=cfg.spiel_accumulate_steps)
    else:  # magnitude scores need no data
        calib = (_train_batches(data["tok"], data["train"], cfg) if method == "speft_gradient"
                 else iter(()))
        delta, log = speft(model, base, batches, metric=method.removeprefix("speft_"),
                           lora_rank=shared["lora_rank"], targets="all-linear",
                           steps=cfg.steps, lr=lr,
                           calibration_examples=cfg.calibration_examples,
                           calibration_batches=calib, generator=gen)
    return apply_to_model(model, delta), [m["loss"] for m in log], delta.nnz


def _load_data(cfg: Config) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from spdelta.data import load_rotten_tomatoes
    from spdelta.demo import bf16_checkpoint
    from spdelta.hf.assets import smollm2_checkpoint

    ckpt = smollm2_checkpoint(cfg.cache_dir)
    ckpt = bf16_checkpoint(ckpt) if cfg.bf16 else ckpt
    splits = load_rotten_tomatoes(seed=cfg.seed, test_size=max(1000, cfg.test_examples),
                                  validation_size=max(500, cfg.val_examples))
    return {"ckpt": ckpt, "tok": AutoTokenizer.from_pretrained(ckpt), "train": splits["train"],
            "val": splits["validation"].select(range(cfg.val_examples)),
            "test": splits["test"].select(range(cfg.test_examples))}


def _load_model(data: dict[str, Any], cfg: Config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(data["ckpt"], dtype=dtype).eval()
    with torch.no_grad():  # weights may be lazy views of the mmapped file: make them resident
        for p in model.parameters():  # (tied weights are one Parameter, cloned once)
            p.data = p.data.clone()
    return model


def _accuracy(model: nn.Module, data: dict[str, Any], split: str, cfg: Config) -> float:
    from spdelta.data import sentiment_accuracy

    return sentiment_accuracy(model, data["tok"], data[split], batch_size=cfg.eval_batch_size,
                              max_length=cfg.max_length, progress=True)


def _test(model: nn.Module, data: dict[str, Any], cfg: Config) -> dict[str, float]:
    """The one test-set evaluation of a method, timed."""
    t0 = time.perf_counter()
    acc = _accuracy(model, data, "test", cfg)
    return {"test_accuracy": acc, "test_eval_s": time.perf_counter() - t0}


def _step_times(stamps: list[float], end: float, steps: int) -> list[float]:
    marks = [*stamps[:steps], end]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _one_run(method: str, data: dict[str, Any], cfg: Config, lr: float
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Build a fresh model, train it at ``lr`` (timed), measure val accuracy."""
    model = _load_model(data, cfg)
    torch.manual_seed(cfg.seed)  # LoRA's A init draws from the global generator
    stamps: list[float] = []
    t0 = time.perf_counter()
    model, losses, trainable = train(method, model, data, cfg, lr,
                                     _timed(_train_batches(data["tok"], data["train"], cfg),
                                            stamps))
    end = time.perf_counter()
    steps = _step_times(stamps, end, cfg.steps)
    if method == "lora":  # evaluate the merged weights, as deployed (unmerged eval: 1.7x slower)
        model = model.merge_and_unload()  # type: ignore[operator]
    t_eval = time.perf_counter()
    acc = _accuracy(model, data, "val", cfg)
    last = losses[-10:]
    return model, {
        "lr": lr, "val_accuracy": acc, "train_s": end - t0,
        "setup_s": (stamps[0] if stamps else end) - t0,
        "step_s_median": statistics.median(steps) if steps else None,
        "step_s_mean": sum(steps) / len(steps) if steps else None, "step_s_all": steps,
        "val_eval_s": time.perf_counter() - t_eval, "trainable_params": trainable,
        "loss_first": losses[0] if losses else None,
        "loss_last10": sum(last) / len(last) if last else None}


def probe_memory(method: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Child process: peak RSS of ``probe_steps`` training steps (see the docstring)."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # M_MMAP_THRESHOLD, before anything else
    cfg = Config(**{**cfg_dict, "methods": tuple(cfg_dict["methods"]),
                    "steps": cfg_dict["probe_steps"],
                    "spiel_update_every": cfg_dict["spiel_accumulate_steps"]})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = _load_data(cfg)
    model = _load_model(data, cfg)
    torch.manual_seed(cfg.seed)
    gc.collect()
    rss_before = _status_kb("VmRSS")
    exact = _reset_peak_rss()
    train(method, model, data, cfg, cfg.lrs[method][0],
          _train_batches(data["tok"], data["train"], cfg))
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_train_mb": (peak - rss_before) / 1024, "probe_rss_before_mb": rss_before / 1024,
            "mem_method": "VmHWM-after-clear_refs" if exact else "ru_maxrss"}


def run_method(method: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Child process: every LR run of ``method``, then the winner on the test set."""
    cfg = Config(**{**cfg_dict, "methods": tuple(cfg_dict["methods"])})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import peft  # noqa: F401  (imported before rss_base, like every library used)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import spdelta.hf
    import spdelta.train  # noqa: F401

    t0 = time.perf_counter()
    gc.collect()
    rss_base = _status_kb("VmRSS")
    data = _load_data(cfg)
    model = _load_model(data, cfg)
    gc.collect()
    out: dict[str, Any] = {"method": method, "threads": torch.get_num_threads(),
                           "model_mb": (_status_kb("VmRSS") - rss_base) / 1024,
                           "rss_base_mb": rss_base / 1024, "train_examples": len(data["train"]),
                           **lora_rank_for(model, cfg.density, cfg.lora_rank)}
    if method == "zero_shot":
        t_val = time.perf_counter()
        out.update(val_accuracy=_accuracy(model, data, "val", cfg), trainable_params=0,
                   val_eval_s=time.perf_counter() - t_val, **_test(model, data, cfg))
        return {**out, "elapsed_s": time.perf_counter() - t0}
    del model
    best: tuple[float, nn.Module] | None = None
    runs = []
    for lr in cfg.lrs[method]:
        model, run = _one_run(method, data, cfg, lr)
        runs.append(run)
        print(f"  {method} lr={lr:g}: val {run['val_accuracy']:.3f}", file=sys.stderr, flush=True)
        if best is None or run["val_accuracy"] > best[0]:
            best = (run["val_accuracy"], model)
            out["chosen_lr"] = lr
        del model
        gc.collect()
    chosen = next(r for r in runs if r["lr"] == out["chosen_lr"])
    assert best is not None  # at least one LR (checked by the CLI)
    out.update(runs=runs, val_accuracy=best[0], **_test(best[1], data, cfg),
               trainable_params=chosen["trainable_params"],
               step_s_median=chosen["step_s_median"], step_s_mean=chosen["step_s_mean"])
    return {**out, "elapsed_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- parent process


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of a finished (or partial) run."""
    head = ("| method | trainable params | val acc per LR | chosen LR | val acc | test acc "
            "| median step s | peak train MiB | peak total MiB |")
    lines = [head, "|" + "---|" * 9]
    for m, r in results.items():
        if "error" in r:
            lines.append(f"| {m} | error: {r['error']} |" + " |" * 7)
            continue
        sweep = ", ".join(f"{x['lr']:g}: {x['val_accuracy']:.3f}" for x in r.get("runs", []))
        lines.append(
            f"| {m} | {r['trainable_params']:,} | {sweep or '-'} | {_fmt(r.get('chosen_lr'), 'g')} "
            f"| {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} "
            f"| {_fmt(r.get('step_s_median'), '.2f')} | {_fmt(r.get('peak_train_mb'), '.0f')} "
            f"| {_fmt(r.get('peak_total_mb'), '.0f')} |")
    return "\n".join(lines)


def _result(future: Any) -> dict[str, Any]:
    """A child's result; its exception becomes ``error`` (the other methods go on)."""
    try:
        return future.result()  # type: ignore[no-any-return]
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def _write(out_dir: Path, report: dict[str, Any]) -> str:
    table = format_table(report["results"])
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2))
    (out_dir / "quality.md").write_text(table + "\n")
    return table


def run(cfg: Config, out_dir: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method in its own child process; writes quality.json / quality.md as it goes."""
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)  # the timed runs use glibc's defaults
    out_dir.mkdir(parents=True, exist_ok=True)
    est = estimate_seconds(cfg)
    say(f"quality benchmark: {', '.join(cfg.methods)}; {cfg.steps} steps x batch "
        f"{cfg.batch_size}; val {cfg.val_examples}, test {cfg.test_examples}; "
        f"estimated {est / 60:.0f} min on an idle 2-core CPU")
    import peft
    import transformers

    report: dict[str, Any] = {
        "config": {**asdict(cfg), "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__,
                   "estimate_s": est}, "results": {}}
    t0 = time.perf_counter()
    order = sorted(cfg.methods, key=lambda m: -method_seconds(cfg, m))  # longest first
    tasks = [(m, "train") for m in order] + [(m, "probe") for m in order if m != "zero_shot"]
    results: dict[str, dict[str, Any]] = {m: {} for m in cfg.methods}
    with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=get_context("spawn"),
                             max_tasks_per_child=1) as pool:  # a fresh process per task
        futures = {pool.submit(run_method if kind == "train" else probe_memory, m, asdict(cfg)):
                   (m, kind) for m, kind in tasks}
        say(f"running {cfg.jobs} at a time, longest first: {', '.join(order)}, then the "
            "memory probes")
        for done, future in enumerate(as_completed(futures), 1):
            m, kind = futures[future]
            r = _result(future)
            if kind == "probe":
                results[m].update({"probe_error": r["error"]} if "error" in r else r)
                note = r.get("error") or f"peak train {r['peak_train_mb']:.0f} MiB"
            else:
                results[m].update(r)
                note = r.get("error") or (f"val {r['val_accuracy']:.3f}, "
                                          f"test {r['test_accuracy']:.3f}")
            if "model_mb" in results[m] and "peak_train_mb" in results[m]:
                results[m]["peak_total_mb"] = results[m]["model_mb"] + results[m]["peak_train_mb"]
            say(f"[{done}/{len(tasks)}] {m} {kind}: {note} "
                f"(elapsed {time.perf_counter() - t0:.0f} s)")
            report["results"] = {k: v for k, v in results.items() if "val_accuracy" in v
                                 or "error" in v}
            report["elapsed_s"] = time.perf_counter() - t0
            _write(out_dir, report)
    say(_write(out_dir, report))
    say(f"done in {report['elapsed_s'] / 60:.1f} min (estimated {est / 60:.0f} min); "
        f"{out_dir / 'quality.json'}, {out_dir / 'quality.md'}")
    return report


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """Command-line options -> :class:`Config` (and the raw namespace)."""
    d = Config()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("steps", "batch_size", "max_length", "val_examples", "test_examples",
                 "eval_batch_size", "calibration_examples", "spiel_update_every",
                 "spiel_accumulate_steps", "seed", "probe_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--density", type=float, default=d.density)
    p.add_argument("--lora-rank", type=int, default=None, help="default: matched to the budget")
    p.add_argument("--lrs-full", type=_floats, default=[3e-5, 1e-4])
    p.add_argument("--lrs-lora", type=_floats, default=[5e-4, 2e-3])
    p.add_argument("--lrs-speft-gradient", type=_floats, default=[3e-4, 1e-3])
    p.add_argument("--lrs-speft-magnitude", type=_floats, default=[1e-3, 3e-3])
    p.add_argument("--lrs-spiel", type=_floats, default=[3e-4, 1e-3])
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--jobs", type=int, default=d.jobs,
                   help="methods run at once, each in its own process (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: CPU cores / jobs)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 (25x slower on this CPU)")
    p.add_argument("--cache-dir", default=None, help="converted checkpoint cache")
    p.add_argument("--out", default="bench-quality", help="directory for quality.json/.md")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    a = p.parse_args(argv)
    methods = tuple(a.methods.split(","))
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    lrs = {"full": a.lrs_full, "lora": a.lrs_lora, "speft_gradient": a.lrs_speft_gradient,
           "speft_magnitude": a.lrs_speft_magnitude, "spiel_ag": a.lrs_spiel}
    if any(not lrs[m] for m in methods if m != "zero_shot"):
        p.error("every trained method needs at least one learning rate")
    if a.jobs < 1:
        p.error(f"--jobs must be at least 1; found {a.jobs}")
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 1) // a.jobs)
    keys = ("steps", "batch_size", "max_length", "val_examples", "test_examples",
            "eval_batch_size", "density", "lora_rank", "calibration_examples",
            "spiel_update_every", "spiel_accumulate_steps", "seed", "threads", "jobs", "bf16",
            "cache_dir", "probe_steps")
    cfg = Config(methods=methods, lrs={m: lrs[m] for m in methods if m in lrs},
                 **{k: getattr(a, k) for k in keys})
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    """Parse, then run (or with ``--dry-run`` only print the estimate)."""
    cfg, a = parse(argv)
    if a.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        print(f"estimated {estimate_seconds(cfg) / 60:.1f} min on an idle 2-core CPU")
        return 0
    run(cfg, Path(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
