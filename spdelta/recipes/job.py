"""A complete training job on a Hugging Face checkpoint: what ``spdelta train`` runs.

:func:`train_job` loads a causal LM and a table of examples, selects a support
(SPEFT: salience top-k; SpIEL: random, then prune/regrow), trains the delta values,
and writes the delta file, a JSON log and a loss-curve PNG. It checkpoints
periodically and resumes bit for bit; under ``torchrun`` it runs data-parallel
(``torch.distributed``, gloo on CPU, nccl on GPU) with one support on every rank.
The settings are in :mod:`spdelta.recipes._job_config`, the claim on the outputs and the
checkpoint directory in :mod:`spdelta.recipes._job_dir`, the checkpoint and output files
in :mod:`spdelta.recipes._job_io`, the support selection and step functions in
:mod:`spdelta.recipes._job_steps`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from spdelta.dist import init_from_env
from spdelta.errors import ParameterError
from spdelta.functional import make_loss_fn
from spdelta.hf import CheckpointError, checkpoint_fingerprint, fingerprint
from spdelta.quant import to_nf4
from spdelta.recipes._job_config import TrainConfig, check_config
from spdelta.recipes._job_data import JobData
from spdelta.recipes._job_dir import ckpt_dir, claim_run
from spdelta.recipes._job_eval import EvalHook, Evaluator
from spdelta.recipes._job_io import comparable, finish, job_file, load_job, save_job
from spdelta.recipes._job_run import Run, StepFn
from spdelta.recipes._job_steps import (
    budget_density,
    fsdp_engine,
    lr_schedule,
    make_optimizer,
    make_step_fn,
    select_support,
)
from spdelta.recipes._job_targets import job_targets, say_support, say_targets
from spdelta.train import SpielState
from spdelta.train.spiel import random_support

__all__ = ["TrainConfig", "train_job"]

def _device(cfg: TrainConfig, env: Any) -> torch.device:
    """``cfg.device``, or this process's GPU (``env.device``), or the CPU."""
    if cfg.device is None:
        return torch.device(env.device)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ParameterError(f"device: expected 'cpu', 'cuda' or 'cuda:N'; found "
                             f"{cfg.device!r} ({e}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {cfg.device!r}: torch sees no CUDA device here; drop "
                             "--device to use the CPU.")
    if device.type == "cuda" and device.index is None:
        return torch.device(env.device) if env.device.type == "cuda" else torch.device("cuda", 0)
    return device


def _total_steps(cfg: TrainConfig, data: JobData) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * data.per_epoch))


def _quiet_libraries() -> None:
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _base_fingerprint(source: str, model: Any) -> str:
    """The checkpoint's fingerprint from disk (whatever dtype it is loaded in), else the model's."""
    if os.path.isdir(source):
        try:
            return checkpoint_fingerprint(source)
        except CheckpointError:  # e.g. a pytorch_model.bin checkpoint: the loaded model stands in
            pass
    return fingerprint(model)


def _setup(cfg: TrainConfig, say: Callable[[str], None]) -> Run:
    """Join the process group (under ``torchrun``); load the model onto the device, and the data."""
    env = init_from_env(backend="gloo" if cfg.device == "cpu" else None)
    world, device = env.world_size, _device(cfg, env)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    model.to(device)
    model.train()
    data = JobData(cfg, tokenizer)
    if cfg.batch_size % world:
        raise ParameterError(f"batch_size {cfg.batch_size} is not a multiple of the world size "
                             f"{world}; use a multiple of {world}.")
    if cfg.fsdp and (world == 1 or cfg.nf4 or (cfg.method, cfg.regrowth) == ("spiel", "ma")):
        raise ParameterError(f"--fsdp shards over several processes with AdamW: it needs "
                             f"torchrun (found world size {world}), no --nf4, and SPEFT or "
                             "SpIEL-AG; drop --fsdp to train data-parallel instead.")
    base = {n: p.detach() for n, p in model.named_parameters()}
    targets = job_targets(model, cfg.targets)
    names = targets.names
    total, held = _total_steps(cfg, data), data.eval_set()
    evaluator = None if held is None else Evaluator(cfg, tokenizer, held, data.chat_template,
                                                    env.rank, world, device)
    run = Run(env.rank, world, device, say if env.rank == 0 else (lambda _: None), model, data,
               total, base, {n: tuple(base[n].shape) for n in names},
               _base_fingerprint(cfg.model, model), targets,
               EvalHook(evaluator, held, cfg.eval_every, total, cfg.keep == "best"))
    run.speak(f"model {cfg.model}: {len(names)} target tensors, "
              f"{sum(math.prod(s) for s in run.shapes.values()):,} target entries; data "
              f"{cfg.data}: {data.n} rows ({data.format}), {run.total} steps of {cfg.batch_size}"
              + (f" on {world} ranks" if world > 1 else "") + f", on {device}"
              + (f"; {len(held.prompts)} held-out rows" if held is not None else ""))
    say_targets(run.speak, targets, run.shapes)
    return run


