"""Hot-swap: activate merges a delta like apply_to_model; deactivate restores every bit."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from spdelta import SparseDelta
from spdelta.hf import apply_to_model
from spdelta.serve import DeltaModel, ServeError

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's raw bits (so -0.0 and 0.0, or two NaN payloads, differ)."""
    return {n: p.detach().view(BITS[p.dtype]).clone() for n, p in model.named_parameters()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activate_equals_apply_and_deactivate_restores_bits(
        make_llama: Callable[..., nn.Module], make_delta: Callable[..., SparseDelta],
        dtype: torch.dtype) -> None:
    model = make_llama(dtype)
    da = make_delta(model, seed=1)
    with torch.no_grad():  # negative zeros under the deltas: a subtracting undo loses their sign
        for n, p in model.named_parameters():
            if n in da:
                p.view(-1)[da[n].indices[::3]] = -0.0
    da, db = make_delta(model, seed=1), make_delta(model, seed=2)  # same supports, new fingerprint
    before = bits(model)
    dm = DeltaModel(model, {"a": da, "b": db})
    for _ in range(2):  # round trips, switching directly between deltas
        for name, d in (("a", da), ("b", db), ("a", da)):
            dm.activate(name)
            assert dm.active == name
            assert same_bits(bits(model), bits(apply_to_model(copy.deepcopy(model0(before, model)),
                                                              d)))
        dm.deactivate()
        assert dm.active is None and same_bits(bits(model), before)


def model0(before: dict[str, torch.Tensor], like: nn.Module) -> nn.Module:
    """A copy of ``like`` holding the weights whose bits are ``before``."""
    out = copy.deepcopy(like)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.view(BITS[p.dtype]).copy_(before[n])
    return out


class _Allocations(TorchDispatchMode):
    """Counts elements of every tensor an op allocates (outputs that alias no input)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        ins = {_storage(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in ins:
                self.elements += t.numel()
                self.largest = max(self.largest, t.numel())
        return out


def _storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (a sparse matrix has none of its own: its id)."""
    return id(t) if t.layout != torch.strided else t.untyped_storage().data_ptr()


def test_swap_work_is_proportional_to_nnz(make_llama: Callable[..., nn.Module],
                                          make_delta: Callable[..., SparseDelta]) -> None:
    model = make_llama(intermediate_size=1024)  # weights much larger than the delta
    d = make_delta(model, seed=1, density=0.01)
    dm = DeltaModel(model, {"a": d})
    biggest = max(max(e.nnz, e.shape[0] + 1) for _, e in d.items())
    rows = sum(model.get_parameter(n).shape[0] + 1 for n in d.keys())
    with _Allocations() as mode:
        dm.activate("a")
        dm.deactivate()
    # A few nnz-sized buffers and row pointers per layer; never a weight-sized copy.
    assert mode.elements <= 12 * d.nnz + 4 * rows
    assert mode.largest <= biggest  # no buffer larger than one tensor's nnz or row pointers


def test_activate_is_refused_during_a_per_row_call_and_the_reverse(
        llama: nn.Module, make_delta: Callable[..., SparseDelta]) -> None:
    dm = DeltaModel(llama, {"a": make_delta(llama, seed=1)})
    with dm.use(["a"]), pytest.raises(ServeError, match="while DeltaModel.use is open"):
        dm.activate("a")
    dm.activate("a")
    with pytest.raises(ServeError, match="deactivate\\(\\) before serving deltas per row"):
        dm(torch.ones(1, 3, dtype=torch.long), deltas=["a"])
    with pytest.raises(ServeError, match="deactivate\\(\\) before loading more"):
        dm.add({"b": make_delta(llama, seed=2)})


def test_remove_and_close_restore_the_base(llama: nn.Module,
                                           make_delta: Callable[..., SparseDelta]) -> None:
    before = bits(llama)
    dm = DeltaModel(llama, {"a": make_delta(llama, seed=1), "b": make_delta(llama, seed=2)})
    dm.activate("a")
    dm.remove("a")
    assert dm.names == ["b"] and dm.active is None and same_bits(bits(llama), before)
    dm.activate("b")
    dm.close()
    assert same_bits(bits(llama), before) and not llama._forward_hooks
    assert all(not m._forward_hooks for m in llama.modules())


def test_nf4_weights_cannot_be_activated(llama: nn.Module,
                                         make_delta: Callable[..., SparseDelta]) -> None:
    pytest.importorskip("torchao", reason="NF4 needs torchao")
    from spdelta.serve import quantize_nf4

    dm = DeltaModel(llama, {"a": make_delta(llama, seed=1)})
    quantize_nf4(llama)
    with pytest.raises(ServeError, match="cannot merge into NF4 weights"):
        dm.activate("a")
    assert dm.active is None


def test_activate_after_the_deltas_change_merges_the_current_delta(
        make_llama: Callable[..., nn.Module], make_delta: Callable[..., SparseDelta]) -> None:
    model = make_llama()
    da, db, dc = (make_delta(model, seed=s) for s in (1, 2, 3))
    before = bits(model)
    dm = DeltaModel(model, {"a": da, "b": db})
    dm.activate("b")  # remembers b's positions in the weights
    dm.deactivate()
    dm.remove("b")
    dm.add({"b": dc})  # a new delta under the old name: nothing of the old one may be reused
    for name, d in (("b", dc), ("a", da)):
        dm.activate(name)
        assert same_bits(bits(model), bits(apply_to_model(model0(before, model), d)))
    dm.deactivate()
    assert same_bits(bits(model), before)
