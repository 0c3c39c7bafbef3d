"""Gradient accumulation: one optimizer step over micro-batches, weighted by label tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

from spdelta.errors import ParameterError

__all__ = ["MicroBatches", "accumulate", "label_tokens", "micro_batches"]

Batch = Mapping[str, Any]


class MicroBatches(NamedTuple):
    """The batch of one optimizer step, given as micro-batches that run one at a time.

    A train step (:func:`~spdelta.train.make_train_step`,
    :func:`~spdelta.train.make_spiel_step`) takes it wherever it takes a batch: it runs
    forward and backward on each micro-batch in turn (so activations are those of one
    micro-batch) and sums the gradients and losses weighted by ``weights``.

    Attributes:
        batches: The micro-batches (keyword arguments of the model's forward).
        weights: Each micro-batch's share of the step's loss, summing to 1.
    """

    batches: tuple[Batch, ...]
    weights: tuple[float, ...]


def label_tokens(batch: Batch) -> int:
    """The number of tokens a Hugging Face causal-LM loss averages over in ``batch``.

    ``shift_labels`` entries other than -100 when the batch has them, else the entries
    of ``labels[:, 1:]`` other than -100 (the model shifts ``labels`` by one).

    Raises:
        ParameterError: The batch has neither ``shift_labels`` nor ``labels``.

    Example:
        >>> import torch
        >>> label_tokens({"labels": torch.tensor([[5, -100, 7, 8]])})
        2
    """
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != -100).sum())
    if "labels" in batch:
        return int((batch["labels"][..., 1:] != -100).sum())
    raise ParameterError("micro_batches: a batch without labels or shift_labels; pass weights.")


def micro_batches(batches: Sequence[Batch], *, weights: Sequence[float] | None = None
                  ) -> MicroBatches:
    """Group ``batches`` into one step whose loss is the loss of all of them as one batch.

    A causal-LM loss is a mean over label tokens, so one batch made of micro-batches
    with ``n_i`` label tokens each has the loss ``sum_i (n_i / N) * loss_i`` with ``N =
    sum_i n_i``, and the same gradient. By default the weights are those ``n_i / N``
    (:func:`label_tokens`); a plain mean over micro-batches would over-weight the
    tokens of micro-batches with short responses.

    Args:
        batches: One or more micro-batches.
        weights: Explicit shares (e.g. ``1/k`` each for losses that are means over
            examples); normalised to sum to 1.

    Returns:
        A :class:`MicroBatches`.

    Raises:
        ParameterError: No batches, a negative weight, weights summing to 0 (no label
            token at all), or as many weights as batches missing.

    Example:
        >>> import torch
        >>> a = {"labels": torch.tensor([[1, 2, 3]])}       # 2 label tokens
        >>> b = {"labels": torch.tensor([[1, 2, -100]])}    # 1
        >>> micro_batches([a, b]).weights
        (0.6666666666666666, 0.3333333333333333)
    """
    raw = [float(w) for w in weights] if weights is not None else [
        float(label_tokens(b)) for b in batches]
    if not batches or len(raw) != len(batches) or min(raw) < 0 or sum(raw) <= 0:
        raise ParameterError(f"micro_batches: expected one or more batches with non-negative "
                             f"weights that do not all vanish; found {len(batches)} batches, "
                             f"weights {raw}.")
    total = sum(raw)
    return MicroBatches(tuple(batches), tuple(w / total for w in raw))


def _scaled(x: Any, w: float) -> Any:
    if isinstance(x, Tensor):
        return x * w
    return {n: t * w for n, t in x.items()}


def _added(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return a.add_(b)
    for n, t in b.items():
        a[n] = a[n].add_(t) if n in a else t
    return a


def accumulate(fn: Callable[[Batch], tuple[Any, ...]], batch: Batch | MicroBatches
               ) -> tuple[Any, ...]:
    """``fn(batch)``, or for :class:`MicroBatches` the weighted sum of ``fn`` over them.

    Args:
        fn: ``fn(batch) -> (out_1, ..., out_k)``, each a tensor or a dict of tensors
            (gradients, a loss).
        batch: One batch (``fn`` runs once, its result returned as is) or micro-batches
            (``fn`` runs on each with a non-zero weight; outputs are summed, each
            scaled by its weight, into tensors allocated here).

    Returns:
        The outputs of ``fn``, accumulated.

    Example:
        >>> import torch
        >>> mb = MicroBatches(({"x": 1.0}, {"x": 3.0}), (0.25, 0.75))
        >>> accumulate(lambda b: (torch.tensor(b["x"]),), mb)[0].item()
        2.5
    """
    if not isinstance(batch, MicroBatches):
        return fn(batch)
    total: tuple[Any, ...] | None = None
    for mb, w in zip(batch.batches, batch.weights, strict=True):
        if w == 0:  # no label token: its mean loss is 0/0
            continue
        out = tuple(_scaled(x, w) for x in fn(mb))
        total = out if total is None else tuple(_added(a, b) for a, b in zip(total, out,
                                                                              strict=True))
    if total is None:
        raise ParameterError("accumulate: every micro-batch has weight 0.")
    return total