def _start(cfg: TrainConfig, run: Run, ckpt: Path, job: dict[str, Any] | None
           ) -> tuple[SpielState, list[dict[str, float]]]:
    """The checkpoint's state (moved to the device) and log, or a new support and zero values."""
    if job is not None:
        state, log = load_job(ckpt, job)
        rng = state.rng_state  # the CPU generator's state stays on the CPU
        state = tree_map_only(torch.Tensor, lambda t: t.to(run.device),
                              state._replace(rng_state=None))._replace(rng_state=rng)
        run.speak(f"resuming from {ckpt} at step {state.step}")
        return state, log
    if cfg.method == "speft":
        support = select_support(cfg, run.model, run.base, list(run.shapes), run.calibration,
                                 run.world)
    else:
        support = random_support(run.shapes, density=budget_density(run.shapes, cfg),
                                 generator=torch.Generator().manual_seed(cfg.seed),
                                 device=run.device)
    say_support(run.speak, support, run.shapes)
    values = {n: torch.zeros(i.numel(), dtype=torch.float32, device=run.device)
              for n, i in support.items()}
    opt = make_optimizer(cfg, support, run.shapes, run.total)
    torch.manual_seed(cfg.seed)  # dropout, if the model has any
    return SpielState(values, support, opt.init(values), 0, {}, None), []


def _engine(cfg: TrainConfig, run: Run, state: SpielState, resume_from: Path | None
            ) -> tuple[Any, SpielState, StepFn, Callable[[SpielState], Any]]:
    """NF4 targets if asked, then the model, state, step and evaluation forward.

    FSDP2-sharded or data parallel. The evaluation forward maps a state to
    ``batch -> logits`` of the model with that state's delta (not under FSDP).
    """
    base = run.base
    if cfg.nf4:
        base = to_nf4(base, list(run.shapes))
        for n, p in run.model.named_parameters():  # drop the dense copies of the targets
            if n in run.shapes:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    if cfg.fsdp:
        return (*fsdp_engine(cfg, run.model, state, run.total, resume_from), _no_forward)
    # An FSDP checkpoint keeps AG sums as (out, in) shards; here they are flat.
    state = state._replace(grad_acc={n: g.reshape(-1) for n, g in state.grad_acc.items()})
    optimizer = make_optimizer(cfg, state.support, run.shapes, run.total)

    logits = make_loss_fn(run.model, lambda out, batch: out.logits)

    def forward(s: SpielState) -> Callable[[dict[str, Any]], torch.Tensor]:
        return lambda batch: logits(s.values, base, s.support, batch)

    return run.model, state, make_step_fn(cfg, run.model, base, state.support, optimizer,
                                          run.total, run.world), forward


def _no_forward(state: SpielState) -> Any:
    raise ParameterError("--fsdp does not evaluate yet.")  # refused by the option checks


