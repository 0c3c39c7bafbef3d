"""The quality benchmark's child processes: train one configuration, evaluate, save, test.

See ``quality.py`` for what is measured and how; this module holds the work each child
process does (``sweep_child``, ``test_child``, ``probe_memory``).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from _quality_tasks import TASKS, Task
from torch import nn
from train_step import _reset_peak_rss, _status_kb

METHODS = ("zero_shot", "full", "lora", "speft_gradient", "speft_magnitude", "spiel_ag")
#: Methods whose learning rate and schedule the sweep chooses across the tasks.
SWEPT = ("lora", "speft_gradient", "speft_magnitude", "spiel_ag")
#: Full fine-tuning is a per-task reference: its LRs at this schedule, best on validation.
REFERENCE_SCHEDULE = "constant"
Batch = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """Benchmark settings (see ``quality.py --help``)."""

    tasks: tuple[str, ...] = ("sentiment", "hamlet")
    methods: tuple[str, ...] = ("zero_shot", "full", "lora", "speft_gradient", "spiel_ag")
    schedules: tuple[str, ...] = ("constant", "cosine@0.1")
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
    cached_only: bool = False


def config_from(d: dict[str, Any]) -> Config:
    return Config(**{**d, "tasks": tuple(d["tasks"]), "methods": tuple(d["methods"]),
                     "schedules": tuple(d["schedules"])})


def parse_schedule(spec: str) -> tuple[str, float]:
    """``"cosine@0.1"`` -> ``("cosine", 0.1)`` (decay kind, warmup); ``"constant"`` -> no warmup."""
    kind, _, warmup = spec.partition("@")
    return kind, float(warmup or 0.0)


def run_name(lr: float, schedule: str) -> str:
    return f"lr{lr:g}_{schedule.replace('@', '-w')}"


# ---------------------------------------------------------------- data and models


def _timed(batches: Iterator[Batch], stamps: list[float]) -> Iterator[Batch]:
    """Yield from ``batches``, recording the time of each request (step boundaries)."""
    for batch in batches:
        stamps.append(time.perf_counter())
        yield batch


def train_batches(tok: Any, task: Task, rows: Any, cfg: Config) -> Iterator[Batch]:
    """Endless seeded epochs of encoded training batches: the same sequence every call."""
    from spdelta.recipes.data import encode_prompt_response

    gen = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = torch.randperm(len(rows), generator=gen).tolist()
        for i in range(0, len(rows), cfg.batch_size):
            part = rows.select(order[i:i + cfg.batch_size])
            if task.kind == "lm":
                yield lm_batch(tok, part["text"], cfg.max_length)
                continue
            yield encode_prompt_response(tok, task.prompts(part),
                                         [task.choices[y] for y in part["label"]],
                                         max_length=cfg.max_length, system=task.system)


def lm_batch(tok: Any, texts: list[str], max_length: int) -> Batch:
    """Plain text for language modelling: right-padded, the loss on every real token."""
    rows = [tok(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def token_accuracy(model: nn.Module, tok: Any, texts: list[str], cfg: Config
                   ) -> tuple[float, float]:
    """Next-token accuracy (argmax) over every real token, and its standard error.

    The error treats pieces as the independent units (tokens of one piece are not): the
    linearised standard error of the ratio ``sum correct / sum tokens`` over pieces.
    """
    device = next(model.parameters()).device
    correct, total = [], []
    for i in range(0, len(texts), cfg.eval_batch_size):
        batch = lm_batch(tok, texts[i:i + cfg.eval_batch_size], cfg.max_length)
        labels = batch.pop("labels")[:, 1:]
        pred = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, :-1].argmax(-1)
        counted = labels != -100
        correct += ((pred.cpu() == labels) & counted).sum(1).tolist()
        total += counted.sum(1).tolist()
    c, t = torch.tensor(correct, dtype=torch.float64), torch.tensor(total, dtype=torch.float64)
    p = float(c.sum() / t.sum())
    return p, float(((c - p * t).square().sum()).sqrt() / t.sum())


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
    from spdelta.select import budgets

    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in target_names(model)}
    per_rank = budgets(shapes, lora_rank=1)[""]
    r = rank or max(1, round(budgets(shapes, density=density)[""] / per_rank))
    total = sum(math.prod(s) for s in shapes.values())
    return {"lora_rank": r, "budget": r * per_rank, "target_entries": total,
            "budget_density": r * per_rank / total}


def load_data(cfg: Config, task_name: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from spdelta.recipes.assets import smollm2_checkpoint
    from spdelta.recipes.demo import bf16_checkpoint

    ckpt = smollm2_checkpoint(cfg.cache_dir)
    ckpt = bf16_checkpoint(ckpt) if cfg.bf16 else ckpt
    task = TASKS[task_name]
    splits = task.load(cfg.seed)
    test = splits["test"]
    return {"ckpt": ckpt, "tok": AutoTokenizer.from_pretrained(ckpt), "task": task,
            "train": splits["train"],
            "val": splits["validation"].select(range(min(cfg.val_examples,
                                                         len(splits["validation"])))),
            "test": test.select(range(min(cfg.test_examples, len(test))))}


def load_model(data: dict[str, Any], cfg: Config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(data["ckpt"], dtype=dtype).eval()
    with torch.no_grad():  # weights may be lazy views of the mmapped file: make them resident
        for p in model.parameters():  # (tied weights are one Parameter, cloned once)
            p.data = p.data.clone()
    return model


def accuracy(model: nn.Module, data: dict[str, Any], split: str, cfg: Config
             ) -> tuple[float, float]:
    """The task's accuracy on ``split`` and its standard error."""
    from spdelta.recipes.evaluate import choice_accuracy

    task, rows = data["task"], data[split]
    if task.kind == "lm":
        return token_accuracy(model, data["tok"], list(rows["text"]), cfg)
    p = choice_accuracy(model, data["tok"], task.prompts(rows), list(rows["label"]),
                        task.choices, system=task.system, batch_size=cfg.eval_batch_size,
                        max_length=cfg.max_length, progress=True)
    return p, math.sqrt(p * (1 - p) / len(rows))


