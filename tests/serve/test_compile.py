"""Under torch.compile, switching deltas (activate / deactivate) recompiles nothing.

``activate`` writes into the weight tensors in place, so the compiled graph (which
takes the parameters as inputs) sees the new values without any guard failing. The
check fails on any recompilation: ``torch._dynamo.config.error_on_recompile`` raises,
and the graph count must stay at one. ``test_the_check_catches_a_recompiling_swap``
shows it does fail for a swap that rebinds the weights instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from spdelta import SparseDelta
from spdelta.hf import apply_to_model
from spdelta.serve import DeltaModel

SWITCHES = ["a", "b", None, "c", "a", None, "b"]
IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


def switch_under_compile(model: nn.Module, deltas: dict[str, SparseDelta],
                         backend: str) -> int:
    """Compile ``model``, switch through ``SWITCHES``; return the number of graphs compiled.

    Every compiled output is compared with the eager model with that delta merged.
    """
    refs = {n: apply_to_model(copy.deepcopy(model), d) for n, d in deltas.items()}
    refs[None] = copy.deepcopy(model)
    dm = DeltaModel(model, deltas)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled(IDS)
        for name in SWITCHES:
            if name is None:
                dm.deactivate()
            else:
                dm.activate(name)
            torch.testing.assert_close(compiled(IDS).logits, refs[name](IDS).logits,
                                       rtol=1e-5, atol=1e-5)
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture
def three(llama: nn.Module, make_delta: Callable[..., SparseDelta]) -> dict[str, SparseDelta]:
    return {n: make_delta(llama, seed=i + 1, density=0.05 * (i + 1)) for i, n in enumerate("abc")}


def test_switching_deltas_does_not_recompile(llama: nn.Module,
                                             three: dict[str, SparseDelta]) -> None:
    assert switch_under_compile(llama, three, "eager") == 1  # dynamo only: fast


@pytest.mark.slow  # inductor generates and builds C++ for the model (about a minute on a CPU)
def test_switching_deltas_does_not_recompile_inductor(llama: nn.Module,
                                                      three: dict[str, SparseDelta]) -> None:
    assert switch_under_compile(llama, three, "inductor") == 1


def test_the_check_catches_a_recompiling_swap(llama: nn.Module, three: dict[str, SparseDelta],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def rebinding_activate(self: DeltaModel, name: str) -> None:  # merged copies, new tensors
        self.deactivate()
        merged = apply_to_model(copy.deepcopy(self.model), three[name])
        for mod, new in zip(self.model.modules(), merged.modules(), strict=True):
            if isinstance(mod, nn.Linear):
                mod.weight = nn.Parameter(new.weight.detach(), requires_grad=False)

    monkeypatch.setattr(DeltaModel, "activate", rebinding_activate)
    monkeypatch.setattr(DeltaModel, "deactivate", lambda self: None)
    with pytest.raises(Exception, match="[Rr]ecompil"):
        switch_under_compile(llama, three, "eager")
