"""The architecture matrix: tiny random-init Hugging Face models, each saved once per session.

Every config is hidden 32, 2 layers, vocab 64 (MoE: 4 experts, top 2), built from a config
(never the hub), with fixed weights. ``arch_model(name, dtype)`` builds one in memory;
``arch_dir(name)`` saves the float32 model with ``save_pretrained`` in a session temp dir.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

_COMMON = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
           "max_position_embeddings": 64}
_MOE = {"num_experts_per_tok": 2, "experts_implementation": "eager"}

#: name -> (config class, model class, config kwargs, module suffixes 'all-linear' must cover)
ARCHS: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {},
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 64,
              "bos_token_id": 0, "eos_token_id": 0},
             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {},
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8},
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
             ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, **_MOE},
                ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                 "experts.down_proj")),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "moe_intermediate_size": 24, "head_dim": 8, **_MOE},
                  ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                   "experts.down_proj")),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM",
              {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4,
            "vocab_size": 64, "decoder_start_token_id": 0},
           ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
            "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o",
            "DenseReluDense.wi", "DenseReluDense.wo")),
}
CAUSAL = [a for a in ARCHS if a != "t5"]
MOE = ["mixtral", "qwen3_moe"]


def arch_config(name: str, **overrides: Any) -> Any:
    """The tiny config of architecture ``name`` (``overrides`` replace its fields)."""
    import transformers

    config_cls, _, kwargs, _ = ARCHS[name]
    fields = kwargs if name in ("gpt2", "t5") else {**_COMMON, **kwargs}
    return getattr(transformers, config_cls)(**{**fields, **overrides})


def build_arch(name: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A tiny model of architecture ``name`` with fixed weights, in ``dtype``, in eval mode."""
    import transformers

    model = getattr(transformers, ARCHS[name][1])(arch_config(name, **overrides))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model.to(dtype).eval()


def batch_for(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed batch of 2 x 8 tokens (vocab 64) with labels, for any architecture."""
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``arch_dir(name)``: the float32 model of ``name`` saved with ``save_pretrained`` (once)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"arch_{name}")
            build_arch(name).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``arch_name`` over the matrix, ``causal_arch`` over its causal LMs and
    ``moe_arch`` over its mixture-of-experts models."""
    for fixture, names in (("arch_name", list(ARCHS)), ("causal_arch", CAUSAL), ("moe_arch", MOE)):
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, names)


@pytest.fixture(scope="session")
def archs() -> SimpleNamespace:
    """The helpers of this conftest, for test modules (a conftest is not importable)."""
    return SimpleNamespace(ARCHS=ARCHS, MOE=MOE, config=arch_config, build=build_arch,
                           batch=batch_for)