def _loop(cfg: TrainConfig, run: Run, state: SpielState, log: list[dict[str, float]],
          step: StepFn, forward: Callable[[SpielState], Any], ckpt: Path
          ) -> tuple[SpielState, int, float]:
    """Train to the end (or ``stop_after``), logging, evaluating and checkpointing."""
    end = run.total if cfg.stop_after is None else min(run.total, state.step + cfg.stop_after)
    rate = lr_schedule(cfg, run.total)
    t_train = time.perf_counter()
    tokens_run = 0
    with tqdm(total=run.total, initial=state.step, desc=f"{cfg.method}", unit="step",
              disable=not (cfg.progress and run.rank == 0)) as bar:
        while state.step < end:
            lr = rate(state.step)
            inputs, tokens = run.step_input(state.step)
            t0 = time.perf_counter()
            state, metrics = step(state, inputs)
            dt = time.perf_counter() - t0
            tokens_run += tokens
            log.append({**metrics, "lr": lr, "tokens": float(tokens), "seconds": dt,
                        **run.evals(state, forward)})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}")
            if "eval_loss" in log[-1]:
                run.speak(f"step {state.step}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in log[-1].items() if k.startswith("eval_")))
            due = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
            if (due and state.step < run.total) or (state.step == end < run.total):
                run.evals.checkpoint(ckpt)  # before the state: see load_best
                save_job(ckpt, state, cfg, log, run.rank)
    return state, tokens_run, time.perf_counter() - t_train


def _eval_summary(run: Run, log: list[dict[str, float]]) -> dict[str, Any]:
    """The last and the best evaluation, and which step's delta is written."""
    evals = [r for r in log if "eval_loss" in r]
    if not evals:
        return {}
    best = run.evals.best_at
    out: dict[str, Any] = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    out.update(best_step=best[0] if best else None, best_metric=run.evals.metric,
               best_value=best[1] if best else None,
               written_step=best[0] if run.evals.keep_best and best else evals[-1]["step"])
    return out


def train_job(cfg: TrainConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a training job end to end and return its report (also the JSON log's ``summary``).

    1. Load the tokenizer and model (``cfg.bf16``: bfloat16) and the rows
       (:func:`spdelta.recipes.data.load_table`,
       :func:`spdelta.recipes.data.prompt_response_pairs`).
    2. Select the support: SPEFT scores the targets on ``calibration_examples`` rows
       and keeps the global top-k; SpIEL draws a random support per tensor. Then, with
       ``cfg.nf4``, quantise the targets to NF4 and free their dense copies.
    3. Train for ``steps`` (or ``epochs``) steps; the batch of step ``t`` depends only
       on ``seed`` and ``t``. A tqdm bar shows the loss and tokens/s. Every
       ``checkpoint_every`` steps the state (values, support, optimizer, AG
       accumulators, torch RNG, step = data position) is saved atomically with
       :func:`spdelta.dist.save_checkpoint` (safetensors + JSON: resuming reads no
       pickle) under ``checkpoint_dir``; ``resume`` continues from it and ends with the
       same delta, bit for bit, as an uninterrupted run, wherever the run was killed.
    4. Write the delta (metadata: base model, fingerprint, method and settings) in the
       names and layout of the checkpoint directory (per-expert tensors of a
       mixture-of-experts model, as ``save_pretrained`` writes them), the JSON log
       (config, one record per step, summary) and the loss-curve PNG. A run killed while
       writing them resumes too: it keeps the delta already there if it is byte for byte
       this run's (and the log and curve), and refuses anything else. A ``resume`` that
       finds this job's finished delta and no checkpoint does nothing.

    Under ``torchrun`` every rank runs this function: each takes its share of every
    global batch, gradients and salience are averaged over ranks, supports are
    identical everywhere, and rank 0 writes the outputs.

    Args:
        cfg: The job's settings.
        say: Where progress lines go (rank 0 only).

    The output files and the checkpoint directory are claimed first (an ``flock`` beside
    each, held to the end): a second run on either fails at once, and nothing is
    overwritten without ``force``. A checkpoint directory holding files spdelta did not
    write (no ``spdelta-checkpoint.json``) is refused; at the end only what spdelta
    wrote there is removed.

    Returns:
        A summary dict: ``steps``, ``finished`` (False when ``stop_after`` stopped it),
        ``loss_first``, ``loss_last``, ``nnz``, ``seconds``, ``tokens_per_s``, paths,
        ``targets_left_out`` (kind -> weights ``all-linear`` skipped: embeddings, norms,
        the output layer, routers) and ``reference_path`` (targets without a fast kernel).

    Raises:
        ParameterError, DataError, OutputExistsError: Bad settings or data.
        OutputBusyError: Another run holds the output or the checkpoint directory.

    Example:
        >>> cfg = TrainConfig(model="ckpt/", data="train.jsonl", output="d.safetensors",
        ...                   steps=100)
        >>> report = train_job(cfg)  # doctest: +SKIP
    """
    check_config(cfg)
    ckpt = ckpt_dir(cfg)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 claims and checks
    with claim_run(cfg, rank, comparable(cfg)) as status:
        if status == "finished":
            say(f"{cfg.output} is this job's finished delta and its checkpoint is gone: "
                "nothing to resume.")
            return {"finished": True, "delta": cfg.output, "resumed": "nothing to do"}
        return _train(cfg, ckpt, say, status == "finishing")


def _train(cfg: TrainConfig, ckpt: Path, say: Callable[[str], None], finishing: bool
           ) -> dict[str, Any]:
    job = job_file(ckpt, cfg) if cfg.resume else None  # fail before the slow part
    if not cfg.progress:
        _quiet_libraries()
    t_start = time.perf_counter()
    run = _setup(cfg, say)
    state, log = _start(cfg, run, ckpt, job)
    if job is not None:
        run.evals.resume(log, ckpt)
    model, state, step, forward = _engine(cfg, run, state,
                                          ckpt / "state" if job is not None else None)
    state, tokens_run, train_s = _loop(cfg, run, state, log, step, forward, ckpt)
    finished = state.step >= run.total
    summary = {"steps": state.step, "total_steps": run.total, "finished": finished,
               "loss_first": log[0]["loss"] if log else None,
               "loss_last": log[-1]["loss"] if log else None,
               "nnz": sum(int(i.numel()) for i in state.support.values()),
               "target_entries": sum(math.prod(s) for s in run.shapes.values()),
               "seconds": time.perf_counter() - t_start, "train_seconds_this_run": train_s,
               "tokens_per_s": tokens_run / train_s if train_s > 0 else 0.0,
               "world_size": run.world, "device": str(run.device), "delta": str(Path(cfg.output)),
               "checkpoint": str(ckpt), "targets_left_out": run.targets.left_out,
               "reference_path": run.targets.reference, **_eval_summary(run, log)}
    if not finished:
        run.speak(f"stopped at step {state.step} of {run.total}; checkpoint in {ckpt}. "
                  "Continue with the same command and --resume.")
        return summary
    finish(cfg, run, model, run.evals.result(state), log, summary, finishing)
    return summary
