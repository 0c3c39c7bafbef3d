"""spdelta.hf.layout: the checkpoint layout traced through transformers' own conversions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from spdelta import SparseDelta, apply_delta
from spdelta.hf import apply_to_model
from spdelta.hf._trace import Trace, UntraceableError
from spdelta.hf.layout import CheckpointLayout, LayoutError

pytestmark = pytest.mark.hf


# -- Trace against real tensors --------------------------------------------------------------
def _op(draw: st.DrawFn, t: torch.Tensor) -> Callable[[object], object]:
    """One entry-moving operation that applies to a tensor of ``t``'s shape."""
    nd = t.dim()
    kind = draw(st.sampled_from(["transpose", "chunk", "narrow", "reshape", "unsqueeze",
                                 "stack", "cat", "index", "split"]))
    d = draw(st.integers(0, nd - 1))
    if kind == "transpose":
        e = draw(st.integers(0, nd - 1))
        return lambda x: x.transpose(d, e).contiguous()  # type: ignore[attr-defined]
    if kind == "chunk":
        n, i = draw(st.integers(1, 3)), draw(st.integers(0, 2))
        return lambda x: torch.chunk(x, n, dim=d)[min(i, len(torch.chunk(x, n, dim=d)) - 1)]
    if kind == "split":
        return lambda x: torch.split(x, 1, dim=d)[-1]
    if kind == "narrow":
        start = draw(st.integers(0, t.shape[d] - 1))
        return lambda x: torch.narrow(x, d, start, t.shape[d] - start)
    if kind == "reshape":
        return lambda x: x.reshape(-1, t.shape[-1]) if nd > 1 else x.reshape(1, -1)  # type: ignore[attr-defined]
    if kind == "unsqueeze":
        return lambda x: x.unsqueeze(d).squeeze(d).unsqueeze(0)  # type: ignore[attr-defined]
    if kind == "index":  # an int index, or a slice that keeps the tensor non-empty
        start = 1 if t.shape[0] > 1 else 0
        return lambda x: x[0] if nd > 1 else x[start:]  # type: ignore[index]
    return lambda x: (torch.stack if kind == "stack" else torch.cat)([x, x], dim=d)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_trace_moves_entries_as_the_tensor_moves_them(data: st.DataObject) -> None:
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    real = torch.arange(torch.Size(shape).numel()).reshape(shape)
    flat = data.draw(st.lists(st.integers(0, real.numel() - 1), unique=True)).copy()
    trace: object = Trace.of(("t",), shape, torch.tensor(flat, dtype=torch.long),
                             torch.tensor(flat, dtype=torch.long))
    for _ in range(data.draw(st.integers(1, 4))):
        op = _op(data.draw, real)
        real, trace = op(real), op(trace)  # type: ignore[assignment]
        assert isinstance(trace, Trace) and trace.shape == real.shape
    # Each tracked entry sits where the tensor put the value (= its original position).
    assert real.reshape(-1)[trace.flat_indices()].tolist() == trace.ids.tolist()
    tracked = set(flat)
    assert sorted(trace.ids.tolist()) == sorted(v for v in real.reshape(-1).tolist()
                                                if v in tracked)


