"""Training recipes on sparse deltas: the generic loop, SPEFT and SpIEL.

Example:
    >>> from spdelta.train import speft, make_train_step, TrainState
    >>> TrainState._fields
    ('values', 'opt_state', 'step')
"""

from spdelta.train._accum import MicroBatches, accumulate, label_tokens, micro_batches
from spdelta.train._defaults import DEFAULT_LR, DEFAULT_SCHEDULE, DEFAULT_WARMUP, default_lr
from spdelta.train._loop import (
    TrainState,
    TrainStepFn,
    clipped,
    cycle,
    init_train_state,
    learning_rate,
    make_train_step,
    run_steps,
)
from spdelta.train.checkpoint import load_state, save_state
from spdelta.train.speft import TRAINING_KEY, speft
from spdelta.train.spiel import (
    SpielConfig,
    SpielState,
    make_spiel_step,
    prune_regrow,
    spiel,
    spiel_init,
)

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_SCHEDULE",
    "DEFAULT_WARMUP",
    "MicroBatches",
    "SpielConfig",
    "SpielState",
    "TRAINING_KEY",
    "TrainState",
    "TrainStepFn",
    "accumulate",
    "clipped",
    "cycle",
    "default_lr",
    "init_train_state",
    "label_tokens",
    "learning_rate",
    "load_state",
    "make_spiel_step",
    "make_train_step",
    "micro_batches",
    "prune_regrow",
    "run_steps",
    "save_state",
    "speft",
    "spiel",
    "spiel_init",
]
