"""FSDP2 SpIEL scenarios for tests/dist/test_fsdp_spiel.py, run under ``torchrun``.

Usage: ``torchrun --standalone --nproc_per_node=N _fsdp_spiel_worker.py TASK OUT``; TASK is
``train`` (the whole run, saving ``OUT/ckpt_fsdp_spiel`` at step ``SAVE_AT``) or ``resume``
(loads that checkpoint and finishes the run), at any world size.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

SAVE_AT = 3  # inside the second AG window: the sharded accumulators are in the checkpoint
CKPT = "ckpt_fsdp_spiel"


def _load_worker() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_spdelta_dist_worker", Path(__file__).with_name("_worker.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _load_worker()


def _setup() -> tuple[Any, Any, Any, Any]:
    """The sharded model (start support of the reference run), its step, init state, optimizer."""
    from spdelta.dist import fsdp_spiel_init, make_fsdp_spiel_step, shard_with_deltas
    model = W.make_model()
    start, opt = W.spiel_start("ag", W.base_of(model))
    model = shard_with_deltas(model, start.support)
    step = make_fsdp_spiel_step(model, opt, regrowth="ag", **W.SPIEL)
    return model, step, fsdp_spiel_init(model, opt), opt


def _batches(env: Any) -> Any:
    from spdelta.dist import shard_batch
    return lambda t: shard_batch(W.global_batch(t), env.rank, env.world_size)


def _summary(model: Any, state: Any) -> dict[str, Any]:
    from spdelta.dist import fsdp_delta
    from spdelta.dist._fsdp import _delta_layers
    delta = fsdp_delta(model, state)
    layers = _delta_layers(model)
    return {"support": dict(state.support), "delta_support": delta.support,
            "values": delta.values,
            "buffers_match": all(torch.equal(layers[n].support, s)
                                 for n, s in state.support.items()),
            "sharded": all(isinstance(v, DTensor) for v in state.values.values()),
            "local_numel": sum(v.to_local().numel() for v in state.values.values())}


def _train(env: Any, out: str) -> dict[str, Any]:
    from spdelta.dist import save_checkpoint
    model, step, state, _ = _setup()
    batch = _batches(env)
    losses, regrown = [], []
    for t in range(W.SPIEL["total_steps"]):
        state, metrics = step(state, batch(t))
        losses.append(metrics["loss"])
        regrown.append(metrics["regrown"])
        if state.step == SAVE_AT:
            grad_acc_sharded = all(isinstance(g, DTensor) for g in state.grad_acc.values())
            save_checkpoint(state, os.path.join(out, CKPT))
    return {**_summary(model, state), "losses": losses, "regrown": regrown,
            "grad_acc_sharded": grad_acc_sharded}


def _resume(env: Any, out: str) -> dict[str, Any]:
    from spdelta.dist import load_checkpoint
    model, step, template, _ = _setup()
    state = load_checkpoint(os.path.join(out, CKPT), template=template)
    state, losses = W.run(step, state, state.step, W.SPIEL["total_steps"], _batches(env))
    return {**_summary(model, state), "losses": losses, "step": state.step}


def main(task: str, out: str) -> None:
    from spdelta.dist import init_from_env
    torch.set_num_threads(1)
    env = init_from_env()
    result = {"train": _train, "resume": _resume}[task](env, out)
    torch.save(result, os.path.join(out, f"{task}_rank{env.rank}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