# ---------------------------------------------------------------- training


def _lora_config(model: nn.Module, cfg: Config) -> Any:
    from peft import LoraConfig

    r = lora_rank_for(model, cfg.density, cfg.lora_rank)["lora_rank"]
    mods = [n.removesuffix(".weight") for n in target_names(model)]
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=mods)


def _train_module(model: nn.Module, params: list[nn.Parameter], batches: Iterator[Batch],
                  cfg: Config, lr: float, schedule: str, desc: str) -> list[float]:
    """``cfg.steps`` steps of torch.optim.AdamW over ``params``, lr from the schedule."""
    from tqdm.auto import tqdm

    from spdelta.train import learning_rate

    kind, warmup = parse_schedule(schedule)
    rate = learning_rate(lr, schedule=kind, warmup=warmup, total_steps=cfg.steps)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: rate(t) / lr)
    losses = []
    with tqdm(total=cfg.steps, desc=desc, unit="step") as bar:
        for batch in islice(batches, cfg.steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    return losses


class _CachedScores:
    """A salience metric that computes once and then returns the same scores.

    Every SPEFT run of a child scores the same base on the same calibration batches,
    so the scores are the same; the first run's scoring time is its ``setup_s``.
    """

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.scores: Any = None

    def __call__(self, cal: Any) -> Any:
        from spdelta.salience import METRICS

        if self.scores is None:
            self.scores = METRICS[self.__name__](cal)
        return self.scores


def train(method: str, model: nn.Module, data: dict[str, Any], cfg: Config, lr: float,
          schedule: str, batches: Iterator[Batch], metric: Any = None
          ) -> tuple[nn.Module, list[float], int, Any]:
    """Train ``model`` with ``method``: the trained model, losses, trainable count and weights.

    The weights to keep are the sparse delta, LoRA's adapter tensors, or None (full).
    """
    from spdelta.hf import apply_to_model
    from spdelta.train import speft, spiel

    kind, warmup = parse_schedule(schedule)
    tag = f"{method} lr={lr:g} {schedule}"
    if method == "full":
        params = list(model.parameters())
        losses = _train_module(model, params, batches, cfg, lr, schedule, tag)
        return model, losses, sum(p.numel() for p in params), None
    if method == "lora":
        from peft import get_peft_model

        peft_model = get_peft_model(model, _lora_config(model, cfg))
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        losses = _train_module(peft_model, list(named.values()), batches, cfg, lr, schedule, tag)
        adapter = {n: p.detach().clone() for n, p in named.items()}
        return peft_model, losses, sum(p.numel() for p in named.values()), adapter
    base = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(cfg.seed)
    shared = lora_rank_for(model, cfg.density, cfg.lora_rank)
    if method == "spiel_ag":
        delta, log = spiel(model, base, batches, density=shared["budget_density"],
                           targets="all-linear", steps=cfg.steps, lr=lr, lr_schedule=kind,
                           warmup=warmup, generator=gen, regrowth="ag",
                           update_every=cfg.spiel_update_every,
                           accumulate_steps=cfg.spiel_accumulate_steps)
    else:  # magnitude scores need no data
        calib = (train_batches(data["tok"], data["task"], data["train"], cfg)
                 if method == "speft_gradient" else iter(()))
        delta, log = speft(model, base, batches, metric=metric or method.removeprefix("speft_"),
                           lora_rank=shared["lora_rank"], targets="all-linear",
                           steps=cfg.steps, lr=lr, lr_schedule=kind, warmup=warmup,
                           calibration_examples=cfg.calibration_examples,
                           calibration_batches=calib, generator=gen)
    return apply_to_model(model, delta), [m["loss"] for m in log], delta.nnz, delta


def _step_times(stamps: list[float], end: float, steps: int) -> list[float]:
    marks = [*stamps[:steps], end]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def one_run(method: str, data: dict[str, Any], cfg: Config, lr: float, schedule: str,
            metric: Any = None) -> tuple[nn.Module, dict[str, Any], Any]:
    """Build a fresh model, train it (timed), measure validation accuracy."""
    model = load_model(data, cfg)
    torch.manual_seed(cfg.seed)  # LoRA's A init draws from the global generator
    stamps: list[float] = []
    t0 = time.perf_counter()
    model, losses, trainable, weights = train(
        method, model, data, cfg, lr, schedule,
        _timed(train_batches(data["tok"], data["task"], data["train"], cfg), stamps), metric)
    end = time.perf_counter()
    steps = _step_times(stamps, end, cfg.steps)
    if method == "lora":  # evaluate the merged weights, as deployed (unmerged eval: 1.7x slower)
        model = model.merge_and_unload()  # type: ignore[operator]
    t_eval = time.perf_counter()
    acc, se = accuracy(model, data, "val", cfg)
    last = losses[-10:]
    return model, {
        "lr": lr, "schedule": schedule, "val_accuracy": acc, "val_se": se,
        "val_n": len(data["val"]),
        "train_s": end - t0, "setup_s": (stamps[0] if stamps else end) - t0,
        "step_s_median": statistics.median(steps) if steps else None,
        "step_s_mean": sum(steps) / len(steps) if steps else None,
        "val_eval_s": time.perf_counter() - t_eval, "trainable_params": trainable,
        "loss_first": losses[0] if losses else None,
        "loss_last10": sum(last) / len(last) if last else None}, weights


# ---------------------------------------------------------------- child processes


def _test(model: nn.Module, data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The one test-set evaluation of a configuration, timed."""
    t0 = time.perf_counter()
    acc, se = accuracy(model, data, "test", cfg)
    return {"test_accuracy": acc, "test_se": se, "test_n": len(data["test"]),
            "test_eval_s": time.perf_counter() - t0}


def _child_start(cfg: Config) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import peft  # noqa: F401  (imported before rss_base, like every library used)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import spdelta.hf
    import spdelta.train  # noqa: F401


def _save(weights: Any, path: Path) -> None:
    from safetensors.torch import save_file

    from spdelta import SparseDelta
    from spdelta.format import save_delta

    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, SparseDelta):
        save_delta(weights, path)
    else:
        save_file({n: t.contiguous() for n, t in weights.items()}, str(path))


#: The settings one run's result depends on (not the grid, jobs or threads).
RUN_KEYS = ("steps", "batch_size", "max_length", "val_examples", "density", "lora_rank",
            "calibration_examples", "spiel_update_every", "spiel_accumulate_steps", "seed", "bf16")


def _run_settings(cfg: Config) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in RUN_KEYS}


def _beside(stem: Path, ext: str) -> Path:
    # Not with_suffix: the run names hold dots ("lr0.0003_constant").
    return stem.with_name(stem.name + ext)


def _record_run(stem: Path, cfg: Config, run: dict[str, Any]) -> None:
    """Write a finished run's record beside its weights (after them: a record means both)."""
    tmp = _beside(stem, ".json.tmp")
    tmp.write_text(json.dumps({"settings": _run_settings(cfg), "run": run}, indent=1))
    os.replace(tmp, _beside(stem, ".json"))


def _finished_run(stem: Path, cfg: Config) -> dict[str, Any] | None:
    """The record of a run an earlier sweep finished with the same settings, if any."""
    path = _beside(stem, ".json")
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != _run_settings(cfg) or not Path(saved["run"]["weights"]).is_file():
        return None
    return {**saved["run"], "kept_from_earlier_sweep": True}


def _full_stem(runs_dir: str, task: str, cfg: Config) -> Path:
    """Where full fine-tuning's child result is kept: one record per LR grid."""
    lrs = "_".join(run_name(lr, REFERENCE_SCHEDULE) for lr in cfg.lrs["full"])
    return Path(runs_dir) / task / "full" / lrs


def kept_result(stem: Path, cfg: Config, extra: dict[str, Any]) -> dict[str, Any] | None:
    """A result recorded beside ``stem`` with the same run settings and ``extra`` keys, if any."""
    path = _beside(stem, ".json")
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != {**_run_settings(cfg), **extra}:
        return None
    return {**saved["result"], "kept_from_earlier_sweep": True}


def keep_result(stem: Path, cfg: Config, extra: dict[str, Any], result: dict[str, Any]) -> None:
    """Record ``result`` beside ``stem`` (atomically) for :func:`kept_result`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(stem, ".json.tmp")
    tmp.write_text(json.dumps({"settings": {**_run_settings(cfg), **extra}, "result": result},
                              indent=1))
    os.replace(tmp, _beside(stem, ".json"))


def _kept_grid(runs_dir: str, task: str, method: str, cfg: Config
               ) -> list[dict[str, Any]] | None:
    """The kept runs of the grid when nothing of it is left to run (no model is loaded)."""
    found = [_finished_run(Path(runs_dir) / task / method / run_name(lr, s), cfg)
             for s in cfg.schedules for lr in cfg.lrs[method]]
    if any(r is None for r in found) and not cfg.cached_only:
        return None
    return [r for r in found if r is not None]


def sweep_child(task: str, method: str, cfg_dict: dict[str, Any], runs_dir: str
                ) -> dict[str, Any]:
    """Child process: every (LR, schedule) run of ``method`` on ``task``, validation only.

    Swept methods save each run's trained weights under ``runs_dir`` for the test phase.
    Zero-shot and full fine-tuning (a per-task reference: its best LR on validation) are
    tested here, once.
    """
    cfg = config_from(cfg_dict)
    full_key = {"test_examples": cfg.test_examples}
    if method == "full" and (kept := kept_result(_full_stem(runs_dir, task, cfg), cfg,
                                                 full_key)) is not None:
        return kept  # its LRs trained and tested by an earlier sweep with the same settings
    if method == "full" and cfg.cached_only:
        return {"task": task, "method": method, "runs": [], "elapsed_s": 0.0}
    if method in SWEPT and (kept_runs := _kept_grid(runs_dir, task, method, cfg)) is not None:
        return {"task": task, "method": method, "runs": kept_runs, "elapsed_s": 0.0}
    _child_start(cfg)
    t0 = time.perf_counter()
    gc.collect()
    rss_base = _status_kb("VmRSS")
    data = load_data(cfg, task)
    model = load_model(data, cfg)
    gc.collect()
    out: dict[str, Any] = {"task": task, "method": method, "threads": torch.get_num_threads(),
                           "model_mb": (_status_kb("VmRSS") - rss_base) / 1024,
                           "train_examples": len(data["train"]),
                           **lora_rank_for(model, cfg.density, cfg.lora_rank)}
    if method == "zero_shot":
        acc, se = accuracy(model, data, "val", cfg)
        out.update(val_accuracy=acc, val_se=se, val_n=len(data["val"]), trainable_params=0,
                   **_test(model, data, cfg))
        return {**out, "elapsed_s": time.perf_counter() - t0}
    del model
    schedules = [REFERENCE_SCHEDULE] if method == "full" else list(cfg.schedules)
    metric = _CachedScores("gradient") if method == "speft_gradient" else None
    best: tuple[float, nn.Module] | None = None
    runs = []
    for schedule in schedules:
        for lr in cfg.lrs[method]:
            stem = Path(runs_dir) / task / method / run_name(lr, schedule)
            if method != "full" and (done := _finished_run(stem, cfg)) is not None:
                runs.append(done)  # kept from an earlier sweep with the same run settings
                continue
            if method != "full" and cfg.cached_only:
                continue  # a cell the staged sweep did not run
            model, run, weights = one_run(method, data, cfg, lr, schedule, metric)
            print(f"  {task} {method} lr={lr:g} {schedule}: val {run['val_accuracy']:.3f}",
                  file=sys.stderr, flush=True)
            if weights is not None:
                _save(weights, _beside(stem, ".safetensors"))
                run["weights"] = str(_beside(stem, ".safetensors"))
                _record_run(stem, cfg, run)
            runs.append(run)
            if method == "full" and (best is None or run["val_accuracy"] > best[0]):
                best = (run["val_accuracy"], model)
                out["val_se"] = run["val_se"]
                out.update(chosen_lr=lr, chosen_schedule=schedule)
            del model, weights
            gc.collect()
    out["runs"] = runs
    if best is not None:  # full fine-tuning: its own best on validation, tested once
        out.update(val_accuracy=best[0], val_n=len(data["val"]), **_test(best[1], data, cfg))
        out["elapsed_s"] = time.perf_counter() - t0
        keep_result(_full_stem(runs_dir, task, cfg), cfg, full_key, out)
    return {**out, "elapsed_s": time.perf_counter() - t0}


def test_child(task: str, method: str, cfg_dict: dict[str, Any], weights: str
               ) -> dict[str, Any]:
    """Child process: the saved weights of the chosen configuration, on the test split once."""
    from safetensors.torch import load_file

    from spdelta.format import load_delta
    from spdelta.hf import apply_to_model

    cfg = config_from(cfg_dict)
    _child_start(cfg)
    data = load_data(cfg, task)
    model = load_model(data, cfg)
    if method == "lora":
        from peft import get_peft_model

        peft_model = get_peft_model(model, _lora_config(model, cfg))
        tensors = load_file(weights)
        wanted = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        if set(tensors) != wanted:
            raise RuntimeError(f"{weights}: adapter tensors differ from the model's "
                               f"({sorted(set(tensors) ^ wanted)[:5]})")
        peft_model.load_state_dict(tensors, strict=False)
        model = peft_model.merge_and_unload()
    else:
        model = apply_to_model(model, load_delta(weights))
    return _test(model, data, cfg)


def probe_memory(method: str, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Child process: peak RSS of ``probe_steps`` training steps on the first task."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # M_MMAP_THRESHOLD, before anything else
    cfg = config_from({**cfg_dict, "steps": cfg_dict["probe_steps"],
                       "spiel_update_every": cfg_dict["spiel_accumulate_steps"]})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg, cfg.tasks[0])
    model = load_model(data, cfg)
    torch.manual_seed(cfg.seed)
    gc.collect()
    rss_before = _status_kb("VmRSS")
    exact = _reset_peak_rss()
    train(method, model, data, cfg, cfg.lrs[method][0], cfg.schedules[0],
          train_batches(data["tok"], data["task"], data["train"], cfg))
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_train_mb": (peak - rss_before) / 1024, "probe_rss_before_mb": rss_before / 1024,
            "mem_method": "VmHWM-after-clear_refs" if exact else "ru_maxrss"}
