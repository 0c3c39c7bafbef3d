"""A training job's evaluation: held-out rows, evaluation every few steps, the best step's state.

The held-out rows come from ``--eval-data``, ``--eval-split`` or ``--eval-fraction``
(carved from the training rows with the seed). Every ``--eval-every`` steps and at the
end, :func:`spdelta.recipes.evaluate.evaluate_pairs` gives the held-out loss and, for text +
label data, the accuracy by scoring each label's response. Under ``torchrun`` (data
parallel) each rank evaluates its share of the rows and the sums are reduced. With
``--keep best`` the state of the best evaluation (highest accuracy, else lowest loss;
the earliest on ties) is kept in memory, saved with each checkpoint under
``<checkpoint>/best`` and written instead of the last state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from spdelta.dist import load_checkpoint, save_checkpoint
from spdelta.errors import DataError, ParameterError
from spdelta.recipes._job_config import TrainConfig
from spdelta.recipes.data import load_table
from spdelta.recipes.evaluate import evaluate_pairs
from spdelta.train import SpielState

Forward = Callable[[dict[str, Any]], torch.Tensor]


def read_chat_template(cfg: TrainConfig) -> tuple[str, str]:
    """``(chat_template argument for encoding, what the delta's record says)``."""
    if cfg.chat_template in ("auto", "none"):
        return cfg.chat_template, cfg.chat_template
    text = Path(cfg.chat_template).read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text, f"file {Path(cfg.chat_template).name} sha256:{digest}"


def split_off(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows ``0..n-1`` split into (train, eval): ``ceil(fraction * n)`` eval rows drawn by the seed.

    Example:
        >>> train, held = split_off(10, 0.2, seed=0)
        >>> len(train), len(held), sorted(train + held) == list(range(10))
        (8, 2, True)
    """
    k = math.ceil(fraction * n)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 977)  # not the data order's stream
    perm = torch.randperm(n, generator=gen).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def label_choices(cfg: TrainConfig, rows: Any, responses: Sequence[str]) -> list[str]:
    """The response text of every label: ``--label-names``, the ClassLabel names, or the values."""
    if cfg.label_names is not None:
        return list(cfg.label_names)
    feature: Any = (getattr(rows, "features", None) or {}).get(cfg.label_column)
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted(set(responses))


@dataclass(frozen=True)
class EvalSet:
    """Held-out rows as the job encodes them, with label ids where the data has labels."""

    prompts: list[str]
    responses: list[str]
    labels: list[int] | None
    choices: list[str] | None

    @property
    def metric(self) -> str:
        """What ``--keep best`` compares: ``eval_accuracy`` (higher) or ``eval_loss`` (lower)."""
        return "eval_accuracy" if self.choices is not None else "eval_loss"


def eval_set(cfg: TrainConfig, prompts: list[str], responses: list[str], fmt: str,
             choices: list[str] | None) -> EvalSet:
    """An :class:`EvalSet`; text + label rows score every choice."""
    if not prompts:
        raise DataError("evaluation data: no rows; pass --eval-data with rows, or a larger "
                        "--eval-fraction.")
    if fmt != "text_label" or choices is None:
        return EvalSet(prompts, responses, None, None)
    unknown = sorted(set(responses) - set(choices))
    if unknown:
        raise DataError(f"evaluation data: labels {unknown[:5]} are not among the training "
                        f"labels {choices}; pass --label-names with every label.")
    return EvalSet(prompts, responses, [choices.index(r) for r in responses], choices)


def load_eval_rows(cfg: TrainConfig) -> Any:
    """The rows of ``--eval-data`` or ``--eval-split`` (the job carves ``--eval-fraction``)."""
    if cfg.eval_data is not None:
        return load_table(cfg.eval_data, split=cfg.split)
    if Path(cfg.data).is_file():
        raise ParameterError(f"--eval-split {cfg.eval_split!r}: --data {cfg.data!r} is a file, "
                             "which has one split; pass --eval-data FILE or --eval-fraction.")
    return load_table(cfg.data, split=str(cfg.eval_split))


class Evaluator:
    """Evaluates a forward function on this rank's share of an :class:`EvalSet`."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, data: EvalSet, chat_template: str,
                 rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.tokenizer, self.data = cfg, tokenizer, data
        self.chat_template, self.rank, self.world, self.device = chat_template, rank, world, device

    def __call__(self, forward: Forward) -> dict[str, float]:
        d, share = self.data, slice(self.rank, None, self.world)
        kw: dict[str, Any] = {"system": self.cfg.system, "chat_template": self.chat_template,
                              "batch_size": self.cfg.micro_batch_size or self.cfg.batch_size,
                              "max_length": self.cfg.max_length, "device": self.device}
        if d.labels is None:
            out = evaluate_pairs(forward, self.tokenizer, d.prompts[share], d.responses[share],
                                 **kw)
        else:
            out = evaluate_pairs(forward, self.tokenizer, d.prompts[share],
                                 labels=d.labels[share], choices=d.choices, **kw)
        sums = torch.tensor([out["nll_sum"], out["tokens"], out.get("correct", 0.0),
                             out["examples"]], dtype=torch.float64)
        if self.world > 1:
            sums = _all_reduce(sums, self.device)
        nll, tokens, correct, examples = sums.tolist()
        rec = {"eval_loss": nll / max(tokens, 1.0)}
        if d.labels is not None:
            rec["eval_accuracy"] = correct / max(examples, 1.0)
        return rec


def _all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = t.to(device) if dist.get_backend() == "nccl" else t
    dist.all_reduce(moved)
    return moved.cpu()


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` on ``metric`` (strictly: ties keep the earlier step)."""
    if old is None:
        return True
    return new > old if metric == "eval_accuracy" else new < old


def best_from_log(log: Sequence[dict[str, float]], metric: str) -> tuple[int, float] | None:
    """The (step, value) of the best evaluation recorded in a job's log, if any."""
    best: tuple[int, float] | None = None
    for rec in log:
        if metric in rec and better(metric, rec[metric], best[1] if best else None):
            best = (int(rec["step"]), rec[metric])
    return best


def snapshot(state: SpielState) -> SpielState:
    """A copy of the trained part of ``state`` (values and support) that later steps leave alone."""
    return SpielState({n: v.detach().clone() for n, v in state.values.items()},
                      {n: i.clone() for n, i in state.support.items()}, None, state.step, {}, None)


def save_best(ckpt: Path, best: SpielState) -> None:
    """Save the kept state with the checkpoint (every rank calls it, as for the state)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    save_checkpoint(best, ckpt / "best")


def load_best(ckpt: Path, step: int) -> SpielState | None:
    """The kept state saved with a checkpoint, if it is the one of ``step``.

    A crash after saving ``best`` and before the state may leave a later best on disk
    than the log knows; the resumed run then meets that step again and keeps it anew.
    """
    if not (ckpt / "best").is_dir():
        return None
    state = load_checkpoint(ckpt / "best")
    return state if isinstance(state, SpielState) and state.step == step else None


class EvalHook:
    """Evaluation every ``every`` steps and at the end; the best state when ``keep_best``."""

    def __init__(self, evaluator: Evaluator | None, data: EvalSet | None, every: int | None,
                 total: int, keep_best: bool) -> None:
        self.evaluator, self.total, self.keep_best = evaluator, total, keep_best
        self.every = every or max(1, total // 10)
        self.metric = data.metric if data is not None else "eval_loss"
        self.best: SpielState | None = None
        self.best_at: tuple[int, float] | None = None
        self.unsaved = False

    def resume(self, log: Sequence[dict[str, float]], ckpt: Path) -> None:
        """The best evaluation of the log so far, and its state from the checkpoint."""
        self.best_at = best_from_log(log, self.metric)
        if self.keep_best and self.best_at is not None:
            self.best = load_best(ckpt, self.best_at[0])

    def __call__(self, state: SpielState, forward: Callable[[SpielState], Forward]
                 ) -> dict[str, float]:
        """Evaluate after step ``state.step`` if it is due; the log's new fields."""
        if self.evaluator is None or (state.step % self.every and state.step != self.total):
            return {}
        rec = self.evaluator(forward(state))
        value = rec[self.metric]
        if better(self.metric, value, self.best_at[1] if self.best_at else None):
            self.best_at = (state.step, value)
            if self.keep_best:
                self.best, self.unsaved = snapshot(state), True
        return rec

    def checkpoint(self, ckpt: Path) -> None:
        """Save the best state with a checkpoint if it changed since the last one."""
        if self.keep_best and self.unsaved and self.best is not None:
            save_best(ckpt, self.best)
            self.unsaved = False

    def result(self, state: SpielState) -> SpielState:
        """The state to write: the best one with ``keep_best``, else ``state``."""
        if not self.keep_best:
            return state
        if self.best is None or self.best_at is None or self.best.step != self.best_at[0]:
            raise ParameterError("--keep best: the best evaluation's state is missing from the "
                                 "checkpoint; rerun without --resume.")
        return state._replace(values=self.best.values, support=self.best.support)
