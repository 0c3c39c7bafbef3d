"""What every phase of a training job reads: this process's place, the model and the data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from spdelta.dist import shard_batch
from spdelta.recipes._job_data import JobData
from spdelta.recipes._job_eval import EvalHook
from spdelta.recipes._job_targets import JobTargets
from spdelta.recipes.data import batch_to
from spdelta.train import SpielState
from spdelta.train._accum import MicroBatches

__all__ = ["Batch", "Run", "StepFn"]

Batch = Mapping[str, Any]
StepFn = Callable[[SpielState, Batch], tuple[SpielState, dict[str, float]]]


@dataclass(frozen=True)
class Run:
    """What every phase of a job reads: this process's place, the model and the data."""

    rank: int
    world: int
    device: torch.device
    speak: Callable[[str], None]
    model: Any
    data: JobData
    total: int
    base: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    fingerprint: str
    targets: JobTargets  # names, checkpoint layout, what all-linear left out, slow ones
    evals: EvalHook

    def shard(self, batch: Batch) -> dict[str, Any]:
        """This rank's share of a global batch, on the job's device."""
        return batch_to(shard_batch(batch, self.rank, self.world) if self.world > 1 else batch,
                        self.device)

    def step_input(self, t: int) -> tuple[Any, int]:
        """Step ``t``'s input for this rank (a batch, or micro-batches) and its tokens.

        The tokens are the global batch's (unpadded); with micro-batches on several
        ranks, this rank's times the number of ranks.
        """
        micro = self.data.cfg.micro_batch_size
        if micro is None or micro >= self.data.cfg.batch_size // self.world:
            batch = self.data.batch(t)
            return self.shard(batch), int(batch["attention_mask"].sum())
        parts = self.data.micro(t, self.rank, self.world)
        tokens = sum(int(b["attention_mask"].sum()) for b in parts.batches) * self.world
        return parts._replace(batches=tuple(batch_to(b, self.device) for b in parts.batches)), (
            tokens)

    def calibration(self, t: int) -> list[Batch]:
        """Step ``t``'s rows for scoring: this rank's share (micro-batches if the job has them)."""
        got, _ = self.step_input(t)
        return list(got.batches) if isinstance(got, MicroBatches) else [got]
