"""Per-row deltas on bf16, fp64, NF4 and GPT-2 ``Conv1D`` bases, against dense references."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from spdelta import SparseDelta
from spdelta.hf import apply_to_model
from spdelta.serve import DeltaModel

from .test_mixed import left_padded
from .test_swap import bits, same_bits

ROWS = ["a", None, "b", "b"]


def delta_on(weight: torch.Tensor, name: str, seed: int) -> SparseDelta:
    gen = torch.Generator().manual_seed(seed)
    k = weight.numel() // 10
    idx = torch.randperm(weight.numel(), generator=gen)[:k].sort().values
    return SparseDelta({name: (tuple(weight.shape), idx, torch.randn(k, generator=gen))})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_linear_layer_against_float64(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 40).to(dtype).requires_grad_(False)
    deltas = {"a": delta_on(lin.weight, "weight", 1), "b": delta_on(lin.weight, "weight", 2)}
    x = torch.randn(4, 5, 48).to(dtype)
    with torch.no_grad():
        got = DeltaModel(lin, deltas)(x, deltas=ROWS)
    for b, name in enumerate(ROWS):
        w = lin.weight.double() + (deltas[name].to_dense("weight").double() if name else 0)
        want = x[b].double() @ w.T + lin.bias.double()
        tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(got[b].double(), want, rtol=tol,
                                   atol=tol * float(want.abs().max()))
        assert got.dtype == dtype


def test_bf16_llama_rows_agree_with_merged_bf16_models(
        make_llama: Callable[..., nn.Module], make_delta: Callable[..., SparseDelta]) -> None:
    model = make_llama(torch.bfloat16)
    deltas = {"a": make_delta(model, seed=1), "b": make_delta(model, seed=2)}
    ids, mask = left_padded([6, 4, 6, 3])
    with torch.no_grad():
        got = DeltaModel(model, deltas)(ids, attention_mask=mask, deltas=ROWS).logits.float()
        for b, name in enumerate(ROWS):
            ref = apply_to_model(copy.deepcopy(model), deltas[name]) if name else model
            want = ref(ids, attention_mask=mask).logits.float()[b, mask[b].bool()]
            # bf16 rounds W + D (merged) and x W^T + x D^T (per row) differently: 1-2 % apart.
            torch.testing.assert_close(got[b, mask[b].bool()], want, rtol=0.05,
                                       atol=0.05 * float(want.abs().max()))


def test_nf4_base_stays_4bit_and_matches_its_dequantised_merge(
        llama: nn.Module, make_delta: Callable[..., SparseDelta]) -> None:
    pytest.importorskip("torchao", reason="NF4 needs torchao")
    from spdelta.quant import is_nf4, nf4_to_dense
    from spdelta.serve import quantize_nf4

    deltas = {"a": make_delta(llama, seed=1), "b": make_delta(llama, seed=2)}
    dense = copy.deepcopy(llama)  # will hold the dequantised NF4 weights (the reference)
    dm = DeltaModel(llama, deltas)  # checked against the dense base, then quantised
    names = quantize_nf4(llama)
    assert len(names) == 14 and "lm_head.weight" not in names
    with torch.no_grad():
        for n in names:
            dense.get_parameter(n).copy_(nf4_to_dense(llama.get_parameter(n)))
    ids, mask = left_padded([6, 4, 6, 3])
    with torch.no_grad():
        got = dm(ids, attention_mask=mask, deltas=ROWS).logits
        for b, name in enumerate(ROWS):
            ref = apply_to_model(copy.deepcopy(dense), deltas[name], check_base=False) \
                if name else dense
            want = ref(ids, attention_mask=mask).logits[b, mask[b].bool()]
            torch.testing.assert_close(got[b, mask[b].bool()], want, rtol=1e-5, atol=1e-5)
    assert all(is_nf4(llama.get_parameter(n)) for n in names)


def test_gpt2_conv1d(make_delta: Callable[..., SparseDelta]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                       n_positions=64)).eval()
    deltas = {n: make_delta(model, seed=i, names=("c_attn", "c_fc", "c_proj"))
              for i, n in enumerate("ab")}
    assert any(".attn.c_attn." in n for n in deltas["a"].keys())
    ids = torch.randint(3, 64, (4, 7), generator=torch.Generator().manual_seed(0))
    before = bits(model)
    dm = DeltaModel(model, deltas)
    with torch.no_grad():
        got = dm(ids, deltas=ROWS).logits
        for b, name in enumerate(ROWS):
            ref = apply_to_model(copy.deepcopy(model), deltas[name]) if name else model
            torch.testing.assert_close(got[b], ref(ids).logits[b], rtol=1e-5, atol=1e-5)
    merged = bits(apply_to_model(copy.deepcopy(model), deltas["a"]))
    dm.activate("a")
    assert same_bits(bits(model), merged)
    dm.deactivate()
    assert same_bits(bits(model), before)
