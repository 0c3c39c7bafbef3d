"""Loading deltas: files or objects, checked against the base before anything changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from spdelta import SparseDelta
from spdelta.errors import BaseMismatchError, KeyMismatchError, ShapeError
from spdelta.format import save_delta
from spdelta.serve import DeltaModel, ServeError

from .test_swap import bits, same_bits

IDS = torch.tensor([[5, 6, 7], [8, 9, 10]])


def test_files_and_objects_serve_alike(tmp_path: Path, llama: nn.Module,
                                       make_delta: Callable[..., SparseDelta]) -> None:
    d = make_delta(llama, seed=1)
    save_delta(d, tmp_path / "a.st")
    from_file = DeltaModel(llama, {"a": tmp_path / "a.st"})
    with torch.no_grad():
        got = from_file(IDS, deltas=["a", None]).logits
    from_file.close()
    with torch.no_grad():
        want = DeltaModel(llama, {"a": d})(IDS, deltas=["a", None]).logits
    assert torch.equal(got, want)


def test_a_delta_for_another_base_is_refused_before_anything_changes(
        tmp_path: Path, make_llama: Callable[..., nn.Module],
        make_delta: Callable[..., SparseDelta]) -> None:
    model, other = make_llama(seed=0), make_llama(seed=1)
    save_delta(make_delta(other, seed=2), tmp_path / "other.st")
    before = bits(model)
    dm = DeltaModel(model, {"a": make_delta(model, seed=1)})
    with pytest.raises(BaseMismatchError, match="delta 'other': base model fingerprint: "
                                                "the delta was made for base1:"):
        dm.add({"b": make_delta(model, seed=3), "other": tmp_path / "other.st"})
    assert dm.names == ["a"]  # neither the good nor the bad delta of the refused call
    assert same_bits(bits(model), before)
    with pytest.raises(BaseMismatchError):
        DeltaModel(model, {"other": tmp_path / "other.st"})
    assert same_bits(bits(model), before)
    dm.activate("a")
    dm.deactivate()
    assert same_bits(bits(model), before)
    dm.add({"other": tmp_path / "other.st"}, check_base=False)  # the override
    assert dm.names == ["a", "other"]


def test_names_without_the_model_prefix(llama: nn.Module,
                                        make_delta: Callable[..., SparseDelta]) -> None:
    d = make_delta(llama, seed=1)
    short = SparseDelta({n.removeprefix("model."): e for n, e in d.items()})
    with torch.no_grad():
        a = DeltaModel(llama, {"a": d})(IDS, deltas=["a", "a"]).logits
        b = DeltaModel(llama, {"b": short})(IDS, deltas=["b", "b"]).logits
    assert torch.equal(a, b)


def test_only_untied_linear_weights_are_served(make_llama: Callable[..., nn.Module]) -> None:
    model = make_llama(tie_word_embeddings=True)
    norm = SparseDelta({"model.norm.weight": ((32,), torch.tensor([0]), torch.tensor([1.0]))})
    with pytest.raises(ServeError, match="'model.norm.weight'.*apply_to_model"):
        DeltaModel(model, {"n": norm})
    head = SparseDelta({"lm_head.weight": ((64, 32), torch.tensor([0]), torch.tensor([1.0]))})
    with pytest.raises(ServeError, match="untied linear"):
        DeltaModel(model, {"h": head})


def test_mismatched_names_and_shapes(llama: nn.Module) -> None:
    typo = SparseDelta({"model.layers.0.self_attn.q_prj.weight": ((32, 32), torch.tensor([0]),
                                                                  torch.tensor([1.0]))})
    with pytest.raises(KeyMismatchError, match="q_prj"):
        DeltaModel(llama, {"t": typo})
    shape = SparseDelta({"model.layers.0.self_attn.q_proj.weight": ((32, 16), torch.tensor([0]),
                                                                    torch.tensor([1.0]))})
    with pytest.raises(ShapeError, match="q_proj"):
        DeltaModel(llama, {"s": shape}, check_base=False)


def test_request_errors(llama: nn.Module, make_delta: Callable[..., SparseDelta]) -> None:
    dm = DeltaModel(llama, {"a": make_delta(llama, seed=1)})
    with pytest.raises(KeyMismatchError, match="no delta named 'b' is loaded; loaded: \\['a'\\]"):
        dm(IDS, deltas=["a", "b"])
    with pytest.raises(ShapeError, match="deltas names 3 rows but the batch has 2"):
        dm(IDS, deltas=["a", None, None])
    with pytest.raises(ShapeError, match="one name \\(or None\\) per row"):
        dm(IDS, deltas="a")
    with pytest.raises(ServeError, match="taken or empty: \\['a'\\]"):
        dm.add({"a": make_delta(llama, seed=2)})
    with dm.use(["a", None]), pytest.raises(ServeError, match="one request at a time"):
        with dm.use([None, "a"]):
            pass
    with dm.use(["a", None, None]), pytest.raises(ShapeError, match="a batch of 2 rows"):
        llama(IDS)


def test_memory_is_about_8_bytes_an_entry(llama: nn.Module,
                                          make_delta: Callable[..., SparseDelta]) -> None:
    deltas = {str(i): make_delta(llama, seed=i) for i in range(4)}
    dm = DeltaModel(llama, deltas)
    nnz = sum(d.nnz for d in deltas.values())
    rows = sum(4 * (p.shape[0] * 4 + 1) for n, p in llama.named_parameters() if n in deltas["0"])
    assert dm.nbytes() == 8 * nnz + rows  # int32 column + fp32 value; int32 row pointers
    assert "4 deltas on 14 layers" in repr(dm)
