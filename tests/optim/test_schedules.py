"""Learning-rate schedules against their closed forms, transformers' schedules and torch AdamW."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.errors import ParameterError
from spdelta.optim import (
    adamw,
    apply_updates,
    cosine_decay_schedule,
    linear_schedule,
    resolve_warmup,
    sm3,
    warmup_schedule,
)
from spdelta.train import TrainState, load_state, save_state


def closed_form(kind: str, t: int, lr: float, total: int, w: int) -> float:
    """The Hugging Face ``get_*_schedule_with_warmup`` multiplier times ``lr``, written out."""
    if t < w:
        return lr * t / w
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr * max(0.0, (total - t) / max(1, total - w))
    progress = min(1.0, (t - w) / max(1, total - w))
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["constant", "linear", "cosine"]),
       lr=st.floats(1e-6, 1.0), total=st.integers(1, 500), data=st.data())
def test_warmup_schedule_is_the_closed_form(kind: str, lr: float, total: int,
                                            data: st.DataObject) -> None:
    warmup = data.draw(st.one_of(st.integers(0, total), st.floats(0.0, 0.999)))
    w = resolve_warmup(warmup, total)
    assert w == (math.ceil(warmup * total) if isinstance(warmup, float) else warmup)
    s = warmup_schedule(kind, lr=lr, total_steps=total, warmup=warmup)
    # The run's steps are 0 .. total - 1 (past the end, HF's cosine rises again; ours stays 0).
    for t in {0, 1, w - 1, w, w + 1, total // 2, total - 1} | set(range(0, total, 7)):
        if 0 <= t < total:
            assert s(t) == pytest.approx(closed_form(kind, t, lr, total, w), rel=1e-12, abs=1e-15)
            assert 0.0 <= s(t) <= lr * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(a=st.floats(-10, 10), b=st.floats(-10, 10), n=st.integers(0, 50), begin=st.integers(0, 20),
       t=st.integers(0, 100))
def test_linear_schedule_is_the_closed_form(a: float, b: float, n: int, begin: int, t: int) -> None:
    want = a if n == 0 else a + (b - a) * min(max((t - begin) / n, 0.0), 1.0)
    assert linear_schedule(a, b, n, begin)(t) == pytest.approx(want, rel=1e-12, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(v=st.floats(0, 10), n=st.integers(1, 50), alpha=st.floats(0, 1), t=st.integers(0, 100))
def test_cosine_decay_is_the_closed_form(v: float, n: int, alpha: float, t: int) -> None:
    frac = min(t, n) / n
    want = v * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)
    assert cosine_decay_schedule(v, n, alpha)(t) == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_matches_transformers_schedules(kind: str) -> None:
    """The Hugging Face Trainer's schedules (``LambdaLR``) give the same rate at every step."""
    transformers = pytest.importorskip("transformers")
    make = {"constant": transformers.get_constant_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}[kind]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    kwargs = {} if kind == "constant" else {"num_training_steps": 40}
    sched = make(opt, num_warmup_steps=7, **kwargs)
    ours = warmup_schedule(kind, lr=3e-4, total_steps=40, warmup=7)
    for t in range(40):
        assert opt.param_groups[0]["lr"] == pytest.approx(ours(t), rel=1e-12, abs=1e-18), t
        opt.step()
        sched.step()


def test_adamw_with_a_schedule_matches_torch_with_lambdalr() -> None:
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(50, generator=gen, dtype=torch.float64)}
    dense = torch.nn.Parameter(params["a"].clone())
    schedule = warmup_schedule("cosine", lr=1e-2, total_steps=9, warmup=3)
    ref = torch.optim.AdamW([dense], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda t: schedule(t) / 1e-2)
    opt = adamw(schedule, weight_decay=0.1)
    values, state = params, opt.init(params)
    for _ in range(9):
        g = torch.randn(50, generator=gen, dtype=torch.float64)
        updates, state = opt.update({"a": g}, state, values)
        values = apply_updates(values, updates)
        dense.grad = g.clone()
        ref.step()
        sched.step()
        torch.testing.assert_close(values["a"], dense.detach(), rtol=1e-12, atol=1e-15)
    assert state.num_updates == 9


def test_float_lr_and_constant_schedule_are_bit_identical() -> None:
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(20, generator=gen)}
    grads = [{"w": torch.randn(20, generator=gen)} for _ in range(4)]
    out = []
    for opt in (adamw(1e-2, weight_decay=0.1),
                adamw(warmup_schedule("constant", lr=1e-2, total_steps=4), weight_decay=0.1),
                sm3(1e-2, support={"w": torch.arange(20)}, shapes={"w": (4, 5)}),
                sm3(lambda t: 1e-2, support={"w": torch.arange(20)}, shapes={"w": (4, 5)})):
        values, state = params, opt.init(params)
        for g in grads:
            updates, state = opt.update(g, state, values)
            values = apply_updates(values, updates)
        out.append(values["w"])
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])


def test_sm3_follows_the_schedule_by_its_step_count() -> None:
    schedule = linear_schedule(0.0, 1.0, 2)  # 0, 0.5, 1, 1, ...
    opt = sm3(schedule, support={"w": torch.tensor([0])}, shapes={"w": (1,)})
    values, state = {"w": torch.zeros(1, dtype=torch.float64)}, None
    state = opt.init(values)
    sizes = []
    for _ in range(3):
        updates, state = opt.update({"w": torch.ones(1, dtype=torch.float64)}, state, values)
        sizes.append(float(updates["w"].abs()))
    # SM3 step sizes are lr / sqrt(k) for k = 1, 2, 3 with a constant unit gradient.
    assert sizes == pytest.approx([0.0, 0.5 / math.sqrt(2), 1.0 / math.sqrt(3)])


def test_count_survives_a_state_file(tmp_path: Path) -> None:
    opt = adamw(1e-3)
    values = {"w": torch.zeros(3)}
    state = opt.init(values)
    for _ in range(5):
        _, state = opt.update({"w": torch.ones(3)}, state, values)
    save_state(TrainState(values, state, 5), tmp_path / "s.st")
    assert load_state(tmp_path / "s.st").opt_state.num_updates == 5


@pytest.mark.parametrize("bad", [
    lambda: warmup_schedule("step", lr=1e-3, total_steps=10),
    lambda: warmup_schedule("cosine", lr=-1.0, total_steps=10),
    lambda: warmup_schedule("cosine", lr=1e-3, total_steps=10, warmup=1.5),
    lambda: warmup_schedule("cosine", lr=1e-3, total_steps=10, warmup=-0.1),
    lambda: linear_schedule(0.0, 1.0, -1),
    lambda: cosine_decay_schedule(float("nan"), 3),
])
def test_bad_settings_raise(bad: object) -> None:
    with pytest.raises(ParameterError):
        bad()  # type: ignore[operator]
