"""Shared fixtures: tiny deterministic models built from configs (never the network)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn


def fixed_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a deterministic value from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.2)
    return module


class TinyMLP(nn.Module):
    """Two linear layers with a ReLU, returning logits (peft's test MLP)."""

    def __init__(self, d_in: int = 10, d_hidden: int = 20, d_out: int = 2) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_out)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return self.lin1(self.relu(self.lin0(input)))


@pytest.fixture
def tiny_mlp() -> nn.Module:
    """A float64 ``TinyMLP`` with fixed weights."""
    return fixed_init_(TinyMLP().double())


def make_tiny_llama(tie: bool = False, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 2-layer, hidden-32, vocab-64 ``LlamaForCausalLM`` with fixed weights (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=64, tie_word_embeddings=tie,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(dtype)
    return fixed_init_(model).eval()


@pytest.fixture
def tiny_llama() -> nn.Module:
    """A float64 tiny Llama causal LM with untied embeddings."""
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_tied() -> nn.Module:
    """A float64 tiny Llama causal LM whose ``lm_head`` is tied to the embeddings."""
    return make_tiny_llama(tie=True)


@pytest.fixture
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A saved tiny Llama checkpoint directory (float32, safetensors), shared by the session."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(dtype=torch.float32).save_pretrained(path)
    yield str(path)


@pytest.fixture
def token_batch() -> dict[str, torch.Tensor]:
    """A fixed batch of 3 sequences of 8 tokens with labels (vocab 64)."""
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def save_tiny_lm(path: str, *, chat_template: bool = False,
                 build: Callable[[dict[str, int]], nn.Module] | None = None) -> str:
    """Save a tiny float32 Llama with a real byte-level BPE tokenizer (no merges) to ``path``.

    The tokenizer maps every byte to its own token (ids 0..255) plus ``<pad>``,
    ``<s>``, ``</s>``, so any text encodes; with ``chat_template`` it also carries a
    minimal chat template. Everything is built locally (no hub). ``build`` makes another
    architecture instead: it gets ``vocab_size``, ``pad_token_id``, ``bos_token_id`` and
    ``eos_token_id`` and returns the model (given fixed weights here).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<pad>", "<s>", "</s>"):
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    if chat_template:
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                             "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
    tok.save_pretrained(path)
    ids = {"vocab_size": len(vocab), "pad_token_id": vocab["<pad>"],
           "bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"]}
    if build is not None:
        fixed_init_(build(ids)).save_pretrained(path)
        return path
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                      max_position_embeddings=128, pad_token_id=vocab["<pad>"],
                      bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    fixed_init_(LlamaForCausalLM(cfg)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_saver() -> Callable[..., str]:
    """:func:`save_tiny_lm`, for test modules (conftest is not importable from them)."""
    return save_tiny_lm


@pytest.fixture(scope="session")
def fixed_init() -> Callable[[nn.Module], nn.Module]:
    """:func:`fixed_init_`, for test modules."""
    return fixed_init_


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny causal LM with a byte-level tokenizer (no chat template)."""
    return save_tiny_lm(str(tmp_path_factory.mktemp("tiny_lm")))


@pytest.fixture(scope="session")
def tiny_chat_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like ``tiny_lm_dir``, with a chat template in the tokenizer."""
    return save_tiny_lm(str(tmp_path_factory.mktemp("tiny_chat_lm")), chat_template=True)


def write_sums(path: Path, rows: int) -> Path:
    """Write ``rows`` seeded prompt/response lines (``add a b`` -> ``a+b``, a and b in 0..4)."""
    gen = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for a, b in torch.randint(0, 5, (rows, 2), generator=gen).tolist():
            f.write(json.dumps({"prompt": f"add {a} {b}", "response": str(a + b)}) + "\n")
    return path


@pytest.fixture(scope="session")
def sums_file() -> Callable[[Path, int], Path]:
    """:func:`write_sums`, for test modules (conftest is not importable from them)."""
    return write_sums

