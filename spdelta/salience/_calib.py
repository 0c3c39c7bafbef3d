"""Calibration plumbing shared by the metrics: example budgets, forward, losses, mean gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from spdelta._progress import tqdm
from spdelta.errors import SpdeltaError
from spdelta.rules import accumulate_dtype
from spdelta.types import Params

__all__ = ["Calibration", "LossCallable", "batch_loss", "batch_size", "causal_lm_loss",
           "drain_grads", "examples", "forward", "grad_of", "mean_gradient", "params_of",
           "prepare_grads"]

LossCallable = Callable[[Any, Mapping[str, Any]], Tensor]
Batch = Mapping[str, Any]


class Calibration(NamedTuple):
    """Everything a salience metric may use; built by :func:`spdelta.salience.score`.

    Attributes:
        model: The module whose ``forward`` takes a batch as keyword arguments.
        base: Name -> tensor for the parameters (buffers the dict lacks come from ``model``).
        targets: Sorted names of the weights to score (all in ``base``).
        batches: Iterable of batch dicts (keyword arguments of ``model.forward``).
        num_examples: Number of examples to consume at most (rows of the batches).
        generator: Source of randomness, or ``None`` for the default generator.
        loss: ``loss(output, batch) -> scalar``; ``None`` uses ``output.loss``.
        progress: Show a tqdm progress bar.
    """

    model: nn.Module
    base: Mapping[str, Tensor]
    targets: list[str]
    batches: Iterable[Batch]
    num_examples: int
    generator: torch.Generator | None
    loss: LossCallable | None
    progress: bool


def batch_size(batch: Batch) -> int:
    """Number of examples in ``batch``: the leading size of its first tensor with a dim.

    Example:
        >>> import torch
        >>> batch_size({"input_ids": torch.zeros(3, 5, dtype=torch.long)})
        3
    """
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise SpdeltaError(f"calibration batch with keys {sorted(batch)}: expected at least one "
                       "tensor with a leading batch dimension; found none.")


def _head(batch: Batch, n: int, size: int) -> dict[str, Any]:
    """The first ``n`` examples of a batch of ``size`` (non-batched entries kept)."""
    return {k: v[:n] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v
            for k, v in batch.items()}


def examples(cal: Calibration, *, desc: str) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield ``(batch, n)`` until ``cal.num_examples`` examples; the last batch is cut.

    Shows a tqdm bar counting examples when ``cal.progress``.
    """
    left = cal.num_examples
    with tqdm(total=cal.num_examples, desc=desc, unit="ex", disable=not cal.progress) as bar:
        for batch in cal.batches:
            size = batch_size(batch)
            if size == 0:
                continue
            n = min(size, left)
            yield (_head(batch, n, size) if n < size else dict(batch)), n
            left -= n
            bar.update(n)
            if left <= 0:  # stop before drawing another batch from the iterable
                break


def params_of(cal: Calibration) -> Params:
    """Detached ``base`` plus the model's buffers that ``base`` lacks (no copies)."""
    buffers = {k: v for k, v in cal.model.named_buffers() if k not in cal.base}
    return {**buffers, **{k: v.detach() for k, v in cal.base.items()}}