def test_trace_refuses_what_is_not_a_move() -> None:
    trace = Trace.of(("t",), (2, 2), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(UntraceableError, match="add"):
        torch.add(trace, 1)  # type: ignore[arg-type]
    with pytest.raises(UntraceableError, match="reshape"):
        trace.reshape(3)


# -- the layout on MoE checkpoints ------------------------------------------------------------
def test_checkpoint_tensors_are_what_save_pretrained_writes(
        moe_arch: str, archs: SimpleNamespace, arch_dir: Callable[[str], Path]) -> None:
    import transformers

    path = arch_dir(moe_arch)
    on_disk = load_file(str(path / "model.safetensors"))
    model = getattr(transformers, archs.ARCHS[moe_arch][1]).from_pretrained(path)
    layout = CheckpointLayout(model)
    assert layout.checkpoint_shapes == {k: tuple(v.shape) for k, v in on_disk.items()}
    got = dict(layout.checkpoint_tensors())
    assert got.keys() == on_disk.keys()
    assert all(torch.equal(got[k], on_disk[k]) for k in on_disk)
    params = dict(model.named_parameters())
    rebuilt = dict(layout.model_tensors(on_disk))  # as from_pretrained builds them
    assert rebuilt.keys() == params.keys()
    assert all(torch.equal(rebuilt[k], params[k]) for k in params)
    assert any(".experts.3." in k for k in layout.converted)


def test_to_checkpoint_equals_the_dense_reference(moe_arch: str, archs: SimpleNamespace) -> None:
    """Applying the model-layout delta then converting equals converting then applying."""
    model = archs.build(moe_arch)
    layout = CheckpointLayout(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    delta = SparseDelta({n: (tuple(p.shape), torch.randperm(p.numel(), generator=gen)[:7].sort()
                             .values, torch.randn(7, generator=gen)) for n, p in params.items()})
    on_disk = layout.to_checkpoint(delta)
    want = dict(layout.checkpoint_tensors(apply_delta(params, delta)))
    got = apply_delta(dict(layout.checkpoint_tensors(params)), on_disk)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert layout.to_model(on_disk) == delta
    one = SparseDelta({n: on_disk[n] for n in on_disk.keys() if ".experts.2." in n})
    assert set(layout.to_model(one).keys()) == {n for n in params if "experts" in n}


def test_dense_models_store_parameters_as_they_are(arch_name: str, archs: SimpleNamespace) -> None:
    layout = CheckpointLayout(archs.build(arch_name))
    assert layout.is_identity == (arch_name not in archs.MOE)


def test_unmatched_names_show_both_layouts(archs: SimpleNamespace) -> None:
    model = archs.build("mixtral")
    bad = SparseDelta({"model.layers.0.mlp.experts.9.w1.weight":
                       ((48, 32), torch.tensor([0]), torch.ones(1))})
    with pytest.raises(KeyError, match=r"0 are in the model's layout .*0 in its checkpoint's "
                                       r"layout \(named like .*block_sparse_moe\.experts"):
        apply_to_model(model, bad)
    with pytest.raises(LayoutError, match="not model tensors"):
        CheckpointLayout(model).to_checkpoint(bad)
    both = SparseDelta({
        "model.layers.0.mlp.experts.down_proj": ((4, 32, 48), torch.tensor([0]), torch.ones(1)),
        "model.layers.0.block_sparse_moe.experts.1.w2.weight":
            ((32, 48), torch.tensor([0]), torch.ones(1))})
    with pytest.raises(KeyError, match="both directly and through checkpoint"):
        apply_to_model(model, both)


def test_both_layouts_apply_to_both_checkpoint_layouts(archs: SimpleNamespace,
                                                      arch_dir: Callable[[str], Path],
                                                      tmp_path: Path) -> None:
    """Per-expert and fused deltas, each with its fingerprint, on a per-expert directory
    (what save_pretrained writes) and on a fused one (the model's own names)."""
    import shutil

    import transformers
    from safetensors.torch import save_file

    from spdelta.hf import apply_to_checkpoint
    from spdelta.hf.model import legacy_fingerprint

    per_expert = arch_dir("mixtral")
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(per_expert / "config.json", fused / "config.json")
    model = transformers.MixtralForCausalLM.from_pretrained(per_expert).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    save_file({n: p.contiguous() for n, p in params.items()}, str(fused / "model.safetensors"))
    layout = CheckpointLayout(model)
    gen = torch.Generator().manual_seed(4)
    in_model = SparseDelta({n: (tuple(p.shape), torch.randperm(p.numel(), generator=gen)[:9]
                                .sort().values, torch.randn(9, generator=gen))
                            for n, p in params.items() if "experts" in n or "gate" in n})
    in_ckpt = layout.to_checkpoint(in_model)
    stored = dict(layout.checkpoint_tensors())
    # The legacy (pre-1.2) fingerprint covers the delta's own tensors, so it is defined in
    # either layout; base1 covers the whole checkpoint and so names the directory's layout.
    deltas = {"fused": in_model.with_metadata({"spdelta.base_model.fingerprint":
                  legacy_fingerprint({n: params[n] for n in in_model.keys()})}),
              "per-expert": in_ckpt.with_metadata({"spdelta.base_model.fingerprint":
                  legacy_fingerprint({n: stored[n] for n in in_ckpt.keys()})})}
    batch = archs.batch("mixtral")
    apply_to_model(model, in_model)
    with torch.no_grad():
        want = model(**batch).logits
    for base in (per_expert, fused):
        for kind, delta in deltas.items():
            out = tmp_path / f"{base.name}-{kind}"
            apply_to_checkpoint(base, delta, out)  # fingerprint checked in the delta's layout
            with torch.no_grad():
                got = transformers.MixtralForCausalLM.from_pretrained(out)(**batch).logits
            assert torch.equal(got, want), (base.name, kind)
            wrong = delta.with_metadata({"spdelta.base_model.fingerprint": "sha256:" + "0" * 16})
            with pytest.raises(ValueError, match="fingerprint"):
                apply_to_checkpoint(base, wrong, tmp_path / "refused")


def test_moe_model_in_memory_has_its_checkpoint_fingerprint(moe_arch: str, archs: SimpleNamespace,
                                                           arch_dir: Callable[[str], Path]
                                                           ) -> None:
    """The base1 fingerprint (spec §5.1) of a loaded MoE model is computed over the
    per-expert tensors save_pretrained writes, so it equals the directory's."""
    import transformers

    from spdelta.hf import checkpoint_tensors, fingerprint

    path = arch_dir(moe_arch)
    model = getattr(transformers, archs.ARCHS[moe_arch][1]).from_pretrained(path)
    assert set(checkpoint_tensors(model)) == set(load_file(str(path / "model.safetensors")))
    assert fingerprint(model) == fingerprint(path)
