"""NF4 base weights (qSpIEL): losses match the dequantised base; SpIEL trains on it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import grad_and_value

from spdelta import make_loss_fn
from spdelta.errors import KeyMismatchError, ShapeError
from spdelta.quant import dequantize_base, is_nf4, nbytes, to_nf4
from spdelta.targets import resolve_targets
from spdelta.train.spiel import random_support, spiel

pytest.importorskip("torchao")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_on_nf4_matches_dequantised_base(tiny_llama: torch.nn.Module,
                                              token_batch: dict) -> None:
    base = dict(tiny_llama.named_parameters())
    targets = resolve_targets(tiny_llama, "all-linear")
    q = to_nf4(base, targets)
    assert all(is_nf4(q[n]) for n in targets) and not is_nf4(q["model.norm.weight"])
    dense = dequantize_base(q)
    support = random_support({n: base[n].shape for n in targets}, density=0.05,
                             generator=torch.Generator().manual_seed(0))
    values = {n: torch.full((s.numel(),), 0.01, dtype=torch.float64) for n, s in support.items()}
    fn = make_loss_fn(tiny_llama, impl="reference")
    g_q, loss_q = grad_and_value(lambda v: fn(v, q, support, token_batch))(values)
    g_d, loss_d = grad_and_value(lambda v: fn(v, dense, support, token_batch))(values)
    torch.testing.assert_close(loss_q, loss_d, rtol=0, atol=1e-12)
    for n in targets:
        torch.testing.assert_close(g_q[n], g_d[n], rtol=0, atol=1e-12)
    # Quantisation changes the model, but not by much.
    loss_full = fn(values, base, support, token_batch)
    assert 0 < abs(loss_q.item() - loss_full.item()) < 0.5


@pytest.mark.parametrize("func", [True, False])
def test_fast_path_on_nf4_equals_reference(tiny_llama: torch.nn.Module, token_batch: dict,
                                           monkeypatch: pytest.MonkeyPatch, func: bool) -> None:
    """NF4 linears take the fast kernel (no dense merged W) and match the reference merge."""
    from spdelta.functional import eager_grad_and_value
    from spdelta.kernels import sparse_delta_linear
    from spdelta.route import _linear as _route

    calls = []

    def counting(*args: torch.Tensor | None, **kwargs: bool) -> torch.Tensor:
        calls.append(is_nf4(args[1]))
        return sparse_delta_linear(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_route, "sparse_delta_linear", counting)
    base = dict(tiny_llama.named_parameters())
    targets = resolve_targets(tiny_llama, "all-linear")
    q = to_nf4(base, targets)
    support = random_support({n: base[n].shape for n in targets}, density=0.05,
                             generator=torch.Generator().manual_seed(0))
    values = {n: torch.full((s.numel(),), 0.01, dtype=torch.float64) for n, s in support.items()}
    out = {}
    for impl in ("fast", "reference"):
        fn = make_loss_fn(tiny_llama, impl=impl)  # type: ignore[arg-type]
        transform = grad_and_value if func else eager_grad_and_value
        out[impl] = transform(lambda v: fn(v, q, support, token_batch))(values)  # noqa: B023
    (g_fast, l_fast), (g_ref, l_ref) = out["fast"], out["reference"]
    # The dequantised weights are identical both ways; only the summation order differs.
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-12, atol=0)
    for n in targets:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-10, atol=1e-12, msg=n)
    block_linears = [n for n in targets if "layers." in n]
    assert calls.count(True) == len(block_linears) and all(calls)


def test_nf4_base_is_about_half_a_byte_per_parameter(tiny_llama: torch.nn.Module) -> None:
    # A float32 base (the usual case); each NF4 tensor also holds a 16-entry code table and
    # a scale mean in the base dtype, a fixed cost that tiny tensors feel most.
    base = {n: p.detach().float() for n, p in tiny_llama.named_parameters()}
    targets = resolve_targets(tiny_llama, "all-linear")
    q = to_nf4(base, targets)
    per_param = nbytes({n: q[n] for n in targets}) / sum(base[n].numel() for n in targets)
    assert 0.5 <= per_param <= 0.6, per_param
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    big = to_nf4({"w": w}, ["w"])
    assert 0.5 <= nbytes(big) / w.numel() <= 0.52
    # 16 levels over each block's absmax: the error is a fraction of the block scale.
    err = (dequantize_base(big)["w"] - w).abs().max()
    assert 0 < err < 0.25 * w.abs().max()


def test_to_nf4_errors() -> None:
    with pytest.raises(KeyMismatchError, match="'x'"):
        to_nf4({"w": torch.zeros(64)}, ["x"])
    with pytest.raises(ShapeError, match="block_size=64"):
        to_nf4({"w": torch.zeros(10, 10)}, ["w"])


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_spiel_trains_on_an_nf4_base(tiny_llama: torch.nn.Module, token_batch: dict,
                                     regrowth: str) -> None:
    base = dict(tiny_llama.named_parameters())
    targets = resolve_targets(tiny_llama, ["q_proj", "v_proj", "up_proj"])
    q = to_nf4(base, targets)
    delta, log = spiel(tiny_llama, q, itertools.repeat(token_batch), density=0.1, targets=targets,
                       steps=12, lr=0.02, regrowth=regrowth, update_every=4, accumulate_steps=2,
                       initial_fraction=0.3, generator=torch.Generator().manual_seed(0),
                       progress=False)
    assert log[-1]["loss"] < log[0]["loss"] - 0.05
    assert sum(m["regrown"] for m in log) > 0
    assert all(is_nf4(q[n]) for n in targets)  # the base stays 4-bit
    assert sorted(delta.keys()) == targets and delta[targets[0]].values.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dequantize_equals_torchao(dtype: torch.dtype) -> None:
    """The lean dequantisation is bit-identical to torchao's, across several code chunks."""
    from spdelta.quant import nf4 as nf4_mod

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(2), dtype=dtype)
    q = to_nf4({"w": w}, ["w"])["w"]
    chunk = nf4_mod._CHUNK
    try:
        nf4_mod._CHUNK = 100  # 2304 packed bytes: 24 chunks, the last one partial
        assert torch.equal(nf4_mod.nf4_to_dense(q), q.get_original_weight())
    finally:
        nf4_mod._CHUNK = chunk
    assert torch.equal(nf4_mod.nf4_to_dense(q), q.get_original_weight())
    assert torch.equal(nf4_mod.nf4_to_dense(q.t()), q.t().get_original_weight())
