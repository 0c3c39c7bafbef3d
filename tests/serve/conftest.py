"""Fixtures for the serving tests: a tiny float32 Llama and random deltas with fingerprints."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from spdelta import SparseDelta
from spdelta.format.constants import KEY_FINGERPRINT
from spdelta.hf import fingerprint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, **over: int) -> nn.Module:
    """A 2-layer, hidden-32 Llama (eager attention, untied head) with seeded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    cfg.update(over)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model.to(dtype).eval()


def random_delta(model: nn.Module, seed: int, density: float = 0.1, scale: float = 0.3,
                 names: tuple[str, ...] = LINEARS) -> SparseDelta:
    """A seeded delta on the named linear weights of every block, with the base fingerprint."""
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in model.named_parameters()}
    entries = {}
    for n, p in params.items():
        if not n.endswith(".weight") or not any(f".{m}." in n for m in names):
            continue
        k = max(1, round(density * p.numel()))
        idx = torch.randperm(p.numel(), generator=gen)[:k].sort().values
        entries[n] = (tuple(p.shape), idx, torch.randn(k, generator=gen) * scale)
    meta = {KEY_FINGERPRINT: fingerprint(model)}
    return SparseDelta(entries, metadata=meta)


@pytest.fixture
def llama() -> nn.Module:
    """A tiny float32 Llama."""
    return tiny_llama()


@pytest.fixture
def make_delta() -> Callable[..., SparseDelta]:
    """:func:`random_delta`."""
    return random_delta


@pytest.fixture
def make_llama() -> Callable[..., nn.Module]:
    """:func:`tiny_llama`."""
    return tiny_llama
