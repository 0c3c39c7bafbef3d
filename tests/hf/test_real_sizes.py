"""Llama-2-7B tensor shapes (a 11008x4096 MLP weight, a 32000x4096 embedding; > 2**24 elements).

A one-layer bf16 Llama with those two shapes (and a tiny attention) is fingerprinted,
patched on disk, extracted back, and trained for one step with ``spdelta train``. Before
the exact integer sampling of spec §5.1, each of these raised ``IndexError``: a float32
``linspace`` picked positions past the end of tensors of more than 2**24 elements.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spdelta import SparseDelta
from spdelta.cli import main
from spdelta.format import load_delta
from spdelta.hf import apply_to_checkpoint, checkpoint_tensors, extract_delta, fingerprint
from tests.conftest import save_tiny_lm

pytestmark = pytest.mark.hf

EMBED, UP = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
KEY = "spdelta.base_model.fingerprint"


@pytest.fixture(scope="module")
def llama7b_shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The checkpoint directory (bf16, about 530 MB) and its in-memory fingerprint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(save_tiny_lm(str(tmp_path_factory.mktemp("llama7b_shapes"))))
    tok = AutoTokenizer.from_pretrained(path)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, vocab_size=32000,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                      head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    with torch.device("meta"):  # no random init of 266M weights: a seeded pattern is enough
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gave lm_head its own memory
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # one seeded row, broadcast: cheap at this size
        for p in model.parameters():
            p.copy_(torch.randn(p.shape[-1], generator=gen) * 0.02)
    tensors = checkpoint_tensors(model)
    assert tuple(tensors[EMBED].shape) == (32000, 4096) and tensors[EMBED].numel() > 2**24
    assert tuple(tensors[UP].shape) == (11008, 4096) and tensors[UP].numel() > 2**24
    assert "lm_head.weight" not in tensors  # tied: stored once
    in_memory = fingerprint(model)
    model.save_pretrained(path)
    return path, in_memory


def _edge_delta(numel: int, shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.Tensor,
                                                               torch.Tensor]:
    """Entries at the first, around 2**24 (where float32 stops being exact) and the last place."""
    idx = torch.tensor([0, 2**24 - 1, 2**24 + 1, numel - 2, numel - 1])
    return shape, idx, torch.tensor([0.5, -0.25, 1.0, -2.0, 4.0])


def test_fingerprint_extract_and_apply_at_7b_shapes(llama7b_shapes: tuple[Path, str],
                                                    tmp_path: Path) -> None:
    base, in_memory = llama7b_shapes
    fp = fingerprint(base)
    assert fp == in_memory and fp.startswith("base1:")
    delta = SparseDelta({EMBED: _edge_delta(32000 * 4096, (32000, 4096)),
                         UP: _edge_delta(11008 * 4096, (11008, 4096))},
                        metadata={KEY: fp})
    apply_to_checkpoint(base, delta, tmp_path / "tuned")
    assert fingerprint(tmp_path / "tuned") != fp  # the last element is sampled
    for name, numel in ((EMBED, 32000 * 4096), (UP, 11008 * 4096)):
        got = extract_delta(base, tmp_path / "tuned", density=5 / numel, targets=name)
        assert got.metadata[KEY] == fp and got.keys() == [name]
        assert torch.equal(got[name].indices, delta[name].indices), name
        torch.testing.assert_close(got[name].values, delta[name].values, rtol=0.02, atol=0.02)


def test_one_training_step_at_7b_shapes(llama7b_shapes: tuple[Path, str], tmp_path: Path,
                                        sums_file: Callable[[Path, int], Path]) -> None:
    base, in_memory = llama7b_shapes
    data = sums_file(tmp_path / "sums.jsonl", 4)
    out = tmp_path / "d.st"
    code = main(["train", "--model", str(base), "--data", str(data), "-o", str(out),
                 "--method", "spiel", "--targets", ".*mlp.up_proj", "--density", "1e-6", "--steps",
                 "1", "--batch-size", "1", "--max-length", "16", "--bf16", "--no-progress"])
    assert code == 0
    delta = load_delta(out)
    assert delta.metadata[KEY] == in_memory
    assert delta.keys() == [UP] and delta[UP].nnz == round(1e-6 * 11008 * 4096)
    assert int(delta[UP].indices.max()) < 11008 * 4096
    assert json.loads(delta.metadata["spdelta.training"])["steps"] == 1
