"""Every architecture of the matrix (conftest.py): fast path, targets, memory <-> disk, extract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad_and_value

from spdelta import SparseDelta, make_loss_fn
from spdelta.hf import apply_to_checkpoint, apply_to_model, extract_delta
from spdelta.hf.layout import CheckpointLayout
from spdelta.route import ExpertsRouter, LinearRouter
from spdelta.targets import left_out, resolve_targets
from spdelta.train import speft

pytestmark = pytest.mark.hf


def _support(base: dict[str, Tensor], names: list[str], density: float,
             seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(base[n].numel(), generator=gen)[:max(1, int(density *
            base[n].numel()))].sort().values for n in names}


def _load(archs: SimpleNamespace, name: str, path: Path) -> nn.Module:
    import transformers

    return getattr(transformers, archs.ARCHS[name][1]).from_pretrained(path).eval()


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_fast_path_equals_reference_in_float64(arch_name: str, archs: SimpleNamespace) -> None:
    model = archs.build(arch_name, torch.float64)
    base = {n: p.detach() for n, p in model.named_parameters()}
    names = resolve_targets(model, "all-linear")
    support = _support(base, names, 0.1)
    gen = torch.Generator().manual_seed(1)
    values = {n: 0.1 * torch.randn(i.numel(), generator=gen, dtype=torch.float64)
              for n, i in support.items()}
    batch = archs.batch(arch_name)
    g_fast, l_fast = grad_and_value(make_loss_fn(model))(values, base, support, batch)
    g_ref, l_ref = grad_and_value(make_loss_fn(model, impl="reference"))(values, base, support,
                                                                        batch)
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-12, atol=0)
    for n in names:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-9, atol=1e-12, msg=n)
    # Every target takes a fast kernel: nn.Linear and GPT-2's Conv1D, and the fused experts
    # of the eager experts loop (the matrix builds MoE models with it).
    assert {n for n in names if base[n].dim() == 2} <= LinearRouter(model).names
    assert {n for n in names if base[n].dim() == 3} <= ExpertsRouter(model).names


def test_expert_values_gradient_equals_the_dense_gradient(moe_arch: str,
                                                          archs: SimpleNamespace) -> None:
    """The reference path trains fused 3-D expert deltas: dL/dvalues is dL/dW at the support.

    float64 with the eager experts loop; float32 with transformers' default grouped_mm
    kernel (no float64 there), to 1e-5 relative.
    """
    for dtype, impl, rtol in ((torch.float64, "eager", 1e-10), (torch.float32, "grouped_mm", 1e-5)):
        model = archs.build(moe_arch, dtype, experts_implementation=impl)
        base = {n: p.detach() for n, p in model.named_parameters()}
        experts = [n for n in resolve_targets(model, ["experts"])]
        support = _support(base, experts, 0.2)
        values = {n: torch.zeros(i.numel(), dtype=dtype) for n, i in support.items()}
        batch = archs.batch(moe_arch)
        got, _ = grad_and_value(make_loss_fn(model))(values, base, support, batch)
        leaves = {n: base[n].clone().requires_grad_() for n in experts}
        torch.func.functional_call(model, {**base, **leaves}, kwargs=batch).loss.backward()
        for n in experts:
            want = leaves[n].grad.reshape(-1)[support[n]]  # type: ignore[union-attr]
            assert want.abs().max() > 0, n
            torch.testing.assert_close(got[n], want, rtol=rtol, atol=rtol * 1e-3, msg=n)


def test_all_linear_covers_every_block_weight(arch_name: str, archs: SimpleNamespace) -> None:
    model = archs.build(arch_name)
    names = resolve_targets(model, "all-linear")
    suffixes = archs.ARCHS[arch_name][3]

    def module(n: str) -> str:
        return n.removesuffix(".weight")

    expected = sorted(n for n, p in model.named_parameters()
                      if p.dim() >= 2 and any(module(n).endswith("." + s) for s in suffixes))
    assert names == expected
    per_layer = {s: sum(module(n).endswith("." + s) for n in names) for s in suffixes}
    assert all(c >= 2 for c in per_layer.values()), per_layer  # in both layers (T5: both stacks)
    assert set(left_out(model, names)) <= {"embedding", "output", "norm", "router"}
    if arch_name in archs.MOE:
        assert len(left_out(model, names)["router"]) == 2  # one per layer, left out unless named


def test_model_and_dict_forms_agree(arch_name: str, archs: SimpleNamespace) -> None:
    model = archs.build(arch_name)
    for spec in ("all-linear", ["experts", "gate"], r".*\.(mlp|layer\.1)\..*"):
        try:
            want = resolve_targets(model, spec)
        except KeyError:
            want = []
        for params in (dict(model.named_parameters()), model.state_dict()):
            try:
                got = resolve_targets(params, spec)
            except KeyError:
                got = []
            assert got == want, (spec, sorted(set(got) ^ set(want)))


def test_trained_delta_applies_on_disk_as_in_memory(arch_name: str, archs: SimpleNamespace,
                                                    arch_dir: Callable[[str], Path],
                                                    tmp_path: Path) -> None:
    """SPEFT in memory; written in either layout, applied to the saved directory: same logits."""
    model = _load(archs, arch_name, arch_dir(arch_name))
    batch = archs.batch(arch_name)
    targets: str | list[str] = "all-linear"
    if arch_name in archs.MOE:
        targets = [*resolve_targets(model, "all-linear"), *resolve_targets(model, ["gate"])]
    delta, _ = speft(model, dict(model.named_parameters()), [batch], density=0.05,
                     targets=targets, steps=2, lr=0.05, calibration_examples=2, progress=False)
    layout = CheckpointLayout(model)
    on_disk = layout.to_checkpoint(delta)
    assert on_disk.nnz == delta.nnz and set(on_disk.keys()) <= set(layout.checkpoint_shapes)
    assert layout.is_identity == (arch_name not in archs.MOE)
    for i, d in enumerate((delta, on_disk)):
        apply_to_checkpoint(arch_dir(arch_name), d, tmp_path / f"out{i}")
    apply_to_model(model, delta)
    want = _logits(model, batch)
    for i in range(2):
        got = _logits(_load(archs, arch_name, tmp_path / f"out{i}"), batch)
        assert (got - want).abs().max() <= 1e-6


def test_extract_from_disk_applies_in_memory(arch_name: str, archs: SimpleNamespace,
                                             arch_dir: Callable[[str], Path],
                                             tmp_path: Path) -> None:
    base_dir = arch_dir(arch_name)
    model = _load(archs, arch_name, base_dir)
    base = {n: p.detach() for n, p in model.named_parameters()}
    names = resolve_targets(model, "all-linear")
    gen = torch.Generator().manual_seed(2)
    support = _support(base, names, 0.05, seed=2)
    delta = SparseDelta({n: (tuple(base[n].shape), i, 0.1 * torch.randn(i.numel(), generator=gen))
                         for n, i in support.items()})
    apply_to_checkpoint(base_dir, delta, tmp_path / "tuned")
    extracted = extract_delta(base_dir, tmp_path / "tuned", density=1.0)
    assert extracted.nnz == delta.nnz  # every changed entry, in checkpoint names
    assert set(extracted.keys()) <= set(CheckpointLayout(model).checkpoint_shapes)
    apply_to_model(model, extracted)  # the fingerprint (checkpoint layout) matches too
    tuned = _load(archs, arch_name, tmp_path / "tuned")
    batch = archs.batch(arch_name)
    assert (_logits(model, batch) - _logits(tuned, batch)).abs().max() <= 1e-6


def test_experts_and_routers_by_suffix_and_regex(moe_arch: str, archs: SimpleNamespace) -> None:
    model = archs.build(moe_arch)
    experts = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
               for p in ("down_proj", "gate_up_proj")]
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert resolve_targets(model, ["experts"]) == experts
    assert resolve_targets(model, r".*experts") == experts  # the experts module's name
    assert resolve_targets(model, r".*\.experts\.gate_up_proj") == experts[1::2]
    assert resolve_targets(model, ["gate_up_proj"]) == experts[1::2]
    assert resolve_targets(model, ["mlp.gate"]) == routers
    assert resolve_targets(model, r".*mlp\.gate") == routers
    assert not set(routers) & set(resolve_targets(model, "all-linear"))
