"""SpIEL with an optimizer spdelta does not know, and a ``spiel()`` result saved and loaded back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import spdelta
from spdelta import make_loss_fn
from spdelta.errors import ParameterError, SpdeltaError
from spdelta.optim import EntryValues, Transform, state_fields
from spdelta.train import SpielConfig, SpielState, load_state, save_state
from spdelta.train.spiel import make_spiel_step, random_support, spiel, spiel_init
from spdelta.types import Values


class HeavyBallState(NamedTuple):
    """Plain SGD with momentum: one velocity entry per delta value, and a step count."""

    velocity: EntryValues
    count: int


def sgd_momentum(lr: float, beta: float) -> Transform:
    """``v <- beta * v + g``; ``p <- p - lr * v`` (the third optimizer: written here)."""

    def init(params: Values) -> HeavyBallState:
        return HeavyBallState({n: torch.zeros_like(p) for n, p in params.items()}, 0)

    def update(grads: Values, state: HeavyBallState, params: Values
               ) -> tuple[Values, HeavyBallState]:
        del params
        velocity = {n: state.velocity[n] * beta + grads[n] for n in grads}
        return {n: -lr * v for n, v in velocity.items()}, HeavyBallState(velocity, state.count + 1)

    return Transform(init, update)


def _mlp() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    batch = {"input": torch.randn(16, 6, generator=gen, dtype=torch.float64)}
    return model, {k: v.detach() for k, v in model.named_parameters()}, batch


TARGET = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _mse(out: torch.Tensor, batch: dict) -> torch.Tensor:
    del batch
    return (out - TARGET).pow(2).mean()


def test_the_third_optimizer_declares_its_per_entry_field() -> None:
    assert state_fields(HeavyBallState) == (("velocity",), ())


def test_spiel_trains_and_regrows_with_a_third_optimizer(tmp_path: Path) -> None:
    model, base, batch = _mlp()
    shapes = {n: tuple(base[n].shape) for n in ("0.weight", "2.weight")}
    support = random_support(shapes, density=0.3, generator=torch.Generator().manual_seed(2))
    opt = sgd_momentum(0.1, 0.9)
    config = SpielConfig(total_steps=12, update_every=4, accumulate_steps=2, initial_fraction=0.5)
    fn = make_loss_fn(model, loss=_mse)
    step = make_spiel_step(fn, base, opt, **vars(config))
    # The same update without regrowth: the state a regrowth step starts from.
    no_regrowth = make_spiel_step(fn, base, opt, total_steps=12, update_every=12,
                                  accumulate_steps=1)
    state = spiel_init({n: torch.zeros(len(s), dtype=torch.float64) for n, s in support.items()},
                       support, opt)
    losses, regrown_at = [], []
    for t in range(1, 13):
        before_regrowth, _ = no_regrowth(state, batch)
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        assert state.opt_state.count == t
        if not metrics["regrown"]:
            continue
        regrown_at.append(t)
        newcomers = 0
        for n, new in state.support.items():
            old = before_regrowth.support[n]
            assert len(new) == len(old) == len(state.opt_state.velocity[n])
            # Survivors keep their velocity, regrown entries start at 0 (a dict reference).
            by_index = dict(zip(old.tolist(), before_regrowth.opt_state.velocity[n].tolist(),
                                strict=True))
            want = torch.tensor([by_index.get(i, 0.0) for i in new.tolist()], dtype=torch.float64)
            torch.testing.assert_close(state.opt_state.velocity[n], want, rtol=1e-12, atol=1e-15)
            newcomers += sum(i not in by_index for i in new.tolist())
        assert newcomers == metrics["regrown"] > 0
    assert regrown_at == [4, 8]
    assert losses[-1] < 0.85 * losses[0]  # it trains (random targets: a plateau near 0.65)
    # The state, third optimizer included, saves and loads back exactly (its class from
    # the template: a file never names a class to import).
    save_state(state, tmp_path / "s.st")
    with pytest.raises(SpdeltaError, match="unknown state type 'HeavyBallState'"):
        load_state(tmp_path / "s.st")
    back = load_state(tmp_path / "s.st", template=spiel_init(state.values, state.support, opt))
    assert isinstance(back, SpielState) and isinstance(back.opt_state, HeavyBallState)
    assert back.opt_state.count == 12 and back.step == 12
    for n in state.support:
        assert torch.equal(back.opt_state.velocity[n], state.opt_state.velocity[n])
        assert torch.equal(back.values[n], state.values[n])


def test_spiel_config_checks_every_field_at_once() -> None:
    with pytest.raises(ParameterError) as err:
        SpielConfig(total_steps=-1, regrowth="xx", update_every=2, accumulate_steps=3,  # type: ignore[arg-type]
                    initial_fraction=1.5, schedule="step")  # type: ignore[arg-type]
    for word in ("regrowth", "schedule", "total_steps", "accumulate_steps", "initial_fraction"):
        assert word in str(err.value)
    with pytest.raises(ParameterError, match="update_every"):
        SpielConfig(total_steps=4, update_every=0)
    config = SpielConfig(total_steps=4)
    with pytest.raises(AttributeError):
        config.total_steps = 5  # type: ignore[misc]


def test_a_saved_spiel_result_loads_back(tmp_path: Path) -> None:
    model, base, batch = _mlp()
    delta, log = spiel(model, base, [batch] * 6, density=0.25, targets="all-linear", steps=6,
                       lr=0.01, generator=torch.Generator().manual_seed(0), loss=_mse,
                       regrowth="ma", update_every=2, accumulate_steps=1, progress=False)
    assert sum(m["regrown"] for m in log) > 0
    spdelta.save_delta(delta, tmp_path / "d.st")
    back = spdelta.load_delta(tmp_path / "d.st")
    assert sorted(back) == sorted(delta)
    for n in delta:
        assert torch.equal(back[n].indices, delta[n].indices)
        assert torch.equal(back[n].values, delta[n].values)
        assert back[n].shape == delta[n].shape
    record = json.loads(back.metadata["spdelta.training"])
    assert record == json.loads(delta.metadata["spdelta.training"])
    assert record["method"] == "spiel" and record["regrowth"] == "ma"
    assert record["update_every"] == 2 and record["steps"] == 6
