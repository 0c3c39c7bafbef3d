"""spdelta.dist in one process: sharding, no-op collectives, DCP round trips, errors."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spdelta import make_loss_fn
from spdelta.dist import (
    init_from_env,
    load_checkpoint,
    make_dist_train_step,
    save_checkpoint,
    score_distributed,
    shard_batch,
    shard_with_deltas,
    sync_loss_fn,
)
from spdelta.errors import KeyMismatchError, ParameterError, SpdeltaError
from spdelta.functional import add_at
from spdelta.optim import adamw, chain, sm3
from spdelta.salience import score
from spdelta.train import TrainState, init_train_state, make_train_step
from spdelta.train.spiel import SpielState, spiel_init


def test_shard_batch_splits_rows_and_keeps_the_rest() -> None:
    batch: dict[str, Any] = {"input_ids": torch.arange(12).view(6, 2), "flag": 3,
                             "scalar": torch.tensor(1.0)}
    parts = [shard_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert parts[2]["flag"] == 3 and parts[1]["scalar"] is batch["scalar"]


@pytest.mark.parametrize(("batch", "rank", "world", "match"), [
    ({"x": torch.zeros(3, 2)}, 0, 2, "not a multiple"),
    ({"x": 1}, 0, 2, "no tensor"),
    ({"x": torch.zeros(2)}, 2, 2, "rank"),
])
def test_shard_batch_errors(batch: dict, rank: int, world: int, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        shard_batch(batch, rank, world)


def test_init_from_env_without_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    env = init_from_env()
    assert (env.rank, env.world_size, env.backend) == (0, 1, "")


def test_single_process_dist_step_equals_plain_step(tiny_llama: nn.Module,
                                                    token_batch: dict) -> None:
    base = {k: v.detach() for k, v in tiny_llama.named_parameters()}
    support = {"model.layers.0.mlp.up_proj.weight": torch.tensor([0, 5, 77])}
    values = {n: torch.zeros(3, dtype=torch.float64) for n in support}
    fn, opt = make_loss_fn(tiny_llama), adamw(0.1)
    a, _ = make_train_step(fn, opt, base, support)(init_train_state(opt, values), token_batch)
    b, _ = make_dist_train_step(fn, opt, base, support)(init_train_state(opt, values), token_batch)
    assert torch.equal(a.values[next(iter(support))], b.values[next(iter(support))])
    g = torch.func.grad(sync_loss_fn(fn))(values, base, support, token_batch)
    assert torch.equal(g[next(iter(support))], torch.func.grad(fn)(values, base, support,
                                                                    token_batch)[next(iter(support))])


@pytest.mark.parametrize("metric", ["gradient", "snip", "taylor_fo", "force", "fisher",
                                    "magnitude", "random"])
def test_score_distributed_on_one_process_equals_score(tiny_llama: nn.Module, token_batch: dict,
                                                       metric: str) -> None:
    base = dict(tiny_llama.named_parameters())
    kw: dict[str, Any] = {"metric": metric, "targets": "all-linear", "progress": False}
    a = score(tiny_llama, base, [token_batch], generator=torch.Generator().manual_seed(0), **kw)
    b = score_distributed(tiny_llama, base, [token_batch],
                          generator=torch.Generator().manual_seed(0), **kw)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-15)


def test_score_distributed_rejects_nonlinear_metrics(tiny_llama: nn.Module) -> None:
    with pytest.raises(ParameterError, match="grasp"):
        score_distributed(tiny_llama, dict(tiny_llama.named_parameters()), [], metric="grasp")


def _spiel_state() -> SpielState:
    support = {"a.weight": torch.tensor([1, 4]), "b.weight": torch.tensor([0, 2, 3])}
    shapes = {"a.weight": (2, 3), "b.weight": (4,)}
    opt = chain(sm3(0.1, support=support, shapes=shapes), adamw(0.1))
    values = {"a.weight": torch.tensor([0.5, -1.0]), "b.weight": torch.tensor([1.0, 2.0, 3.0])}
    state = spiel_init(values, support, opt, generator=torch.Generator().manual_seed(3))
    _, opt_state = opt.update({n: v * 0.1 for n, v in values.items()}, state.opt_state, values)
    return state._replace(opt_state=opt_state, step=5, grad_acc={"a.weight": torch.ones(6)})


def test_checkpoint_round_trip_is_exact_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    save_checkpoint(TrainState({"w": torch.zeros(1)}, None, 1), path)
    state = _spiel_state()
    save_checkpoint(state, path)  # replaces the first
    back = load_checkpoint(path)
    assert isinstance(back, SpielState) and back.step == 5
    assert back.rng_state is not None and state.rng_state is not None
    assert torch.equal(back.rng_state, state.rng_state)
    assert back.opt_state[0].steps == 1
    assert all(bool((s == 1).all()) for s in back.opt_state[1].steps.values())
    for a, b in zip(back.opt_state[0].accumulators["a.weight"],
                    state.opt_state[0].accumulators["a.weight"], strict=True):
        assert torch.equal(a, b)
    for field in ("values", "support", "grad_acc"):
        for n, t in getattr(state, field).items():
            assert torch.equal(getattr(back, field)[n], t)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp, old or lock file left
    assert os.listdir(path) == ["state.safetensors"]


def test_load_checkpoint_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(SpdeltaError, match="not a spdelta training checkpoint"):
        load_checkpoint(tmp_path)
    import warnings

    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"x": torch.ones(1)}, checkpoint_id=tmp_path / "other", no_dist=True)
    with pytest.raises(SpdeltaError, match="pickle.*not read"):
        load_checkpoint(tmp_path / "other")


def test_shard_with_deltas_rejects_non_linear_targets(tiny_llama: nn.Module) -> None:
    with pytest.raises(KeyMismatchError, match="model.embed_tokens.weight"):
        shard_with_deltas(tiny_llama, {"model.embed_tokens.weight": torch.tensor([0])})
