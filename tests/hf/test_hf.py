"""spdelta.hf on tiny random Llama models: in-memory and on-disk apply, extract, tied weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from spdelta import SparseDelta, apply_delta
from spdelta.errors import KeyMismatchError, OutputExistsError, ShapeError
from spdelta.hf import (
    BaseMismatchError,
    apply_to_checkpoint,
    apply_to_model,
    extract_delta,
    fingerprint,
    remove_from_model,
)


def random_delta(
    params: dict[str, torch.Tensor], density: float, seed: int, dtype: torch.dtype = torch.float64
) -> SparseDelta:
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    for name, p in sorted(params.items()):
        k = max(1, int(density * p.numel()))
        idx = torch.randperm(p.numel(), generator=gen)[:k].sort().values
        entries[name] = (tuple(p.shape), idx, (torch.randn(k, generator=gen) * 0.1).to(dtype))
    return SparseDelta(entries)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_applied_model_logits_equal_functional_call(tiny_llama, token_batch) -> None:
    base = state(tiny_llama)
    delta = random_delta(base, 0.05, 0)
    expected = functional_call(tiny_llama, apply_delta(base, delta), kwargs=token_batch).logits
    apply_to_model(tiny_llama, delta)
    torch.testing.assert_close(tiny_llama(**token_batch).logits, expected, rtol=0, atol=0)


def test_remove_is_the_inverse(tiny_llama) -> None:
    base = state(tiny_llama)
    delta = random_delta(base, 0.1, 1)
    remove_from_model(apply_to_model(tiny_llama, delta, alpha=0.5), delta, alpha=0.5)
    for name, p in tiny_llama.named_parameters():
        assert torch.equal(p, base[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_is_exact_in_fp32_and_bf16(dtype: torch.dtype) -> None:
    lin = torch.nn.Linear(64, 64).to(dtype)
    base = state(lin)
    d1, d2 = random_delta(base, 0.5, 2, torch.float32), random_delta(base, 0.3, 3, torch.float32)
    apply_to_model(apply_to_model(lin, d1), d2, alpha=2.0)
    remove_from_model(remove_from_model(lin, d2, alpha=2.0), d1)
    for name, p in lin.named_parameters():
        assert torch.equal(p, base[name]), name


def test_remove_without_record_subtracts_within_one_ulp() -> None:
    lin = torch.nn.Linear(64, 64).bfloat16()
    base = state(lin)
    delta = random_delta(base, 0.5, 2, torch.float32)
    apply_to_model(lin, delta)
    with torch.no_grad():
        lin.weight.view(-1)[delta["weight"].indices[:1]] += 0  # unchanged values: record still used
    fresh = SparseDelta(dict(delta.items()))  # an equal delta, another object: still exact
    remove_from_model(lin, fresh)
    assert torch.equal(lin.weight, base["weight"])
    remove_from_model(lin, delta)  # nothing recorded now: plain subtraction
    for name, p in lin.named_parameters():
        expected = (
            base[name].float().reshape(-1).index_add(0, delta[name].indices, -delta[name].values)
        )
        torch.testing.assert_close(p.float().reshape(-1), expected.bfloat16().float())


def test_prefix_free_names_map_onto_the_causal_lm(tiny_llama) -> None:
    base = state(tiny_llama)
    full = random_delta(
        {"model.layers.0.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"]}, 0.1, 3
    )
    bare = SparseDelta({"layers.0.mlp.up_proj.weight": full["model.layers.0.mlp.up_proj.weight"]})
    apply_to_model(tiny_llama, bare)
    assert torch.equal(
        dict(tiny_llama.named_parameters())["model.layers.0.mlp.up_proj.weight"],
        apply_delta(base, full)["model.layers.0.mlp.up_proj.weight"],
    )


def test_tied_weights_in_memory(tiny_llama_tied) -> None:
    emb = tiny_llama_tied.model.embed_tokens.weight
    shape = tuple(emb.shape)
    on_head = SparseDelta(
        {"lm_head.weight": (shape, torch.tensor([3]), torch.tensor([1.0], dtype=torch.float64))}
    )
    before = float(emb.detach().view(-1)[3])
    apply_to_model(tiny_llama_tied, on_head)
    assert float(emb.detach().view(-1)[3]) == before + 1.0
    assert tiny_llama_tied.lm_head.weight is emb  # still tied
    both = SparseDelta(
        {
            "lm_head.weight": on_head["lm_head.weight"],
            "model.embed_tokens.weight": on_head["lm_head.weight"],
        }
    )
    with pytest.raises(KeyMismatchError, match="both address"):
        apply_to_model(tiny_llama_tied, both)


def test_mismatches_are_refused(tiny_llama) -> None:
    with pytest.raises(KeyMismatchError, match="unmatched.*'nope.weight'"):
        apply_to_model(
            tiny_llama, SparseDelta({"nope.weight": ((2,), torch.tensor([0]), torch.ones(1))})
        )
    with pytest.raises(ShapeError, match="model.norm.weight"):
        apply_to_model(
            tiny_llama, SparseDelta({"model.norm.weight": ((3,), torch.tensor([0]), torch.ones(1))})
        )


def test_fingerprint_mismatch_is_refused_unless_overridden(tiny_llama) -> None:
    base = state(tiny_llama)
    delta = random_delta({"model.norm.weight": base["model.norm.weight"]}, 0.5, 4)
    stamped = delta.with_metadata({"spdelta.base_model.fingerprint": fingerprint(tiny_llama)})
    apply_to_model(tiny_llama, stamped)  # matches: fine; the model has now changed
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        apply_to_model(tiny_llama, stamped)
    apply_to_model(tiny_llama, stamped, check_base=False)


@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    return tmp_path / "base"


def test_checkpoint_apply_equals_in_memory_apply(sharded_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    assert (sharded_dir / "model.safetensors.index.json").is_file()
    model = LlamaForCausalLM.from_pretrained(sharded_dir)
    delta = random_delta(state(model), 0.05, 5, torch.float32)
    delta = SparseDelta(
        {("lm_head.weight" if n == "model.embed_tokens.weight" else n): e for n, e in delta.items()}
    )  # the tied alias, absent on disk
    out = tmp_path / "out"
    apply_to_checkpoint(sharded_dir, delta, out, alpha=0.7)
    apply_to_model(model, delta, alpha=0.7)
    reloaded = LlamaForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        assert torch.equal(dict(reloaded.named_parameters())[name], p), name
    assert json.loads((out / "model.safetensors.index.json").read_text()) == json.loads(
        (sharded_dir / "model.safetensors.index.json").read_text()
    )
    assert (out / "config.json").read_bytes() == (sharded_dir / "config.json").read_bytes()
    with pytest.raises(OutputExistsError):
        apply_to_checkpoint(sharded_dir, delta, out)


def test_failed_apply_leaves_no_output(sharded_dir: Path, tmp_path: Path) -> None:
    bad = SparseDelta({"model.norm.weight": ((32,), torch.tensor([0]), torch.ones(1))})
    bad = bad.with_metadata({"spdelta.base_model.fingerprint": "sha256:0000000000000000"})
    with pytest.raises(BaseMismatchError):
        apply_to_checkpoint(sharded_dir, bad, tmp_path / "out")
    assert os.listdir(tmp_path) == ["base"]


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_extract_recovers_an_applied_delta(sharded_dir: Path, tmp_path: Path, scope: str) -> None:
    from transformers import LlamaForCausalLM

    params = state(LlamaForCausalLM.from_pretrained(sharded_dir))
    delta = random_delta(params, 0.02, 6, torch.float32)
    apply_to_checkpoint(sharded_dir, delta, tmp_path / "tuned")
    density = delta.nnz / delta.numel if scope == "global" else 0.02
    got = extract_delta(sharded_dir, tmp_path / "tuned", density=density, scope=scope)
    assert got.keys() == delta.keys()
    for name, e in delta.items():
        assert torch.equal(got[name].indices, e.indices), name
        torch.testing.assert_close(got[name].values, e.values, rtol=1e-6, atol=1e-6)
    assert got.metadata["spdelta.base_model.fingerprint"] == fingerprint(sharded_dir)
