"""A training job's rows: the batch of each step, its micro-batches, and the held-out rows."""

from __future__ import annotations

from typing import Any

import torch

from spdelta.errors import DataError
from spdelta.recipes._job_config import TrainConfig
from spdelta.recipes._job_eval import (
    EvalSet,
    eval_set,
    label_choices,
    load_eval_rows,
    read_chat_template,
    split_off,
)
from spdelta.recipes.data import (
    encode_prompt_response,
    load_table,
    prompt_format,
    prompt_response_pairs,
)
from spdelta.train import micro_batches
from spdelta.train._accum import MicroBatches


class JobData:
    """Step ``t`` -> its global batch: epoch ``t // per_epoch``, shuffled by ``(seed, epoch)``.

    The order depends only on the seed and the step, so a resumed run reads exactly
    the batches the interrupted one would have read, with no iterator to replay.
    """

    def __init__(self, cfg: TrainConfig, tokenizer: Any) -> None:
        rows = load_table(cfg.data, split=cfg.split)
        self.prompts, self.responses, self.format = self._pairs(cfg, rows)
        self.chat_template, template_record = read_chat_template(cfg)
        self.prompt_format = prompt_format(tokenizer, self.chat_template)
        if self.prompt_format == "chat:given":
            self.prompt_format = f"chat:{template_record}"
        self.choices = (label_choices(cfg, rows, self.responses) if self.format == "text_label"
                        else None)
        self.held_out: tuple[list[str], list[str], str] | None = None
        if cfg.eval_fraction is not None:
            keep, held = split_off(len(self.prompts), cfg.eval_fraction, cfg.seed)
            self.held_out = ([self.prompts[i] for i in held], [self.responses[i] for i in held],
                             self.format)
            self.prompts = [self.prompts[i] for i in keep]
            self.responses = [self.responses[i] for i in keep]
        elif cfg.eval_data is not None or cfg.eval_split is not None:
            self.held_out = self._pairs(cfg, load_eval_rows(cfg))
        self.n = len(self.prompts)
        if self.n < cfg.batch_size:
            raise DataError(f"data {cfg.data!r}: {self.n} rows, fewer than one batch of "
                            f"{cfg.batch_size}; lower --batch-size or add rows.")
        self.per_epoch = self.n // cfg.batch_size  # the last partial batch is dropped
        self.cfg, self.tokenizer = cfg, tokenizer
        self._orders: dict[int, list[int]] = {}

    @staticmethod
    def _pairs(cfg: TrainConfig, rows: Any) -> tuple[list[str], list[str], str]:
        return prompt_response_pairs(
            rows, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
            text_column=cfg.text_column, label_column=cfg.label_column,
            label_names=cfg.label_names, template=cfg.template)

    def eval_set(self) -> EvalSet | None:
        """The held-out rows, if the job has any."""
        return None if self.held_out is None else eval_set(self.cfg, *self.held_out,
                                                           self.choices)

    def rows(self, t: int) -> list[int]:
        epoch, i = divmod(t, self.per_epoch)
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        b = self.cfg.batch_size
        return self._orders[epoch][i * b:(i + 1) * b]

    def encode(self, idx: list[int]) -> dict[str, Any]:
        return encode_prompt_response(
            self.tokenizer, [self.prompts[i] for i in idx], [self.responses[i] for i in idx],
            max_length=self.cfg.max_length, system=self.cfg.system,
            chat_template=self.chat_template)

    def batch(self, t: int) -> dict[str, Any]:
        return self.encode(self.rows(t))

    def micro(self, t: int, rank: int, world: int) -> MicroBatches:
        """This rank's share of step ``t``'s rows, as separately encoded micro-batches."""
        share = self.cfg.batch_size // world
        idx = self.rows(t)[rank * share:(rank + 1) * share]
        m = self.cfg.micro_batch_size or share
        return micro_batches([self.encode(idx[i:i + m]) for i in range(0, share, m)])
