"""Scenarios for tests/dist, run single-process by the tests and under ``torchrun`` as a script.

Usage (what the tests run): ``torchrun --standalone --nproc_per_node=2 _worker.py all OUT``;
TASK is ``static``, ``spiel``, ``fsdp``, ``score``, ``ckpt`` (needs ``OUT/ckpt_w1``) or ``all``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spdelta import make_loss_fn
from spdelta.optim import Transform, adamw, sm3
from spdelta.train import TrainState, init_train_state, make_train_step
from spdelta.train.spiel import SpielState, make_spiel_step, random_support, spiel_init

STEPS = 4
SCORE_METRICS = ("gradient", "snip", "fisher")
SPIEL: dict[str, Any] = {"total_steps": 6, "update_every": 2, "accumulate_steps": 2,
                         "initial_fraction": 0.5}
TARGETS = ["lm_head.weight", "model.layers.0.mlp.up_proj.weight",
           "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
           "model.layers.1.self_attn.v_proj.weight"]


def assert_close_tree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, values equal to float64 tolerance."""
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12, msg=n)


def assert_equal_tree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, tensors equal exactly."""
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def assert_losses_close(a: list[float], b: list[float]) -> None:
    """HF computes the loss in fp32 even for fp64 logits, so losses agree to fp32 only."""
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=0)


def make_model() -> nn.Module:
    """The tiny float64 Llama of tests/conftest.py."""
    spec = importlib.util.spec_from_file_location(
        "_spdelta_dist_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_tiny_llama()  # type: ignore[no-any-return]


def base_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def support_of(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    shapes = {n: tuple(base[n].shape) for n in TARGETS}
    return random_support(shapes, density=0.1, generator=torch.Generator().manual_seed(0))


def global_batch(step: int, rows: int = 4) -> dict[str, torch.Tensor]:
    """The global batch of ``step``: every row has 8 counted tokens, so shard means average."""
    ids = torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(100 + step))
    return {"input_ids": ids, "labels": ids}


def spiel_opt(regrowth: str, support: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
              ) -> Transform:
    if regrowth == "ma":
        return sm3(1e-2, support=support, shapes={n: tuple(base[n].shape) for n in support})
    return adamw(1e-2)


def spiel_start(regrowth: Any, base: dict[str, torch.Tensor]) -> tuple[SpielState, Transform]:
    support = support_of(base)
    opt = spiel_opt(regrowth, support, base)
    values = {n: torch.zeros(s.numel(), dtype=torch.float64) for n, s in support.items()}
    return spiel_init(values, support, opt, generator=torch.Generator().manual_seed(7)), opt


def run(step: Callable[[Any, Any], tuple[Any, dict[str, float]]], state: Any, start: int,
        stop: int, batch_of: Callable[[int], dict[str, torch.Tensor]]) -> tuple[Any, list[float]]:
    losses = []
    for t in range(start, stop):
        state, metrics = step(state, batch_of(t))
        losses.append(metrics["loss"])
    return state, losses


def single_static() -> tuple[TrainState, list[float]]:
    """Reference: one process, global batches."""
    model = make_model()
    base, opt = base_of(model), adamw(1e-2)
    support = support_of(base)
    step = make_train_step(make_loss_fn(model), opt, base, support)
    values = {n: torch.zeros(s.numel(), dtype=torch.float64) for n, s in support.items()}
    return run(step, init_train_state(opt, values), 0, STEPS, global_batch)


def single_spiel(regrowth: Any, stop: int = 6, state: SpielState | None = None,
                 start: int = 0) -> tuple[SpielState, list[float]]:
    model = make_model()
    base = base_of(model)
    fresh, opt = spiel_start(regrowth, base)
    step = make_spiel_step(make_loss_fn(model), base, opt, regrowth=regrowth, **SPIEL)
    return run(step, state or fresh, start, stop, global_batch)


def _dist_static(env: Any) -> dict[str, Any]:
    from spdelta.dist import assert_replicated, make_dist_train_step, shard_batch
    from spdelta.errors import SpdeltaError
    model = make_model()
    base, opt = base_of(model), adamw(1e-2)
    support = support_of(base)
    step = make_dist_train_step(make_loss_fn(model), opt, base, support)
    values = {n: torch.zeros(s.numel(), dtype=torch.float64) for n, s in support.items()}
    state, losses = run(step, init_train_state(opt, values), 0, STEPS,
                        lambda t: shard_batch(global_batch(t), env.rank, env.world_size))
    try:  # a rank-dependent tensor must be caught
        assert_replicated({"x": torch.tensor([env.rank])})
        caught = False
    except SpdeltaError:
        caught = True
    return {"values": state.values, "losses": losses, "divergence_caught": caught}


def _dist_spiel(env: Any) -> dict[str, Any]:
    from spdelta.dist import make_dist_spiel_step, shard_batch
    out: dict[str, Any] = {}
    for regrowth in ("ag", "ma"):
        model = make_model()
        base = base_of(model)
        state, opt = spiel_start(regrowth, base)
        step = make_dist_spiel_step(make_loss_fn(model), base, opt, regrowth=regrowth, **SPIEL)
        state, losses = run(step, state, 0, SPIEL["total_steps"],
                            lambda t: shard_batch(global_batch(t), env.rank, env.world_size))
        out[regrowth] = {"support": state.support, "values": state.values, "losses": losses}
    return out


def _dist_fsdp(env: Any, out: str) -> dict[str, Any]:
    """FSDP2 training; the sharded state is saved to ``OUT/ckpt_fsdp``."""
    from spdelta.dist import (
        fsdp_delta,
        fsdp_init,
        load_checkpoint,
        make_fsdp_train_step,
        save_checkpoint,
        shard_batch,
        shard_with_deltas,
    )
    model = make_model()
    support = support_of(base_of(model))
    model = shard_with_deltas(model, support)
    opt = adamw(1e-2)
    step = make_fsdp_train_step(model, opt)
    state, losses = run(step, fsdp_init(model, opt), 0, STEPS,
                        lambda t: shard_batch(global_batch(t), env.rank, env.world_size))
    delta = fsdp_delta(model, state)
    save_checkpoint(state, os.path.join(out, "ckpt_fsdp"))
    back = load_checkpoint(os.path.join(out, "ckpt_fsdp"), template=fsdp_init(model, opt))
    same = all(torch.equal(back.values[n].to_local(), v.to_local()) and
               torch.equal(back.opt_state.nu[n].to_local(), state.opt_state.nu[n].to_local())
               for n, v in state.values.items())
    return {"values": delta.values, "support": delta.support, "losses": losses,
            "resharded_equal": same, "local_numel": sum(v.to_local().numel()
                                                        for v in back.values.values())}


def _dist_score(env: Any) -> dict[str, Any]:
    """Salience over the ranks' shares, and the selected supports."""
    from spdelta.dist import score_distributed, shard_batch
    from spdelta.select import select_topk
    model = make_model()
    base = base_of(model)
    out: dict[str, Any] = {}
    for metric in SCORE_METRICS:
        local = [shard_batch(global_batch(t), env.rank, env.world_size) for t in range(2)]
        scores = score_distributed(model, base, local, metric=metric, targets=TARGETS,
                                   progress=False)
        out[metric] = {"scores": scores, "support": select_topk(scores, density=0.05)}
    return out


