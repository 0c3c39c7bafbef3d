"""A training job's support selection, optimizer and step function (data parallel or FSDP2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from spdelta.dist import (
    fsdp_spiel_init,
    load_checkpoint,
    make_dist_spiel_step,
    make_dist_train_step,
    make_fsdp_spiel_step,
    make_fsdp_train_step,
    score_distributed,
    shard_with_deltas,
)
from spdelta.errors import SpdeltaError
from spdelta.functional import make_loss_fn
from spdelta.optim import Schedule, adamw, sm3
from spdelta.recipes._job_config import TrainConfig
from spdelta.recipes._job_run import Batch, StepFn
from spdelta.salience import score
from spdelta.select import budgets, select_topk
from spdelta.train import SpielState
from spdelta.train._defaults import default_lr
from spdelta.train._loop import TrainState, clipped, learning_rate, make_train_step
from spdelta.train.spiel import make_spiel_step
from spdelta.types import Params, Support


def budget_density(shapes: Mapping[str, tuple[int, ...]], cfg: TrainConfig) -> float:
    if cfg.lora_rank is None:
        return 0.01 if cfg.density is None else cfg.density

    total = sum(math.prod(s) for s in shapes.values())
    return budgets(shapes, lora_rank=cfg.lora_rank)[""] / total


def select_support(cfg: TrainConfig, model: Any, base: Params, names: list[str],
                   rows: Callable[[int], list[Batch]], world: int) -> Support:
    """SPEFT's support: salience on the first steps' batches (``rows(t)``), global top-k."""
    n_batches = max(1, math.ceil(cfg.calibration_examples / cfg.batch_size))
    calibration = [b for t in range(n_batches) for b in rows(t)]
    kwargs: dict[str, Any] = {"metric": cfg.metric, "targets": names, "progress": cfg.progress,
                              "num_examples": max(1, cfg.calibration_examples // world),
                              "generator": torch.Generator().manual_seed(cfg.seed)}
    scores = (score_distributed(model, base, calibration, **kwargs) if world > 1
              else score(model, base, calibration, **kwargs))
    if cfg.lora_rank is not None:
        return select_topk(scores, lora_rank=cfg.lora_rank)
    return select_topk(scores, density=0.01 if cfg.density is None else cfg.density)


def lr_schedule(cfg: TrainConfig, total: int) -> Schedule:
    """The job's learning rate at each step (peak ``cfg.lr`` or the method's default)."""
    lr = default_lr(cfg.method) if cfg.lr is None else cfg.lr
    return learning_rate(lr, schedule=cfg.schedule, warmup=cfg.warmup, total_steps=total)


def make_optimizer(cfg: TrainConfig, support: Support,
                   shapes: Mapping[str, tuple[int, ...]], total: int) -> Any:
    """AdamW (SM3 for SpIEL-MA) on the job's schedule, after clipping if asked."""
    rate = lr_schedule(cfg, total)
    if cfg.method == "spiel" and cfg.regrowth == "ma":
        return clipped(sm3(rate, support=support, shapes=shapes), cfg.max_grad_norm)
    return clipped(adamw(rate, weight_decay=cfg.weight_decay), cfg.max_grad_norm)


def static_step(inner: Callable[[Any, Batch], tuple[Any, dict[str, float]]]) -> StepFn:
    """A fixed-support ``TrainState`` step as a step on the job's ``SpielState``."""
    def static_step(s: SpielState, batch: Batch) -> tuple[SpielState, dict[str, float]]:
        t, metrics = inner(TrainState(s.values, s.opt_state, s.step), batch)
        return s._replace(values=t.values, opt_state=t.opt_state, step=t.step), metrics

    return static_step


def make_step_fn(cfg: TrainConfig, model: Any, base: Params, support: Support, optimizer: Any,
             total: int, world: int) -> StepFn:
    loss_fn = make_loss_fn(model)  # the fast path, NF4 targets included
    if cfg.method == "spiel":
        kwargs: dict[str, Any] = {"total_steps": total, "regrowth": cfg.regrowth, "update_every":
                  cfg.update_every, "accumulate_steps": cfg.accumulate_steps,
                  "initial_fraction": cfg.initial_fraction}
        if world > 1:
            return make_dist_spiel_step(loss_fn, base, optimizer, **kwargs)
        return make_spiel_step(loss_fn, base, optimizer, **kwargs)
    make = make_dist_train_step if world > 1 else make_train_step
    return static_step(make(loss_fn, optimizer, base, support))


def fsdp_engine(cfg: TrainConfig, model: Any, state: SpielState, total: int,
          resume_from: Path | None) -> tuple[Any, SpielState, StepFn]:
    """Shard ``model`` with deltas on ``state.support`` (FSDP2); the sharded state and step."""
    # A tensor the global top-k left empty gets no attached delta (FSDP cannot shard 0 values).
    model = shard_with_deltas(model, {n: i for n, i in state.support.items() if i.numel()})
    optimizer = make_optimizer(cfg, state.support, {}, total)
    template = fsdp_spiel_init(model, optimizer)  # values/optimizer state as sharded DTensors
    if resume_from is not None:
        loaded = load_checkpoint(resume_from, template=template)
        if not isinstance(loaded, SpielState):
            raise SpdeltaError(f"{str(resume_from)!r}: expected a spdelta train job checkpoint; "
                               f"found a {type(loaded).__name__}. Delete it to start over.")
        state = loaded._replace(rng_state=state.rng_state)
    else:
        state = template
    if cfg.method == "spiel":
        return model, state, make_fsdp_spiel_step(
            model, optimizer, total_steps=total, regrowth="ag",
            update_every=cfg.update_every, accumulate_steps=cfg.accumulate_steps,
            initial_fraction=cfg.initial_fraction)
    return model, state, static_step(make_fsdp_train_step(model, optimizer))

