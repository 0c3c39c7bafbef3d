"""make_loss_fn(impl="fast") equals impl="reference" on the tiny Llama (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vmap

from spdelta import make_loss_fn
from spdelta.errors import KeyMismatchError, SpdeltaError
from spdelta.functional import add_at, eager_grad_and_value
from spdelta.kernels import sparse_delta_linear
from spdelta.route import LinearRouter, attach_delta, attached_deltas
from spdelta.route import _linear as _route

Problem = tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]


def _problem(model: nn.Module, density: float = 0.1) -> Problem:
    """Base, support and values on every linear weight of the blocks, lm_head and the embedding."""
    gen = torch.Generator().manual_seed(0)
    base = {k: v.detach() for k, v in model.named_parameters()}
    names = [n for n in base if n.endswith("proj.weight")] + ["lm_head.weight",
                                                            "model.embed_tokens.weight"]
    support = {}
    for n in (n for n in names if n in base):  # a tied lm_head is not in named_parameters
        k = max(1, int(density * base[n].numel()))
        support[n] = torch.randperm(base[n].numel(), generator=gen)[:k].sort().values
    values = {n: 0.1 * torch.randn(len(i), generator=gen, dtype=torch.float64)
              for n, i in support.items()}
    return base, support, values


def _assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


def test_fast_equals_reference_grad_and_value(tiny_llama: nn.Module, token_batch: dict[str, Tensor],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args: Tensor | None, **kwargs: bool) -> Tensor:
        calls.append(1)
        return sparse_delta_linear(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_route, "sparse_delta_linear", counting)
    base, support, values = _problem(tiny_llama)
    assert len(support) == 2 * 7 + 2
    assert set(LinearRouter(tiny_llama).names) >= {n for n in support if "proj" in n}
    fast, ref = make_loss_fn(tiny_llama), make_loss_fn(tiny_llama, impl="reference")
    (g_fast, l_fast) = grad_and_value(fast)(values, base, support, token_batch)
    (g_ref, l_ref) = grad_and_value(ref)(values, base, support, token_batch)
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-12, atol=0)
    _assert_same(g_fast, g_ref)
    assert len(calls) == 2 * 7 + 1  # every block linear and lm_head took the fast path


def test_fast_equals_reference_backward(tiny_llama: nn.Module,
                                        token_batch: dict[str, Tensor]) -> None:
    base, support, values = _problem(tiny_llama, density=0.05)
    grads = []
    for impl in ("fast", "reference"):
        leaves = {n: v.clone().requires_grad_() for n, v in values.items()}
        make_loss_fn(tiny_llama, impl=impl)(leaves, base, support, token_batch).backward()
        grads.append({n: v.grad for n, v in leaves.items()})
    _assert_same(*grads)  # type: ignore[arg-type]


def test_fast_equals_reference_per_example_vmap(tiny_llama: nn.Module,
                                                token_batch: dict[str, Tensor]) -> None:
    base, support, values = _problem(tiny_llama, density=0.05)

    def per_example(impl: str) -> dict[str, Tensor]:
        fn = make_loss_fn(tiny_llama, impl=impl)  # type: ignore[arg-type]
        one = lambda v, ids: fn(v, base, support, {"input_ids": ids[None], "labels": ids[None]})  # noqa: E731
        return vmap(grad(one), in_dims=(None, 0))(values, token_batch["input_ids"])

    _assert_same(per_example("fast"), per_example("reference"))


def test_tied_lm_head_is_merged_not_routed(tiny_llama: nn.Module,
                                           token_batch: dict[str, Tensor]) -> None:
    tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight  # tie
    assert "lm_head.weight" not in LinearRouter(tiny_llama).names
    base, support, values = _problem(tiny_llama)
    got = grad(make_loss_fn(tiny_llama))(values, base, support, token_batch)
    want = grad(make_loss_fn(tiny_llama, impl="reference"))(values, base, support, token_batch)
    _assert_same(got, want)


def test_forward_restored_even_on_error(tiny_mlp: nn.Module) -> None:
    fn = make_loss_fn(tiny_mlp, loss=lambda out, batch: out.sum())
    base = {k: v.detach() for k, v in tiny_mlp.named_parameters()}
    support = {"lin0.weight": torch.tensor([0, 3])}
    values = {"lin0.weight": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(RuntimeError):
        fn(values, base, support, {"input": torch.zeros(2, 3, dtype=torch.float64)})  # wrong width
    assert "forward" not in vars(tiny_mlp.lin0)
    fn(values, base, support, {"input": torch.zeros(2, 10, dtype=torch.float64)})
    assert "forward" not in vars(tiny_mlp.lin0)


def test_subclass_with_own_forward_is_not_routed() -> None:
    class Scaled(nn.Linear):
        def forward(self, input: Tensor) -> Tensor:  # noqa: A002
            return 2 * super().forward(input)

    model = nn.Sequential(nn.Linear(2, 2), Scaled(2, 2))
    assert LinearRouter(model).names == frozenset({"0.weight"})


def test_unknown_impl_is_rejected(tiny_mlp: nn.Module) -> None:
    with pytest.raises(SpdeltaError, match="impl must be"):
        make_loss_fn(tiny_mlp, impl="sparse")  # type: ignore[arg-type]


def test_eager_grad_and_value_equals_func(tiny_llama: nn.Module,
                                          token_batch: dict[str, Tensor]) -> None:
    base, support, values = _problem(tiny_llama, density=0.05)
    fn = make_loss_fn(tiny_llama)
    got, loss = eager_grad_and_value(fn)(values, base, support, token_batch)
    want, want_loss = grad_and_value(fn)(values, base, support, token_batch)
    torch.testing.assert_close(loss, want_loss)
    assert not loss.requires_grad
    _assert_same(got, want)


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(n_out, n_in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_attach_delta_equals_the_merged_layer_in_float64(kind: str) -> None:
    """An attached delta: output and values' gradient equal the dense merge, same module."""
    gen = torch.Generator().manual_seed(0)
    layer = (nn.Linear(5, 3) if kind == "linear" else _conv1d(5, 3)).double()
    support = torch.tensor([0, 4, 7, 14])
    attach_delta(layer, support)
    with torch.no_grad():
        layer.values.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    out = layer(x)
    out.square().sum().backward()
    values = layer.values.detach().clone().requires_grad_()
    merged = add_at(layer.weight.detach(), support, values)
    want = x @ merged + layer.bias if kind == "conv1d" else x @ merged.T + layer.bias
    want.square().sum().backward()
    _assert_same({"out": out}, {"out": want})
    _assert_same({"grad": layer.values.grad}, {"grad": values.grad})
    assert list(attached_deltas(nn.Sequential(layer))) == ["0.weight"]


def test_attach_delta_refuses_other_modules_and_a_second_delta() -> None:
    with pytest.raises(KeyMismatchError, match="Embedding"):
        attach_delta(nn.Embedding(3, 2), torch.tensor([0]))
    lin = nn.Linear(2, 2)
    attach_delta(lin, torch.tensor([0]))
    with pytest.raises(KeyMismatchError, match="without a delta"):
        attach_delta(lin, torch.tensor([1]))


def test_router_and_attached_delta_run_one_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a delta reaches a linear go through route's one routed forward."""
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return sparse_delta_linear(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_route, "sparse_delta_linear", counting)
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    fn = make_loss_fn(model, loss=lambda out, batch: out.sum())
    base = {"0.weight": torch.zeros(2, 2)}
    fn({"0.weight": torch.ones(1)}, base, {"0.weight": torch.tensor([1])},
       {"input": torch.ones(1, 2)})
    attach_delta(model[0], torch.tensor([1]))
    model(torch.ones(1, 2))
    assert len(calls) == 2