def forward(cal: Calibration, params: Mapping[str, Tensor], batch: Batch) -> Any:
    """``functional_call(model, params, kwargs=batch, strict=True)``."""
    return functional_call(cal.model, dict(params), args=(), kwargs=dict(batch), strict=True)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy; labels ``-100`` are ignored (the HF convention).

    Computed in fp32 (fp64 for fp64 logits; Hugging Face's own loss always uses fp32).

    Args:
        logits: ``(batch, seq, vocab)`` float.
        labels: ``(batch, seq)`` int64, unshifted (position ``t`` predicts ``labels[t+1]``).

    Example:
        >>> import torch
        >>> round(float(causal_lm_loss(torch.zeros(1, 3, 4), torch.tensor([[1, 2, 3]]))), 4)
        1.3863
    """
    shifted = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(shifted.to(accumulate_dtype(shifted.dtype)), labels[:, 1:].flatten(),
                           ignore_index=-100)


def batch_loss(cal: Calibration, params: Mapping[str, Tensor], batch: Batch, *,
               temperature: float | None = None) -> Tensor:
    """The scalar loss of ``batch``; with ``temperature`` the logits are divided by it first.

    With a temperature and no ``cal.loss``, the model runs without ``labels`` and the
    loss is :func:`causal_lm_loss` of the tempered logits. With ``cal.loss``, it receives
    the output with tempered logits (a tensor output is divided directly).
    """
    if temperature is None:
        out = forward(cal, params, batch)
        return out.loss if cal.loss is None else cal.loss(out, batch)
    if cal.loss is None:
        if "labels" not in batch:
            raise SpdeltaError("a tempered loss without a loss function needs 'labels' in the "
                               f"batch (causal LM); found keys {sorted(batch)}. Pass loss=.")
        out = forward(cal, params, {k: v for k, v in batch.items() if k != "labels"})
        return causal_lm_loss(out.logits / temperature, batch["labels"])
    out = forward(cal, params, batch)
    if isinstance(out, Tensor):
        return cal.loss(out / temperature, batch)
    fields = {k: v for k, v in out.items() if k != "loss"}
    return cal.loss(type(out)(**{**fields, "logits": out.logits / temperature}), batch)


def mean_gradient(cal: Calibration, *, temperature: float | None = None,
                  desc: str = "gradient") -> tuple[Params, int]:
    """Mean gradient ``g = sum_b n_b * grad L_b / sum_b n_b`` of the targets, and ``sum_b n_b``.

    ``L_b`` is the loss of batch ``b`` (a mean over its ``n_b`` examples), so ``g`` is
    the mean per-example gradient when every example weighs the same in its batch.
    Gradients accumulate in place in fp32 (fp64 for fp64 weights): one dense tensor
    per target (bf16/fp16 weights: an fp32 accumulator plus the transient ``.grad``).
    Non-target parameters get no gradient.

    Raises:
        SpdeltaError: The batches held no example.
    """
    params = params_of(cal)
    leaves = {n: params[n].detach().requires_grad_() for n in cal.targets}
    acc: Params = {}
    total = 0
    for batch, n in examples(cal, desc=desc):
        prepare_grads(leaves, n)
        with torch.enable_grad():
            batch_loss(cal, {**params, **leaves}, batch, temperature=temperature).backward()
        total += n
        drain_grads(leaves, acc, n)
    if total == 0:
        raise SpdeltaError("salience: the calibration batches held no example; pass a "
                           "non-empty, re-iterable iterable of batch dicts.")
    return {n: grad_of(leaves[n], acc.get(n)).div_(total) for n in cal.targets}, total


def grad_of(leaf: Tensor, accumulated: Tensor | None) -> Tensor:
    """The accumulated gradient of ``leaf``: ``accumulated`` if given, else ``leaf.grad``."""
    grad = accumulated if accumulated is not None else leaf.grad
    if grad is None:  # pragma: no cover - drain_grads always leaves one
        raise SpdeltaError("salience: internal error, a target has no accumulated gradient.")
    return grad.detach()


def prepare_grads(leaves: Params, n: int) -> None:
    """Divide in-place accumulators by the next batch's weight ``n`` (see :func:`drain_grads`).

    A leaf whose ``.grad`` accumulates in place holds ``S / n`` before ``backward`` adds
    the unscaled batch gradient ``g``, and ``drain_grads`` multiplies by ``n`` after:
    ``S + n g`` without scaling the loss, so the gradient itself is computed exactly as
    a plain ``backward`` would (a scaled loss changes rounding in fp32 sub-graphs).
    """
    for leaf in leaves.values():
        if leaf.grad is not None:
            leaf.grad.div_(n)


def drain_grads(leaves: Params, acc: Params, n: int) -> None:
    """Finish a batch of weight ``n``: ``.grad *= n`` in place, or move it into fp32 ``acc``.

    Leaves whose dtype is the accumulation dtype (fp32, fp64) accumulate in ``.grad``;
    others (bf16, fp16) are added to ``acc[name]`` in fp32 and their ``.grad`` cleared.
    """
    for name, leaf in leaves.items():
        dtype = accumulate_dtype(leaf.dtype)
        if leaf.grad is None:  # the target did not influence the loss
            if leaf.dtype == dtype:
                leaf.grad = torch.zeros_like(leaf)
            elif name not in acc:
                acc[name] = torch.zeros_like(leaf, dtype=dtype)
        elif leaf.grad.dtype == dtype:
            leaf.grad.mul_(n)
        else:
            g = leaf.grad.to(dtype)
            acc[name] = acc[name].add_(g, alpha=n) if name in acc else g.mul_(n)
            leaf.grad = None