def single_score(metric: str) -> dict[str, Any]:
    """Reference: :func:`spdelta.salience.score` on the global batches in one process."""
    from spdelta.salience import score
    from spdelta.select import select_topk
    model = make_model()
    scores = score(model, base_of(model), [global_batch(t) for t in range(2)], metric=metric,
                   targets=TARGETS, progress=False)
    return {"scores": scores, "support": select_topk(scores, density=0.05)}


def _dist_ckpt(env: Any, out: str) -> dict[str, Any]:
    """Train 3 steps at this world size and save; also resume the world-1 checkpoint."""
    from spdelta.dist import load_checkpoint, make_dist_spiel_step, save_checkpoint, shard_batch
    model = make_model()
    base = base_of(model)
    state, opt = spiel_start("ag", base)
    step = make_dist_spiel_step(make_loss_fn(model), base, opt, regrowth="ag", **SPIEL)
    shard = lambda t: shard_batch(global_batch(t), env.rank, env.world_size)  # noqa: E731
    state, _ = run(step, state, 0, 3, shard)
    save_checkpoint(state, os.path.join(out, "ckpt_w2"))
    resumed = load_checkpoint(os.path.join(out, "ckpt_w1"))
    resumed, _ = run(step, resumed, resumed.step, SPIEL["total_steps"], shard)
    return {"support": resumed.support, "values": resumed.values}


def main(task: str, out: str) -> None:
    from spdelta.dist import init_from_env
    torch.set_num_threads(1)
    env = init_from_env()
    tasks: dict[str, Callable[[], dict[str, Any]]] = {
        "static": lambda: _dist_static(env), "spiel": lambda: _dist_spiel(env),
        "fsdp": lambda: _dist_fsdp(env, out), "score": lambda: _dist_score(env),
        "ckpt": lambda: _dist_ckpt(env, out)}
    chosen = list(tasks) if task == "all" else [task]
    if not set(chosen) <= set(tasks):
        raise SystemExit(f"unknown task {task!r}")
    result = {name: tasks[name]() for name in chosen}
    torch.save(result, os.path.join(out, f"rank{env.rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
