"""``TextServer``: prompts in, completions out, each prompt with its own delta (or none)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from spdelta.serve._load import DeltaSource, ServeError
from spdelta.serve.model import DeltaModel

__all__ = ["TextServer"]


class TextServer:
    """A tokenizer and a :class:`DeltaModel`: greedy completions for a batch of text prompts.

    Args:
        delta_model: The model with its deltas loaded.
        tokenizer: The model's Hugging Face tokenizer (its padding side is set to left;
            a missing pad token becomes the EOS token).

    Example:
        >>> server = TextServer.load("ckpt/", {"sql": "sql.st"})  # doctest: +SKIP
        >>> server.complete(["List the tables.", "Hi!"], ["sql", None])  # doctest: +SKIP
        [('SELECT name FROM ...', 64), ('Hello! How can I help?', 9)]
    """

    def __init__(self, delta_model: DeltaModel, tokenizer: Any) -> None:
        self.delta_model, self.tokenizer = delta_model, tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], deltas: Mapping[str, DeltaSource], *,
             dtype: torch.dtype = torch.float32, check_base: bool = True) -> TextServer:
        """Load a causal LM checkpoint, its tokenizer and the deltas.

        Args:
            model_dir: A Hugging Face checkpoint directory (or a cached hub id).
            deltas: Name -> delta file (or ``SparseDelta``).
            dtype: Weight dtype (fp32 or bf16).
            check_base: Refuse deltas whose base fingerprint differs from the model's.

        Raises:
            OSError: The checkpoint cannot be read.
            SpdeltaError: A delta cannot be served on this model (see :meth:`DeltaModel.add`).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.eval().requires_grad_(False)
        return cls(DeltaModel(model, deltas, check_base=check_base), tokenizer)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def complete(self, prompts: Sequence[str], deltas: Sequence[str | None], *,
                 max_new_tokens: int = 64, chat: bool = False) -> list[tuple[str, int]]:
        """Greedy completions of ``prompts``, prompt ``i`` with delta ``deltas[i]``, in one batch.

        Args:
            prompts: The prompts.
            deltas: One loaded delta name or ``None`` (the base) per prompt.
            max_new_tokens: The most tokens generated for a prompt (fewer at EOS).
            chat: Wrap each prompt as a user message with the tokenizer's chat template.

        Returns:
            ``(completion text, number of new tokens)`` per prompt; the count includes a
            final EOS token, the text leaves special tokens out.

        Raises:
            ServeError: ``chat`` and the tokenizer has no chat template.
        """
        tok = self.tokenizer
        if chat:
            if not self.has_chat_template:
                raise ServeError("chat=True but the tokenizer has no chat template; "
                                 "pass the prompts as plain text (chat=False).")
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
            batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            batch = tok(list(prompts), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.delta_model.generate(**batch, deltas=list(deltas), do_sample=False,
                                            max_new_tokens=max_new_tokens,
                                            pad_token_id=tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        done = []
        for row in new:
            stop = (row == tok.eos_token_id).nonzero()
            count = int(stop[0]) + 1 if len(stop) else int(row.numel())
            done.append((tok.decode(row[:count], skip_special_tokens=True), count))
        return done
