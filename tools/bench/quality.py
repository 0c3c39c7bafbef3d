"""Quality benchmark: sparse fine-tuning vs LoRA and full fine-tuning on SmolLM2, two tasks.

Model: SmolLM2-135M-Instruct (``spdelta.recipes.assets.smollm2_checkpoint``, fp32 by
default). Tasks (``--tasks``, ``_quality_tasks.py``, fixed seeded splits): ``sentiment``
(Rotten Tomatoes reviews, fresh vs rotten; accuracy by
``spdelta.recipes.evaluate.choice_accuracy``, the choice whose first token has the largest
next-token logit after the chat prompt, the reading of the demo) and ``hamlet``
(language modelling on the text of Hamlet; next-token accuracy over held-out pieces);
``debates`` (who said a 2016 debate statement) is available, and why it is not in the
default sweep is in ``_quality_tasks.py``.

Methods (``--methods``):
  zero_shot        no training
  full             every parameter, torch.optim.AdamW (weight decay 0), constant LR
  lora             peft LoRA on the same targets as the sparse methods (spdelta's
                   ``"all-linear"``: every linear layer but ``lm_head``), alpha = 2r,
                   dropout 0, torch.optim.AdamW (weight decay 0); r = the rank whose
                   parameter count is closest to ``--density`` of the targets
                   (``--lora-rank`` overrides). That count is THE budget: the sparse
                   methods train exactly as many entries (SpIEL: per-tensor rounding)
  speft_gradient   spdelta.train.speft, gradient salience (``--calibration-examples``
                   training rows), static global top-k, sparse AdamW
  speft_magnitude  the same with magnitude salience (not in the default set)
  spiel_ag         spdelta.train.spiel, random start at the budget's density per tensor,
                   accumulated-gradient regrowth every ``--spiel-update-every`` steps
                   (window ``--spiel-accumulate-steps``), linear prune schedule, AdamW

The sweep: every trained method runs ``--steps`` steps on the same batches in the same
order (a fresh ``torch.Generator().manual_seed(seed)`` shuffle of the train split per
run, epochs reshuffled), from the pretrained weights, once per learning rate of its
grid (``--lrs-*``) and, for LoRA and the sparse methods, per schedule of
``--schedules`` (``kind[@warmup]``: ``constant`` is the old fixed LR; ``cosine@0.1``
is a linear warmup over 10 % of the steps then cosine decay to 0; the formulas of
``spdelta.optim.warmup_schedule``, which are the Hugging Face Trainer's; LoRA and
full fine-tuning follow them through ``LambdaLR``). Each run's accuracy on the first
``--val-examples`` validation rows is recorded with its standard error
``sqrt(p (1 - p) / n)``, and its trained weights (the delta, or LoRA's adapters) are
saved under ``<out>/runs`` with a record of the run (kept by a later sweep with the
same run settings, so a sweep can grow in stages; see ``--no-test``; full fine-tuning's
result and each test result are kept the same way, keyed also by ``--test-examples``, and
``--cached-only`` assembles the table from the kept records alone). The standard
error of a classification accuracy is binomial; Hamlet's treats pieces as the units.

Choice and test: for LoRA and each sparse method, the (LR, schedule) with the best
MEAN validation accuracy over the tasks (ties: first in grid order) is its default.
Only then does the test phase run: that configuration's saved weights, once per task,
on the task's test split (``--test-examples``, at most the split: 1,000 reviews, 100
Hamlet pieces). No test number is computed for any other configuration. Full
fine-tuning is a reference chosen per task on validation (its model kept in memory and
tested in the same child); zero-shot is tested once per task.

Seeds: every run starts from ``torch.manual_seed(--seed)`` as well as its own
generators, so LoRA's random A matrices are the same in every run. Gradient SPEFT
scores once per (task) child and reuses the scores (the base and calibration rows are
the same for every run); ``setup_s`` of its first run includes the scoring.

Processes: each (task, method) sweep runs in a fresh child process (multiprocessing
``spawn``), ``--jobs`` (2) at a time, longest first, with ``--threads`` = cores / jobs
torch threads each; then the test children. Step times are comparable across methods
of one run (same conditions), not across ``--jobs`` settings.

Memory is the resident set (RSS), not a tensor count, measured apart from the timed
runs (``--probe-steps 0`` skips it). Exact RSS peaks need freed buffers to leave the
process (glibc's ``M_MMAP_THRESHOLD`` at 128 KiB, as in ``train_step.py``), and that
makes every large buffer a fresh mapping: training steps measured 1.5-1.7x slower with
it. Without it glibc keeps freed memory, and the peaks measured 1.4-2.2x too high in
the first run of a process and too low in the next. So the runs are timed under glibc's
defaults, and each method's memory is measured on the first task by a probe in a child
of its own that sets the small threshold (``mallopt``) before anything else: a fresh
model, the method's first LR and schedule, ``--probe-steps`` steps (SpIEL with
``update_every = accumulate_steps``, so that its dense AG window and a regrowth fall
inside them). ``peak_train_mb`` = ``VmHWM`` after the steps (the high-water mark reset
through ``/proc/self/clear_refs`` before them) minus ``VmRSS`` before them: what
training adds on top of the resident model. ``peak_total_mb`` = ``model_mb +
peak_train_mb`` with ``model_mb`` = the RSS the first model and data added over the RSS
after imports. Where ``clear_refs`` cannot be written, ``ru_maxrss`` is used and
``mem_method`` says so.

Time: ``step_s_median`` is the median wall time of a training step (batch fetch and
encoding included, measured between successive batch requests; SPEFT's scoring and
selection are excluded, and reported in ``setup_s``).

bf16 (``--bf16``) is off by default: on this project's AMD EPYC CPUs without
avx512_bf16, bf16 training measured about 25x slower than fp32.

The estimate printed at the start (``estimate_seconds``) adds up ``STEP_S``, ``EVAL_S``
and the other constants below per child, scaled linearly with batch size, with
``min(max_length, 96)`` and with the task's ``LENGTH`` (mean padded batch width
relative to the reviews': debate statements fill the 96 tokens), and schedules the
children ``--jobs`` at a time. ``STEP_S`` is the median step of the 60-step run of
2026-11-23 (two 1-thread children, glibc's defaults).

Example:
    nice -n 10 python tools/bench/quality.py --out /tmp/q17 > /tmp/q17.log 2>&1 &
    OMP_NUM_THREADS=1 python tools/bench/quality.py --steps 2 --val-examples 16 \\
        --test-examples 16 --probe-steps 0 --out /tmp/q   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from _quality_runs import (
    METHODS,
    SWEPT,
    Config,
    _finished_run,
    _timed,
    keep_result,
    kept_result,
    lora_rank_for,
    parse_schedule,
    probe_memory,
    run_name,
    sweep_child,
    test_child,
    train,
)
from _quality_tasks import TASKS

__all__ = ["Config", "METHODS", "_timed", "estimate_seconds", "format_table", "lora_rank_for",
           "main", "parse", "run", "train"]

#: Seconds per training step, fp32, batch 8, max_length 96, reviews, 1 thread per child, two
#: children at once on 2 cores, glibc's default malloc; PROBE_SLOWDOWN for the memory probes.
STEP_S = {"full": 5.8, "lora": 4.6, "speft_gradient": 5.9, "speft_magnitude": 4.8,
          "spiel_ag": 4.6}
PROBE_SLOWDOWN = 1.6
#: Mean padded batch width of each task's training batches relative to the reviews' (72 tokens;
#: debate statements 95.5 at max_length 96).
LENGTH = {"sentiment": 1.0, "debates": 1.33, "hamlet": 1.3}
#: Seconds per evaluated row (batches of 32), per gradient-calibration example, per SPEFT top-k
#: selection, per child process (spawn, imports, data, model) and per run.
EVAL_S, CALIB_S, SELECT_S, CHILD_S, RUN_S = 0.23, 1.1, 10.0, 15.0, 2.0
TEST_N = {"sentiment": 1000, "debates": 400, "hamlet": 100}


def _scale(cfg: Config, task: str) -> float:
    return cfg.batch_size / 8 * min(cfg.max_length, 96) / 96 * LENGTH[task]


def _test_n(cfg: Config, task: str) -> int:
    return min(cfg.test_examples, TEST_N[task])


def sweep_seconds(cfg: Config, task: str, method: str, runs_dir: Path | None = None) -> float:
    """Expected wall time of one (task, method) sweep child.

    With ``runs_dir``, the runs an earlier sweep finished there (kept, not rerun) count
    for nothing, so that the children with the most work left start first.
    """
    eval_s = EVAL_S * min(cfg.max_length, 96) / 96 * LENGTH[task]
    total = CHILD_S + cfg.val_examples * eval_s
    if method == "zero_shot":
        return total + _test_n(cfg, task) * eval_s
    runs = len(cfg.lrs[method]) * (1 if method == "full" else len(cfg.schedules))
    if runs_dir is not None and method != "full":
        runs -= sum(_finished_run(runs_dir / task / method / run_name(lr, s), cfg) is not None
                    for lr in cfg.lrs[method] for s in cfg.schedules)
    setup = SELECT_S if method.startswith("speft") else 0.0
    once = CALIB_S * cfg.calibration_examples if method == "speft_gradient" else 0.0
    per_run = cfg.steps * STEP_S[method] * _scale(cfg, task) + cfg.val_examples * eval_s
    total += once + runs * (per_run + setup + RUN_S)
    return total + (_test_n(cfg, task) * eval_s if method == "full" else 0.0)


def test_seconds(cfg: Config, task: str) -> float:
    return CHILD_S + _test_n(cfg, task) * EVAL_S * min(cfg.max_length, 96) / 96 * LENGTH[task]


def probe_seconds(cfg: Config, method: str) -> float:
    setup = SELECT_S if method.startswith("speft") else 0.0
    setup += CALIB_S * cfg.calibration_examples if method == "speft_gradient" else 0.0
    return CHILD_S + setup + cfg.probe_steps * STEP_S[method] * _scale(
        cfg, cfg.tasks[0]) * PROBE_SLOWDOWN


def _schedule(times: list[float], jobs: int) -> float:
    workers = [0.0] * max(1, jobs)
    for t in times:
        i = workers.index(min(workers))
        workers[i] += t
    return max(workers)


def estimate_seconds(cfg: Config) -> float:
    """Expected wall time on an idle 2-core machine: the sweep children, then the tests."""
    sweeps = sorted((sweep_seconds(cfg, t, m) for t in cfg.tasks for m in cfg.methods),
                    reverse=True)
    probes = [probe_seconds(cfg, m) for m in cfg.methods if m != "zero_shot"
              and cfg.probe_steps > 0]
    tests = [test_seconds(cfg, t) for t in cfg.tasks for m in cfg.methods if m in SWEPT]
    return _schedule(sweeps + probes, cfg.jobs) + _schedule(tests, cfg.jobs)


# ---------------------------------------------------------------- parent process


def stderr(p: float | None, n: int | None) -> float | None:
    """The standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` over ``n`` rows."""
    return None if p is None or not n else math.sqrt(p * (1 - p) / n)


def choose(results: dict[str, dict[str, dict[str, Any]]], cfg: Config) -> dict[str, Any]:
    """Per swept method: the (LR, schedule) with the best mean validation accuracy over tasks."""
    chosen: dict[str, Any] = {}
    for m in cfg.methods:
        if m not in SWEPT or any("runs" not in results[t].get(m, {}) for t in cfg.tasks):
            continue
        best: dict[str, Any] | None = None
        for i, run in enumerate(results[cfg.tasks[0]][m]["runs"]):  # the same grid order
            key = (run["lr"], run["schedule"])
            vals = [next((r["val_accuracy"] for r in results[t][m]["runs"]
                          if (r["lr"], r["schedule"]) == key), None) for t in cfg.tasks]
            if any(v is None for v in vals):
                continue  # not run on every task
            mean = sum(v for v in vals if v is not None) / len(vals)
            if best is None or mean > best["mean_val"]:
                best = {"lr": key[0], "schedule": key[1], "mean_val": mean, "index": i}
        chosen[m] = best
    return chosen


def _cell(acc: float | None, se: float | None) -> str:
    return "-" if acc is None or se is None else f"{acc:.3f} ± {se:.3f}"


def _find_run(result: dict[str, Any], key: tuple[float, str]) -> dict[str, Any] | None:
    """The run of ``(lr, schedule)`` in a sweep child's result, if it ran."""
    return next((r for r in result.get("runs", []) if (r["lr"], r["schedule"]) == key), None)


def _se(r: dict[str, Any], split: str) -> float | None:
    """A result's standard error: as measured (``*_se``), else binomial over its rows."""
    se = r.get(f"{split}_se")
    return se if se is not None else stderr(r.get(f"{split}_accuracy"), r.get(f"{split}_n"))


def format_table(report: dict[str, Any]) -> str:
    """The sweep (validation) and the results (test) as markdown tables."""
    results, chosen = report["results"], report.get("chosen", {})
    tasks = list(results)
    lines = ["| method | schedule | LR | " + " | ".join(f"{t} val" for t in tasks)
             + " | mean val |", "|" + "---|" * (4 + len(tasks))]
    methods = [m for m in METHODS if any("runs" in results[t].get(m, {}) for t in tasks)]
    for m in methods:
        for run in next(results[t][m]["runs"] for t in tasks if "runs" in results[t].get(m, {})):
            key = (run["lr"], run["schedule"])
            found = [_find_run(results[t].get(m, {}), key) for t in tasks]
            accs = [r["val_accuracy"] if r else None for r in found]
            cells = [_cell(a, _se(r, "val") if r else None) for a, r in zip(accs, found,
                                                                             strict=True)]
            mean = (sum(a for a in accs if a is not None) / len(accs)
                    if all(a is not None for a in accs) else None)
            c = chosen.get(m, {})
            mark = " **(default)**" if (c.get("lr"), c.get("schedule")) == key else ""
            lines.append(f"| {m} | {run['schedule']} | {run['lr']:g} | " + " | ".join(cells)
                         + f" | {'-' if mean is None else f'{mean:.3f}'}{mark} |")
    lines += ["", "| method | trainable params | " + " | ".join(
        f"{t} test | {t} step s" for t in tasks) + " | peak train MiB |",
        "|" + "---|" * (3 + 2 * len(tasks))]
    for m in [m for m in METHODS if any(m in results[t] for t in tasks)]:
        rows = [results[t].get(m, {}) for t in tasks]
        if any("error" in r for r in rows):
            errs = "; ".join(r["error"] for r in rows if "error" in r)
            lines.append(f"| {m} | error: {errs} |" + " |" * (1 + 2 * len(tasks)))
            continue
        trainable = next((r.get("trainable_params") for r in rows if "trainable_params" in r), None)
        cells = []
        for r in rows:
            run = r.get("chosen_run") or {}
            cells += [_cell(r.get("test_accuracy"), _se(r, "test")),
                      "-" if run.get("step_s_median") is None else f"{run['step_s_median']:.2f}"]
        peak = report.get("memory", {}).get(m, {}).get("peak_train_mb")
        lines.append(f"| {m} | {'-' if trainable is None else f'{trainable:,}'} | "
                     + " | ".join(cells) + f" | {'-' if peak is None else f'{peak:.0f}'} |")
    return "\n".join(lines)


def _result(future: Any) -> dict[str, Any]:
    """A child's result; its exception becomes ``error`` (the other children go on)."""
    try:
        return future.result()  # type: ignore[no-any-return]
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def _write(out_dir: Path, report: dict[str, Any]) -> str:
    table = format_table(report)
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2))
    (out_dir / "quality.md").write_text(table + "\n")
    return table


def _pool(cfg: Config) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=get_context("spawn"),
                               max_tasks_per_child=1)  # a fresh process per child


def _done(result: dict[str, Any]) -> bool:
    """A sweep child's result that a resumed run keeps (finished, without error)."""
    return bool(result) and "error" not in result and "elapsed_s" in result


def _resumed(out_dir: Path, report: dict[str, Any], say: Callable[[str], None]) -> None:
    """Take the finished sweep children of an earlier run with the same settings."""
    path = out_dir / "quality.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    same = {k: v for k, v in old["config"].items() if k != "estimate_s"} == {
        k: v for k, v in json.loads(json.dumps(report["config"])).items() if k != "estimate_s"}
    if not same:
        raise SystemExit(f"--resume: {path} was made with other settings; use another --out.")
    for t, per_task in old["results"].items():
        for m, r in per_task.items():
            if _done(r):
                report["results"][t][m] = {k: v for k, v in r.items()
                                           if k not in ("test_accuracy", "test_n", "test_eval_s",
                                                        "test_se",
                                                        "chosen_run", "test_error")
                                           or m not in SWEPT}
                say(f"resumed: {t} {m}")
    report["memory"] = old.get("memory", {})


def _sweep(cfg: Config, out_dir: Path, report: dict[str, Any], say: Callable[[str], None],
           t0: float) -> None:
    results = report["results"]
    order = sorted(((t, m) for t in cfg.tasks for m in cfg.methods),
                   key=lambda tm: -sweep_seconds(cfg, *tm, out_dir / "runs"))  # longest first
    order = [(t, m) for t, m in order if not _done(results[t].get(m, {}))]
    if cfg.cached_only:  # only kept records to read: no child process, no model
        for t, m in [(t, m) for t, m in order if m != "zero_shot"]:
            results[t][m] = sweep_child(t, m, asdict(cfg), str(out_dir / "runs"))
            say(f"kept: {t} {m}: {len(results[t][m]['runs'])} runs")
        order = [(t, m) for t, m in order if m == "zero_shot"]
    with _pool(cfg) as pool:
        futures = {pool.submit(sweep_child, t, m, asdict(cfg), str(out_dir / "runs")): (t, m)
                   for t, m in order}
        if cfg.probe_steps > 0:
            futures.update({pool.submit(probe_memory, m, asdict(cfg)): ("probe", m)
                            for m in cfg.methods if m != "zero_shot"})
        for done, future in enumerate(as_completed(futures), 1):
            t, m = futures[future]
            r = _result(future)
            if t == "probe":
                report["memory"][m] = r
                note = r.get("error") or f"peak train {r['peak_train_mb']:.0f} MiB"
            else:
                results[t][m] = r
                note = r.get("error") or ", ".join(
                    f"{x['lr']:g} {x['schedule']}: {x['val_accuracy']:.3f}"
                    for x in r.get("runs", [])) or (f"val {r['val_accuracy']:.3f}"
                                                    if "val_accuracy" in r else "nothing kept")
            elapsed = time.perf_counter() - t0
            say(f"[{done}/{len(futures)}] {t} {m}: {note} (elapsed {elapsed:.0f} s)")
            report["elapsed_s"] = time.perf_counter() - t0
            _write(out_dir, report)


def _test_stem(weights: str) -> Path:
    """Where the test result of a run's saved weights is kept."""
    return Path(weights.removesuffix(".safetensors") + ".test")


def _tests(cfg: Config, out_dir: Path, report: dict[str, Any], say: Callable[[str], None],
           t0: float) -> None:
    results, chosen = report["results"], report["chosen"]
    jobs = {}
    for m, c in chosen.items():
        for t in cfg.tasks:
            run = _find_run(results[t][m], (c["lr"], c["schedule"]))
            assert run is not None  # choose() takes only runs made on every task
            results[t][m]["chosen_run"] = run
            results[t][m].update(chosen_lr=c["lr"], chosen_schedule=c["schedule"],
                                 val_accuracy=run["val_accuracy"], val_n=run["val_n"],
                                 val_se=run.get("val_se"),
                                 trainable_params=run["trainable_params"])
            jobs[(t, m)] = run["weights"]
    for t in cfg.tasks:  # full fine-tuning's own choice, for the table's step time
        full = results[t].get("full", {})
        if "chosen_lr" in full:
            full["chosen_run"] = next(r for r in full["runs"] if r["lr"] == full["chosen_lr"])
    key = {"test_examples": cfg.test_examples}
    for (t, m), w in list(jobs.items()):
        if (kept := kept_result(_test_stem(w), cfg, key)) is not None:
            results[t][m].update(kept)  # tested by an earlier sweep: the same weights and rows
            say(f"test {t} {m}: kept {kept['test_accuracy']:.3f}")
            del jobs[(t, m)]
        elif cfg.cached_only:
            say(f"test {t} {m}: not tested by an earlier sweep (--cached-only)")
            del jobs[(t, m)]
    with _pool(cfg) as pool:
        futures = {pool.submit(test_child, t, m, asdict(cfg), w): (t, m)
                   for (t, m), w in sorted(jobs.items(), key=lambda kv: -TEST_N[kv[0][0]])}
        for future in as_completed(futures):
            t, m = futures[future]
            r = _result(future)
            if "error" not in r:
                keep_result(_test_stem(jobs[(t, m)]), cfg, key, r)
            results[t][m].update({"test_error": r["error"]} if "error" in r else r)
            say(f"test {t} {m} (lr {chosen[m]['lr']:g}, {chosen[m]['schedule']}): "
                f"{r.get('error') or format(r['test_accuracy'], '.3f')}")
            report["elapsed_s"] = time.perf_counter() - t0
            _write(out_dir, report)


def run(cfg: Config, out_dir: Path, say: Callable[[str], None] = print, *,
        resume: bool = False, test: bool = True) -> dict[str, Any]:
    """The sweep children, the cross-task choice, then the test children; writes as it goes.

    With ``resume``, finished sweep children of an earlier run in ``out_dir`` with the
    same settings are kept (their saved weights too) and only the rest run; the choice
    and the test phase always run again.
    """
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)  # the timed runs use glibc's defaults
    out_dir.mkdir(parents=True, exist_ok=True)
    est = estimate_seconds(cfg)
    say(f"quality benchmark: tasks {', '.join(cfg.tasks)}; methods {', '.join(cfg.methods)}; "
        f"schedules {', '.join(cfg.schedules)}; {cfg.steps} steps x batch {cfg.batch_size}; "
        f"estimated {est / 60:.0f} min on an idle 2-core CPU")
    import peft
    import transformers

    report: dict[str, Any] = {
        "config": {**asdict(cfg), "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__,
                   "estimate_s": est},
        "results": {t: {} for t in cfg.tasks}, "memory": {}, "chosen": {}}
    if resume:
        _resumed(out_dir, report, say)
    t0 = time.perf_counter()
    _sweep(cfg, out_dir, report, say, t0)
    report["elapsed_s"] = time.perf_counter() - t0
    report["chosen"] = choose(report["results"], cfg)
    say("defaults chosen on validation (mean over tasks): " + "; ".join(
        f"{m} lr {c['lr']:g} {c['schedule']} ({c['mean_val']:.3f})"
        for m, c in report["chosen"].items()))
    if test:
        _tests(cfg, out_dir, report, say, t0)
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
    p.add_argument("--lrs-lora", type=_floats, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--lrs-speft-gradient", type=_floats, default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--lrs-speft-magnitude", type=_floats, default=[1e-3, 3e-3])
    p.add_argument("--lrs-spiel", type=_floats, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--schedules", default=",".join(d.schedules),
                   help="kind[@warmup] per schedule: constant, linear, cosine; warmup steps "
                        "or ratio (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(d.tasks), help=f"subset of {','.join(TASKS)}")
    p.add_argument("--methods", default=",".join(d.methods), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--jobs", type=int, default=d.jobs,
                   help="children at once, each in its own process (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: CPU cores / jobs)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 (25x slower on this CPU)")
    p.add_argument("--cache-dir", default=None, help="converted checkpoint cache")
    p.add_argument("--out", default="bench-quality", help="directory for quality.json/.md")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimate only")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished sweep children of an earlier run in --out")
    p.add_argument("--no-test", action="store_true",
                   help="stop after the validation sweep and the choice (no test split)")
    p.add_argument("--cached-only", action="store_true",
                   help="LoRA and sparse methods: only the runs an earlier sweep recorded")
    a = p.parse_args(argv)
    methods, tasks = tuple(a.methods.split(",")), tuple(a.tasks.split(","))
    schedules = tuple(a.schedules.split(","))
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if unknown := sorted(set(tasks) - set(TASKS)):
        p.error(f"unknown tasks {unknown}; choose from {','.join(TASKS)}")
    from spdelta.optim import SCHEDULES

    if bad := [s for s in schedules if parse_schedule(s)[0] not in SCHEDULES]:
        p.error(f"unknown schedules {bad}; use kind[@warmup] with kind in {', '.join(SCHEDULES)}")
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
            "cache_dir", "probe_steps", "cached_only")
    cfg = Config(tasks=tasks, methods=methods, schedules=schedules,
                 lrs={m: lrs[m] for m in methods if m in lrs},
                 **{k: getattr(a, k) for k in keys})
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    """Parse, then run (or with ``--dry-run`` only print the estimate)."""
    cfg, a = parse(argv)
    if a.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        print(f"estimated {estimate_seconds(cfg) / 60:.1f} min on an idle 2-core CPU")
        return 0
    run(cfg, Path(a.out), resume=a.resume, test=not a.no_test)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
