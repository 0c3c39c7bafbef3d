"""Tests for spdelta.train.speft and the generic training loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from spdelta import apply_delta
from spdelta.errors import SpdeltaError
from spdelta.salience import score
from spdelta.select import budgets, select_topk
from spdelta.train import speft

MLP_TARGETS = ["lin0", "lin1"]


def mlp_loss(out: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return (out - torch.sin(batch["input"][:, :2])).pow(2).mean()


def mlp_batches() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [{"input": torch.randn(4, 10, generator=gen, dtype=torch.float64)} for _ in range(3)]


def llama_loss(model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> float:
    with torch.no_grad():
        return float(functional_call(model, params, args=(), kwargs=batch).loss)


def test_full_mask_equals_dense_adamw(tiny_mlp: nn.Module) -> None:
    steps, lr, batches = 6, 1e-2, mlp_batches()
    base = {k: v.detach().clone() for k, v in tiny_mlp.named_parameters()}
    delta, history = speft(tiny_mlp, base, batches, density=1.0, targets=MLP_TARGETS,
                           steps=steps, lr=lr, loss=mlp_loss, progress=False)
    dense = copy.deepcopy(tiny_mlp)
    weights = [dense.lin0.weight, dense.lin1.weight]
    opt = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = mlp_loss(dense(**batches[i % 3]), batches[i % 3])
        loss.backward()
        dense.lin0.bias.grad = dense.lin1.bias.grad = None  # only the targets train
        opt.step()
        losses.append(float(loss.detach()))
    trained = apply_delta(base, delta)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(trained[name], p.detach(), rtol=1e-10, atol=1e-12)
    assert [h["loss"] for h in history] == pytest.approx(losses, rel=1e-10)
    assert delta.nnz == delta.numel == 10 * 20 + 20 * 2


def test_outside_mask_never_changes(tiny_mlp: nn.Module) -> None:
    batches = mlp_batches()
    base = {k: v.detach().clone() for k, v in tiny_mlp.named_parameters()}
    delta, _ = speft(tiny_mlp, base, batches, density=0.1, targets=MLP_TARGETS, steps=5, lr=1e-2,
                     loss=mlp_loss, calibration_examples=8, progress=False)
    scores = score(tiny_mlp, base, batches, metric="gradient", targets=MLP_TARGETS,
                   num_examples=8, loss=mlp_loss, progress=False)
    support = select_topk(scores, density=0.1)
    assert delta.nnz == 24 and all(torch.equal(delta[n].indices, support[n]) for n in support)
    trained = apply_delta(base, delta)
    for name, w in base.items():
        changed = torch.nonzero((trained[name] != w).reshape(-1)).reshape(-1)
        allowed = delta[name].indices if name in delta else torch.zeros(0, dtype=torch.long)
        assert bool(torch.isin(changed, allowed).all()), name
    assert any(bool((trained[n] != base[n]).any()) for n in delta)


def test_speft_memorises_a_batch(tiny_llama: nn.Module, token_batch: dict[str, Tensor]) -> None:
    base = dict(tiny_llama.named_parameters())
    params = {k: v.detach() for k, v in base.items()}
    before = llama_loss(tiny_llama, params, token_batch)
    delta, history = speft(tiny_llama, base, [token_batch], density=0.1, steps=15, lr=0.1,
                           progress=False)
    after = llama_loss(tiny_llama, apply_delta(params, delta), token_batch)
    assert after < 0.85 * before and after < history[-1]["loss"] < history[0]["loss"]
    assert history[0]["loss"] == pytest.approx(before)
    shapes = {n: tuple(base[n].shape) for n in delta}
    assert delta.nnz == budgets(shapes, density=0.1)[""]
    record = json.loads(delta.metadata["spdelta.training"])
    assert record["method"] == "speft" and record["metric"] == "gradient"
    assert record["density"] == 0.1 and record["targets"] == "all-linear"
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_delta_saves_with_training_record(tiny_mlp: nn.Module, tmp_path: Path) -> None:
    fmt = pytest.importorskip("spdelta.format")
    base = dict(tiny_mlp.named_parameters())
    delta, _ = speft(tiny_mlp, base, mlp_batches(), density=0.2, targets=MLP_TARGETS, steps=2,
                     lr=1e-2, loss=mlp_loss, progress=False)
    path = tmp_path / "speft.safetensors"
    fmt.save_delta(delta, path)
    loaded = fmt.load_delta(path)
    assert loaded == delta
    assert json.loads(loaded.metadata["spdelta.training"])["method"] == "speft"


def test_lora_rank_budget(tiny_llama: nn.Module, token_batch: dict[str, Tensor]) -> None:
    base = dict(tiny_llama.named_parameters())
    delta, _ = speft(tiny_llama, base, [token_batch], lora_rank=2, targets=["q_proj", "v_proj"],
                     steps=1, lr=1e-3, scope="per_tensor", progress=False)
    # q_proj: 32x32, v_proj: 16x32 (2 KV heads of 8), two layers
    assert {n: e.nnz for n, e in delta.items()} == {
        f"model.layers.{i}.self_attn.{p}.weight": 2 * (r + 32)
        for i in range(2) for p, r in (("q_proj", 32), ("v_proj", 16))}


def test_dynamic_reselects_and_sums_phases(tiny_llama: nn.Module,
                                           token_batch: dict[str, Tensor]) -> None:
    base = {k: v.detach() for k, v in tiny_llama.named_parameters()}
    before = llama_loss(tiny_llama, base, token_batch)
    kw = {"density": 0.02, "lr": 1e-2, "progress": False}
    delta, history = speft(tiny_llama, base, [token_batch], steps=5, dynamic_every=3, **kw)
    assert [h["phase"] for h in history] == [0.0] * 3 + [1.0] * 2
    assert [h["step"] for h in history] == [float(i) for i in range(1, 6)]
    first, _ = speft(tiny_llama, base, [token_batch], steps=3, **kw)
    merged = apply_delta(base, first)  # phase 2 trains from here, re-scored
    second, _ = speft(tiny_llama, merged, [token_batch], steps=2, **kw)
    total = apply_delta(merged, second)
    for name in delta:
        torch.testing.assert_close(apply_delta(base, delta)[name], total[name], rtol=0, atol=1e-12)
    assert delta.nnz >= first.nnz
    assert llama_loss(tiny_llama, apply_delta(base, delta), token_batch) < before
    assert json.loads(delta.metadata["spdelta.training"])["dynamic_every"] == 3


def test_errors(tiny_mlp: nn.Module) -> None:
    base = dict(tiny_mlp.named_parameters())
    with pytest.raises(SpdeltaError, match="exactly one of density, lora_rank"):
        speft(tiny_mlp, base, mlp_batches(), density=0.1, lora_rank=1, steps=1, lr=0.1,
              loss=mlp_loss, progress=False)
    with pytest.raises(SpdeltaError, match="dynamic_every"):
        speft(tiny_mlp, base, mlp_batches(), density=0.1, steps=1, lr=0.1, dynamic_every=0,
              loss=mlp_loss, progress=False)
    with pytest.raises(SpdeltaError, match="no batch"):
        speft(tiny_mlp, base, iter(mlp_batches()), density=0.1, steps=50, lr=0.1,
              loss=mlp_loss, targets=MLP_TARGETS, progress=False)
