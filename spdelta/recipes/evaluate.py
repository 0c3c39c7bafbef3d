"""Evaluating a causal LM on prompt/response data: held-out loss and accuracy over label choices."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from spdelta.errors import DataError
from spdelta.recipes.data import (
    SENTIMENT_SYSTEM,
    SENTIMENT_WORDS,
    batch_to,
    encode_prompt_response,
    sentiment_prompt,
)

__all__ = ["choice_accuracy", "evaluate_pairs", "response_nll", "sentiment_accuracy"]

#: ``forward(batch) -> logits``: the model's logits ``(B, K, vocab)`` at the kept positions.
Forward = Callable[[dict[str, Any]], Tensor]


def response_nll(logits: Tensor, shift_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed negative log-likelihood of the label tokens, and their count.

    Args:
        logits: ``(B, K, vocab)`` logits at the kept positions, any float dtype.
        shift_labels: ``(B, K)`` int64 targets of those positions, -100 where none.

    Returns:
        ``(nll, tokens)``: ``(B,)`` float64 sums of ``-log p(target)`` over the row's
        label tokens (log-softmax taken in float64), and ``(B,)`` int64 counts.

    Example:
        >>> import torch
        >>> nll, n = response_nll(torch.zeros(1, 2, 4), torch.tensor([[3, -100]]))
        >>> round(float(nll[0]), 4), int(n[0])
        (1.3863, 1)
    """
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    mask = shift_labels != -100
    picked = logp.gather(-1, shift_labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * mask).sum(dim=1), mask.sum(dim=1)


def _row_nll(forward: Forward, batch: dict[str, Any], device: torch.device | str
             ) -> tuple[Tensor, Tensor]:
    targets = batch.pop("shift_labels")
    del batch["labels"]  # the loss is taken here, in float64, per row
    with torch.no_grad():
        logits = forward(batch_to(batch, device))
    return response_nll(logits.cpu(), targets)


