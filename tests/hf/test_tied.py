"""Tied weights on every path: a state dict, a checkpoint on disk, targets (issue 16)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from spdelta import SparseDelta, apply_delta, resolve_targets
from spdelta.errors import KeyMismatchError
from spdelta.hf import apply_to_checkpoint, apply_to_model
from spdelta.train import speft

pytestmark = pytest.mark.hf


def _one(shape: tuple[int, ...], value: float = 1.0) -> tuple[tuple[int, ...], torch.Tensor,
                                                             torch.Tensor]:
    return shape, torch.tensor([5]), torch.tensor([value])


def test_apply_delta_on_a_tied_state_dict_patches_every_name(archs: SimpleNamespace) -> None:
    model = archs.build("gemma2")
    state = model.state_dict()
    emb = "model.embed_tokens.weight"
    assert state["lm_head.weight"].data_ptr() == state[emb].data_ptr()  # tied
    want = float(state[emb].view(-1)[5] + 1.0)  # float32 arithmetic, as apply's cast
    out = apply_delta(state, SparseDelta({emb: _one(tuple(state[emb].shape))}))
    assert out["lm_head.weight"] is out[emb]
    model.load_state_dict(out)  # loads lm_head.weight after the embedding: same values
    assert float(model.model.embed_tokens.weight.detach().view(-1)[5]) == want
    both = SparseDelta({emb: _one(tuple(state[emb].shape)),
                        "lm_head.weight": _one(tuple(state[emb].shape))})
    with pytest.raises(KeyMismatchError, match="tied tensors under more than one name"):
        apply_delta(state, both)


def test_t5_checkpoint_accepts_the_tied_lm_head_alias(archs: SimpleNamespace,
                                                      arch_dir: Callable[[str], Path],
                                                      tmp_path: Path) -> None:
    import transformers

    base = arch_dir("t5")
    assert "lm_head.weight" not in load_file(str(base / "model.safetensors"))
    delta = SparseDelta({"lm_head.weight": _one((64, 32), 0.5)})
    apply_to_checkpoint(base, delta, tmp_path / "out")
    model = transformers.T5ForConditionalGeneration.from_pretrained(base)
    apply_to_model(model, delta)
    patched = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.equal(patched.shared.weight, model.shared.weight)
    assert torch.equal(patched.lm_head.weight, model.lm_head.weight)


def test_lm_head_target_on_a_tied_model_trains_the_shared_weight(archs: SimpleNamespace) -> None:
    model = archs.build("gemma2")
    assert resolve_targets(model, ["lm_head"]) == ["model.embed_tokens.weight"]
    assert resolve_targets(model, "lm_head") == ["model.embed_tokens.weight"]
    batch = archs.batch("gemma2")
    delta, history = speft(model, dict(model.named_parameters()), [batch], density=0.05,
                           targets=["q_proj", "lm_head"], steps=3, lr=0.05,
                           calibration_examples=2, progress=False)
    assert "model.embed_tokens.weight" in delta.keys()
    assert history[-1]["loss"] < history[0]["loss"]
