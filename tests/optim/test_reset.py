"""Remapping optimizer state across a support change."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.errors import KeyMismatchError, SpdeltaError
from spdelta.optim import AdamWState, SM3State, adamw, apply_updates, chain, remap_state, sm3
from spdelta.optim.reset import locate, remap_values

sets = st.sets(st.integers(0, 60), max_size=25)


@settings(max_examples=60, deadline=None)
@given(old=sets, new=sets)
def test_remap_values_matches_dict_reference(old: set[int], new: set[int]) -> None:
    o, n = sorted(old), sorted(new)
    values = torch.arange(len(o), dtype=torch.float64) + 1.0
    ref = {i: float(v) for i, v in zip(o, values, strict=True)}
    got = remap_values(values, torch.tensor(o, dtype=torch.long), torch.tensor(n, dtype=torch.long))
    assert got.tolist() == [ref.get(i, 0.0) for i in n]
    pos, found = locate(torch.tensor(o, dtype=torch.long), torch.tensor(n, dtype=torch.long))
    assert found.tolist() == [i in old for i in n]


def test_adamw_survivors_keep_moments_newcomers_start_at_zero() -> None:
    old = {"w": torch.tensor([1, 4, 8]), "b": torch.tensor([0])}
    new = {"w": torch.tensor([2, 4, 9]), "b": torch.tensor([0])}
    opt = adamw(0.1)
    params = {"w": torch.ones(3), "b": torch.ones(1)}
    state = opt.init(params)
    _, state = opt.update({"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.ones(1)}, state, params)
    out = remap_state(state, old, new)
    assert out.steps["w"].tolist() == [0, 1, 0] and out.steps["b"].tolist() == [1]
    torch.testing.assert_close(out.mu["w"], torch.tensor([0.0, 0.2, 0.0]))
    torch.testing.assert_close(out.nu["w"], torch.tensor([0.0, 0.004, 0.0]))
    assert torch.equal(out.mu["b"], state.mu["b"])
    assert state.mu["w"].tolist() == pytest.approx([0.1, 0.2, 0.3])  # input untouched


def test_sm3_keeps_accumulators_and_remaps_momentum() -> None:
    support = {"w": torch.tensor([0, 5])}
    opt = sm3(0.1, support=support, shapes={"w": (2, 3)}, momentum=0.9)
    params = {"w": torch.zeros(2)}
    state = opt.init(params)
    _, state = opt.update({"w": torch.tensor([1.0, 2.0])}, state, params)
    new = {"w": torch.tensor([1, 5])}
    out = remap_state(state, support, new)
    assert isinstance(out, SM3State) and out.support["w"].tolist() == [1, 5]
    assert out.accumulators is state.accumulators
    assert out.momentum["w"].tolist() == pytest.approx([0.0, 0.1])
    # The next update reads the new support from the state.
    updates, nxt = opt.update({"w": torch.tensor([1.0, 1.0])}, out, params)
    assert nxt.accumulators["w"][1].tolist() == pytest.approx([1.0, 1.0, 5.0])
    assert torch.isfinite(apply_updates(params, updates)["w"]).all()


def test_chain_tuples_and_unknown_types() -> None:
    support = {"w": torch.tensor([0, 1])}
    opt = chain(adamw(0.1), sm3(0.1, support=support, shapes={"w": (4,)}))
    state = opt.init({"w": torch.ones(2)})
    out = remap_state(state, support, {"w": torch.tensor([1, 3])})
    assert isinstance(out[0], AdamWState) and isinstance(out[1], SM3State)
    assert remap_state(None, support, support) is None
    with pytest.raises(SpdeltaError, match="dict"):
        remap_state({"x": 1}, support, support)
    with pytest.raises(KeyMismatchError, match="'v'"):
        remap_state(state, support, {"v": torch.tensor([0])})


def test_regrown_entries_get_fresh_adam_bias_correction() -> None:
    """After a remap, survivors continue their own Adam run; a newcomer steps as a fresh one."""
    opt = adamw(0.1, weight_decay=0.01)
    old, new = {"w": torch.tensor([1, 4, 8])}, {"w": torch.tensor([2, 4, 9])}
    params = {"w": torch.tensor([0.5, -0.2, 0.3], dtype=torch.float64)}
    state = opt.init(params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
        updates, state = opt.update(g, state, params)
        params = apply_updates(params, updates)
    moved = remap_state(state, old, new)
    assert moved.steps["w"].tolist() == [0, 5, 0] and moved.steps["w"].dtype == torch.int32
    p_new = {"w": torch.tensor([0.0, float(params["w"][1]), 0.0], dtype=torch.float64)}
    g = {"w": torch.tensor([0.7, -1.3, -0.4], dtype=torch.float64)}
    updates, after = opt.update(g, moved, p_new)
    fresh, _ = opt.update({"w": g["w"][[0, 2]]}, opt.init({"w": p_new["w"][[0, 2]]}),
                          {"w": p_new["w"][[0, 2]]})
    torch.testing.assert_close(updates["w"][[0, 2]], fresh["w"], rtol=0, atol=0)
    first = torch.full((2,), 0.1, dtype=torch.float64)  # a fresh Adam's first step: lr
    torch.testing.assert_close(updates["w"][[0, 2]].abs(), first)
    cont, _ = opt.update({"w": g["w"][[1]]}, AdamWState({"w": state.steps["w"][[1]]},
                         {"w": state.mu["w"][[1]]}, {"w": state.nu["w"][[1]]}),
                         {"w": params["w"][[1]]})
    torch.testing.assert_close(updates["w"][[1]], cont["w"], rtol=0, atol=0)
    assert after.steps["w"].tolist() == [1, 6, 1]