def evaluate_pairs(
    forward: Forward,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    labels: Sequence[int] | None = None,
    choices: Sequence[str] | None = None,
    system: str | None = None,
    chat_template: str | None = "auto",
    batch_size: int = 16,
    max_length: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Held-out loss of the responses, and with label choices, accuracy by scoring each choice.

    The loss is the token-mean next-token loss over every response token of the data
    (EOS included), as training computes it over one batch. With ``labels`` and
    ``choices`` (text + label data), each prompt is encoded once per choice and the
    choice with the largest summed log-likelihood of its response tokens (EOS
    included) is the prediction; the response of row ``i`` is ``choices[labels[i]]``.
    Encoding follows :func:`spdelta.recipes.data.encode_prompt_response`, as in training.

    Args:
        forward: ``forward(batch) -> logits`` of the model at ``logits_to_keep``
            positions, e.g. ``lambda b: model(**b).logits``; run under ``no_grad``.
        tokenizer: The model's tokenizer.
        prompts: Prompt texts.
        responses: Response texts (prompt + response data); with ``choices``, leave
            ``None``.
        labels: Label ids (text + label data), indices into ``choices``.
        choices: Response text of each label id.
        system: System message for chat templates.
        chat_template: ``"auto"``, ``"none"`` or a Jinja template's text.
        batch_size: Prompts per forward pass.
        max_length: Maximum tokens per sequence.
        device: Where the batches go.

    Returns:
        ``loss`` (token mean), ``nll_sum`` and ``tokens`` (its parts) and ``examples``;
        with choices also ``accuracy`` and ``correct``.

    Raises:
        DataError: Neither ``responses`` nor ``labels`` + ``choices``, or lengths differ.

    Example:
        >>> fwd = lambda b: model(**b).logits  # doctest: +SKIP
        >>> evaluate_pairs(fwd, tok, ["2+2?"], ["4"])["loss"]  # doctest: +SKIP
    """
    by_choice = labels is not None and choices is not None
    if by_choice == (responses is not None) or len(labels or responses or []) != len(prompts):
        raise DataError(f"evaluate: pass responses, or labels and choices, one per prompt; found "
                        f"{len(prompts)} prompts, responses={responses is not None}, "
                        f"labels={labels is not None}, choices={choices is not None}.")
    kw: dict[str, Any] = {"max_length": max_length, "system": system,
                          "chat_template": chat_template}
    nll_sum, tokens, correct = 0.0, 0, 0
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        if not by_choice:
            assert responses is not None
            nll, n = _row_nll(forward, encode_prompt_response(
                tokenizer, chunk, list(responses[i:i + batch_size]), **kw), device)
            nll_sum, tokens = nll_sum + float(nll.sum()), tokens + int(n.sum())
            continue
        assert labels is not None and choices is not None
        truth = torch.tensor(list(labels[i:i + batch_size]))
        scores, counts = zip(*(_row_nll(forward, encode_prompt_response(
            tokenizer, chunk, [c] * len(chunk), **kw), device) for c in choices), strict=True)
        nll_all, n_all = torch.stack(scores, dim=1), torch.stack(counts, dim=1)  # (b, choices)
        rows = torch.arange(len(chunk))
        nll_sum += float(nll_all[rows, truth].sum())
        tokens += int(n_all[rows, truth].sum())
        correct += int((nll_all.argmin(dim=1) == truth).sum())  # the first of tied choices
    out = {"loss": nll_sum / max(tokens, 1), "nll_sum": nll_sum, "tokens": float(tokens),
           "examples": float(len(prompts))}
    if by_choice:
        out.update(accuracy=correct / max(len(prompts), 1), correct=float(correct))
    return out


@torch.no_grad()
def choice_accuracy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[int],
    choices: Sequence[str],
    *,
    system: str | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> float:
    """Accuracy read off one forward pass: the choice whose first token has the largest logit.

    At the position before each response (chat layout, ``chat_template="auto"``), the
    logits of the first tokens of the ``choices`` are compared: a ``k``-way classifier
    read off the language model, zero-shot or after training. It needs one forward
    pass per prompt, against one per choice for :func:`evaluate_pairs`' full-response
    scoring, and reads only the first token. The prompt tokens that every row of a
    batch shares (chat template and instruction) are run once and reused as a
    key/value cache when the model takes one (``cache`` from transformers 5.25,
    ``past_key_values`` before); the logits equal a plain forward pass up to rounding.

    Args:
        model: A causal LM returning ``.logits`` (``(B, T, vocab)``).
        tokenizer: Its tokenizer.
        prompts: Prompt texts.
        labels: The true choice of each prompt (index into ``choices``).
        choices: Response texts; their first tokens must differ.
        system: System message for chat templates.
        batch_size: Prompts per forward pass.
        max_length: Maximum tokens per sequence.
        progress: Show a progress bar.

    Returns:
        The fraction of prompts whose true choice has the largest first-token logit.

    Raises:
        DataError: Two choices start with the same token.

    Example:
        >>> choice_accuracy(model, tok, ["Good?"], [1], ["no", "yes"])  # doctest: +SKIP
        1.0
    """
    first = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    if len(set(first)) < len(first):
        raise DataError(f"choice_accuracy: choices {list(choices)} do not all start with "
                        "different tokens; score whole responses with evaluate_pairs instead.")
    # Longest prompts first, so that each batch pads little and the peak comes first; the
    # accuracy does not depend on the order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    cache_kw = _cache_keyword(model)
    prefix = _SharedPrefix(model, cache_kw) if cache_kw else None
    device = next(model.parameters()).device
    correct = 0
    for start in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress,
                      leave=False):
        idx = order[start:start + batch_size]
        batch = encode_prompt_response(tokenizer, [prompts[i] for i in idx],
                                       [choices[labels[i]] for i in idx],
                                       max_length=max_length, system=system)
        targets = batch.pop("shift_labels")
        del batch["labels"]  # no loss needed
        batch = batch_to(batch, device)
        at = (targets != -100).int().argmax(dim=1)  # the kept position predicting the answer
        rows = torch.arange(len(idx))
        if prefix is not None:
            batch = prefix.inputs(batch)
        scores = model(**batch).logits[rows, at][:, first].cpu()
        truth = torch.tensor([labels[i] for i in idx])
        correct += int((scores.argmax(dim=1) == truth).sum())
    return correct / len(prompts)


def sentiment_accuracy(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> float:
    """:func:`choice_accuracy` on Rotten Tomatoes rows: ``"negative"`` vs ``"positive"``.

    Args:
        model: A causal LM returning ``.logits``.
        tokenizer: Its tokenizer.
        dataset: Rows with ``text`` and ``label`` (0 negative, 1 positive).
        batch_size: Reviews per forward pass.
        max_length: Maximum tokens per sequence.
        progress: Show a progress bar.

    Returns:
        The fraction of reviews classified correctly, in ``[0, 1]``.

    Example:
        >>> sentiment_accuracy(model, tok, splits["test"])  # doctest: +SKIP
        0.83
    """
    return choice_accuracy(model, tokenizer, [sentiment_prompt(t) for t in dataset["text"]],
                           list(dataset["label"]), SENTIMENT_WORDS, system=SENTIMENT_SYSTEM,
                           batch_size=batch_size, max_length=max_length, progress=progress)


def _cache_keyword(model: Any) -> str | None:
    """The keyword ``model.forward`` takes a key/value cache by, or None if it takes none.

    transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name still works
    but warns); older releases only know ``past_key_values``.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


class _SharedPrefix:
    """The key/value cache of the tokens that open every row of a left-padded batch.

    ``inputs(batch)`` returns the batch's keyword arguments with that prefix cut off
    and replaced by the cache keyword (``cache_kw``): a copy of the prefix cache,
    computed once per distinct prefix, repeated over the rows. The suffixes stay
    left-padded (the attention mask holds the gap) and keep their original position ids.
    """

    def __init__(self, model: Any, cache_kw: str) -> None:
        self.model = model
        self.cache_kw = cache_kw
        self.key: tuple[int, ...] = ()
        self.cache: Any = None

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids, mask, keep = batch["input_ids"], batch["attention_mask"], batch.get("logits_to_keep")
        if not isinstance(keep, int) or keep < 1:
            return batch
        rows, width = ids.shape
        starts = width - mask.sum(dim=1)  # left padding per row
        n = int(width - starts.max()) - keep  # the kept positions stay in every row's suffix
        if n < 1:
            return batch
        toks = ids.gather(1, starts[:, None] + torch.arange(n, device=ids.device)[None])
        p = int((toks == toks[:1]).all(dim=0).int().cumprod(dim=0).sum())
        if p < 1:
            return batch
        key = tuple(toks[0, :p].tolist())
        if key != self.key:
            out = self.model(input_ids=toks[:1, :p], use_cache=True)
            # The output names the cache as the forward's keyword does.
            self.key, self.cache = key, out[self.cache_kw]
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        suffix_mask = (torch.arange(width - p, device=ids.device)[None] >= starts[:, None]).long()
        positions = p + (suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {**batch, "input_ids": ids[:, p:], "position_ids": positions,
                "attention_mask": torch.cat([mask.new_ones(rows, p), suffix_mask], dim=1),
                self.cache_kw: cache, "use_cache": True}


