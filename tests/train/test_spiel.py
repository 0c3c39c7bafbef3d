"""SpIEL: prune/regrow invariants, training on tiny_llama (AG and MA), exact resume."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import spdelta
from spdelta import make_loss_fn
from spdelta.dist import save_checkpoint
from spdelta.errors import ParameterError, SpdeltaError
from spdelta.functional import eager_grad_and_value
from spdelta.optim import AdamWState, SM3State, adamw, sm3
from spdelta.train import TrainState
from spdelta.train.spiel import (
    _dense_grads,
    load_state,
    make_spiel_step,
    prune_fraction,
    prune_regrow,
    random_support,
    save_state,
    spiel,
    spiel_init,
)

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=80, deadline=None)
@given(numel=st.integers(1, 40), data=st.data())
def test_prune_regrow_invariants(numel: int, data: st.DataObject) -> None:
    nnz = data.draw(st.integers(0, numel))
    fraction = data.draw(st.floats(0.0, 1.0))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    support = torch.sort(torch.randperm(numel, generator=gen)[:nnz]).values
    values = torch.randn(nnz, generator=gen, dtype=torch.float64).round(decimals=1)
    scores = torch.rand(numel, generator=gen, dtype=torch.float64).round(decimals=1)
    r = prune_regrow(support, values, scores, fraction=fraction)
    k = min(math.floor(fraction * nnz), numel - nnz)
    assert r.support.numel() == nnz and r.values.numel() == nnz
    assert bool((r.support[1:] > r.support[:-1]).all())
    assert int((~r.kept).sum()) == k and int(r.grown.sum()) == k
    # Survivors keep their values; regrown entries start at zero and were not in the support.
    assert torch.equal(r.values[~r.grown], values[r.kept])
    assert torch.equal(r.support[~r.grown], support[r.kept])
    assert bool((r.values[r.grown] == 0).all())
    assert not bool(torch.isin(r.support[r.grown], support).any())
    if 0 < k < nnz:  # pruned entries have the smallest |delta|
        assert values[~r.kept].abs().max() <= values[r.kept].abs().min()
    candidates = torch.ones(numel, dtype=torch.bool)
    candidates[support] = False
    candidates[r.support[r.grown]] = False
    if k > 0 and bool(candidates.any()):  # regrown have the largest candidate scores
        assert scores[r.support[r.grown]].min() >= scores[candidates].max()


def test_prune_regrow_example_and_errors() -> None:
    r = prune_regrow(torch.tensor([1, 4]), torch.tensor([0.1, -5.0]),
                     torch.tensor([3.0, 0.0, 7.0, 1.0, 9.0, 2.0]), fraction=0.5)
    assert r.support.tolist() == [2, 4] and r.values.tolist() == [0.0, -5.0]
    with pytest.raises(ParameterError, match="fraction"):
        prune_regrow(torch.tensor([0]), torch.ones(1), torch.ones(2), fraction=1.5)


def test_schedules_and_random_support() -> None:
    assert prune_fraction(0, 100) == pytest.approx(0.2)
    assert prune_fraction(100, 100) == 0.0
    assert prune_fraction(25, 100, schedule="cosine") == pytest.approx(0.1 * (1 + math.sqrt(0.5)))
    assert prune_fraction(75, 100, initial=0.4) == pytest.approx(0.1)
    with pytest.raises(ParameterError, match="schedule"):
        prune_fraction(0, 10, schedule="step")  # type: ignore[arg-type]
    s1 = random_support({"a": (10, 10), "b": (3,)}, density=0.1,
                        generator=torch.Generator().manual_seed(3))
    s2 = random_support({"b": (3,), "a": (10, 10)}, density=0.1,
                        generator=torch.Generator().manual_seed(3))
    assert [s1["a"].numel(), s1["b"].numel()] == [10, 0]
    assert all(torch.equal(s1[n], s2[n]) for n in s1)


def _setup(model: torch.nn.Module, regrowth: str, total: int, *, lr: float = 0.02):
    base = dict(model.named_parameters())
    names = sorted(n for n in base if any(f".{t}." in n for t in TARGETS))
    shapes = {n: tuple(base[n].shape) for n in names}
    support = random_support(shapes, density=0.1, generator=torch.Generator().manual_seed(0))
    values = {n: torch.zeros(s.numel(), dtype=torch.float64) for n, s in support.items()}
    opt = sm3(lr, support=support, shapes=shapes) if regrowth == "ma" else adamw(lr)
    step = make_spiel_step(make_loss_fn(model), base, opt, total_steps=total, regrowth=regrowth,
                           update_every=4, accumulate_steps=2, initial_fraction=0.3)
    return step, spiel_init(values, support, opt)


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_spiel_lowers_loss_and_keeps_invariants(tiny_llama: torch.nn.Module,
                                                token_batch: dict, regrowth: str) -> None:
    step, state = _setup(tiny_llama, regrowth, total=16)
    nnz = {n: s.numel() for n, s in state.support.items()}
    losses, regrown = [], 0.0
    for _ in range(16):
        before = state
        state, metrics = step(state, token_batch)
        losses.append(metrics["loss"])
        regrown += metrics["regrown"]
        if metrics["regrown"]:
            _check_regrowth(before, state, regrowth)
    assert losses[-1] < losses[0] - 0.05
    assert regrown > 0 and state.step == 16
    for n, s in state.support.items():
        assert s.numel() == nnz[n] and bool((s[1:] > s[:-1]).all())


def _check_regrowth(before, after, regrowth: str) -> None:
    """Survivors keep values and optimizer state; newcomers start at zero."""
    for n, new in after.support.items():
        old = before.support[n]
        survived = torch.isin(new, old)
        assert 0 < int((~survived).sum())
        assert bool((after.values[n][~survived] == 0).all())
        opt = after.opt_state
        if isinstance(opt, AdamWState):
            assert bool((opt.mu[n][~survived] == 0).all() and (opt.nu[n][~survived] == 0).all())
        else:
            assert isinstance(opt, SM3State) and torch.equal(opt.support[n], new)
    assert after.grad_acc == {}


def test_regrowth_step_matches_manual_prune_regrow(tiny_llama: torch.nn.Module,
                                                   token_batch: dict) -> None:
    step, state = _setup(tiny_llama, "ag", total=16)
    state, _ = step(state, token_batch)
    state, _ = step(state, token_batch)
    assert state.grad_acc == {}  # steps 3 and 4 form the AG window
    state, _ = step(state, token_batch)
    assert set(state.grad_acc) == set(state.support)
    after, metrics = step(state, token_batch)  # step 4: update, then prune/regrow
    assert metrics["fraction"] == pytest.approx(0.3 * (1 - 4 / 16))
    # Redo step 4 by hand: dense gradient, AdamW update on the support, prune_regrow.
    base = dict(tiny_llama.named_parameters())
    grads, g_dense, _ = _dense_grads(make_loss_fn(tiny_llama), state, base, token_batch)
    updates, _ = adamw(0.02).update(grads, state.opt_state, state.values)
    for n in state.support:
        r = prune_regrow(state.support[n], state.values[n] + updates[n],
                         (state.grad_acc[n] + g_dense[n]).abs(), fraction=metrics["fraction"])
        assert torch.equal(after.support[n], r.support)
        torch.testing.assert_close(after.values[n], r.values, rtol=0, atol=1e-15)


def _dense_grads_full_support(loss_fn, state, base, batch):
    """The previous AG-window pass: values zero-extended to the full tensor, one SDDMM."""
    full = {n: torch.arange(base[n].numel()) for n in state.support}
    dense = {n: v.new_zeros(full[n].numel()).index_put((state.support[n],), v)
             for n, v in state.values.items()}
    g_dense, loss = eager_grad_and_value(lambda v: loss_fn(v, base, full, batch))(dense)
    return {n: g[state.support[n]] for n, g in g_dense.items()}, g_dense, loss


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_ag_window_dense_grads_equal_full_support_path(tiny_llama: torch.nn.Module,
                                                      token_batch: dict, impl: str) -> None:
    step, state = _setup(tiny_llama, "ag", total=16)
    gen = torch.Generator().manual_seed(1)
    state = state._replace(values={n: 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                                   for n, v in state.values.items()})
    base = dict(tiny_llama.named_parameters())
    fn = make_loss_fn(tiny_llama, impl=impl)  # type: ignore[arg-type]
    got, want = (f(fn, state, base, token_batch) for f in (_dense_grads, _dense_grads_full_support))
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=0)
    for g, w in zip(got[:2], want[:2], strict=True):
        assert g.keys() == w.keys()
        for n in w:
            assert g[n].dtype == w[n].dtype == torch.float64
            torch.testing.assert_close(g[n], w[n], rtol=1e-10, atol=1e-13, msg=n)
    # A whole window step: same values and grad_acc as the old path, in float64.
    state = state._replace(step=2)  # step 3 is in the window of the regrowth at step 4
    after, _ = step(state, token_batch)
    grads, g_dense, _ = _dense_grads_full_support(make_loss_fn(tiny_llama), state, base,
                                                  token_batch)
    updates, _ = adamw(0.02).update(grads, state.opt_state, state.values)
    for n in state.support:
        torch.testing.assert_close(after.values[n], state.values[n] + updates[n],
                                   rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(after.grad_acc[n], g_dense[n], rtol=1e-10, atol=1e-13)


def test_ma_needs_sm3(tiny_llama: torch.nn.Module, token_batch: dict) -> None:
    base = dict(tiny_llama.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    state = spiel_init({name: torch.zeros(3, dtype=torch.float64)}, {name: torch.tensor([0, 1, 2])},
                       adamw(0.1))
    step = make_spiel_step(make_loss_fn(tiny_llama), base, adamw(0.1), total_steps=4,
                           regrowth="ma", update_every=1, accumulate_steps=1, initial_fraction=0.5)
    with pytest.raises(SpdeltaError, match="SM3"):
        step(state, token_batch)
    with pytest.raises(ParameterError, match="accumulate_steps"):
        make_spiel_step(make_loss_fn(tiny_llama), base, adamw(0.1), total_steps=4,
                        update_every=2, accumulate_steps=3)


class Interrupt(Exception):
    pass


def _interrupting(batch: dict, n: int):
    for _ in range(n):
        yield batch
    raise Interrupt


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_resume_is_bit_identical(tiny_llama: torch.nn.Module, token_batch: dict, tmp_path,
                                 regrowth: str) -> None:
    kw = dict(density=0.05, targets=TARGETS, steps=10, lr=0.01, regrowth=regrowth,
              update_every=3, accumulate_steps=2, progress=False)
    base = dict(tiny_llama.named_parameters())
    full, log_full = spiel(tiny_llama, base, itertools.repeat(token_batch),
                           generator=torch.Generator().manual_seed(5), **kw)
    path = str(tmp_path / "state.pt")
    with pytest.raises(Interrupt):  # killed during step 7; the checkpoint holds step 5
        spiel(tiny_llama, base, _interrupting(token_batch, 6),
              generator=torch.Generator().manual_seed(5), checkpoint=path, checkpoint_every=5, **kw)
    saved = load_state(path)
    assert saved.step == 5 and bool(saved.grad_acc) == (regrowth == "ag")  # mid AG window
    resumed, log = spiel(tiny_llama, base, itertools.repeat(token_batch),
                         generator=torch.Generator().manual_seed(99), checkpoint=path, **kw)
    assert resumed == full and len(log) == 5
    assert [m["loss"] for m in log] == [m["loss"] for m in log_full[5:]]
    final = load_state(path)
    assert final.step == 10 and torch.equal(final.rng_state, load_state(path).rng_state)


@pytest.mark.parametrize(("schedule", "warmup"), [("cosine", 8), ("linear", 0.3)])
def test_resume_mid_warmup_and_mid_decay_is_bit_identical(
        tiny_llama: torch.nn.Module, token_batch: dict, tmp_path, schedule: str,
        warmup: float) -> None:
    """Stopped at step 5 of 10: inside an 8-step warmup, or 2 steps into the decay (3 warm)."""
    kw = dict(density=0.05, targets=TARGETS, steps=10, lr=0.01, lr_schedule=schedule,
              warmup=warmup, max_grad_norm=0.5, update_every=3, accumulate_steps=2,
              progress=False)
    base = dict(tiny_llama.named_parameters())
    full, log_full = spiel(tiny_llama, base, itertools.repeat(token_batch),
                           generator=torch.Generator().manual_seed(5), **kw)
    path = str(tmp_path / "state.pt")
    with pytest.raises(Interrupt):
        spiel(tiny_llama, base, _interrupting(token_batch, 6),
              generator=torch.Generator().manual_seed(5), checkpoint=path, checkpoint_every=5, **kw)
    assert load_state(path).opt_state[1].num_updates == 5  # (clip state, AdamW state)
    resumed, log = spiel(tiny_llama, base, itertools.repeat(token_batch),
                         generator=torch.Generator().manual_seed(99), checkpoint=path, **kw)
    assert resumed == full
    assert [m["loss"] for m in log] == [m["loss"] for m in log_full[5:]]
    # A different schedule diverges: the schedule really is in effect.
    other, _ = spiel(tiny_llama, base, itertools.repeat(token_batch),
                     generator=torch.Generator().manual_seed(5), **{**kw, "warmup": 0})
    assert other != full
    record = json.loads(full.metadata["spdelta.training"])
    assert record["lr_schedule"] == schedule and record["warmup"] == warmup
    spdelta.save_delta(full, tmp_path / "d.st")  # the metadata is valid (spec V4)


def test_save_load_roundtrip_and_bad_file(tmp_path) -> None:
    opt = sm3(0.1, support={"w": torch.tensor([1])}, shapes={"w": (2, 2)}, momentum=0.5)
    state = spiel_init({"w": torch.ones(1)}, {"w": torch.tensor([1])}, opt,
                       generator=torch.Generator().manual_seed(0))
    path = tmp_path / "s.pt"
    save_state(state, path)
    back = load_state(path)
    assert isinstance(back.opt_state, SM3State) and back.opt_state.momentum["w"].tolist() == [0.0]
    assert torch.equal(back.rng_state, state.rng_state)
    save_file({"x": torch.ones(1)}, str(tmp_path / "x.st"), metadata={"format": "pt"})
    with pytest.raises(SpdeltaError, match="not a spdelta training state"):
        load_state(tmp_path / "x.st")
    save_checkpoint(TrainState({"w": torch.ones(1)}, None, 0), tmp_path / "ck")
    for where in (tmp_path / "ck", tmp_path / "ck" / "state.safetensors"):  # one format
        assert load_state(where) == TrainState({"w": torch.ones(1)}, None, 0)
    model = torch.nn.Linear(2, 1, bias=False)
    with pytest.raises(SpdeltaError, match="holds a TrainState, not the SpielState"):
        spiel(model, dict(model.named_parameters()), [{"input": torch.ones(1, 2)}],
              density=0.5, targets="all-linear", steps=1, generator=torch.Generator(),
              loss=lambda out, b: out.sum(), progress=False,
              checkpoint=str(tmp_path / "ck" / "state.safetensors"))
    for junk in (b"not a state file", b""):
        (tmp_path / "y.pt").write_bytes(junk)
        with pytest.raises(SpdeltaError, match="readable"):
            load_state(tmp_path / "y.pt")
