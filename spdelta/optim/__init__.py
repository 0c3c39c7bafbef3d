"""Optimizers as pure ``(init, update)`` pairs over dicts of sparse delta values."""

from spdelta.optim._base import (
    EntryValues,
    StateSupport,
    Transform,
    apply_updates,
    chain,
    state_fields,
)
from spdelta.optim.adamw import AdamWState, adamw
from spdelta.optim.clip import clip_by_global_norm, global_norm
from spdelta.optim.reset import remap_state
from spdelta.optim.schedules import (
    SCHEDULES,
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    join_schedules,
    linear_schedule,
    resolve_warmup,
    warmup_schedule,
)
from spdelta.optim.sm3 import SM3State, sm3

__all__ = ["AdamWState", "EntryValues", "SCHEDULES", "SM3State", "Schedule", "StateSupport",
           "Transform", "adamw", "apply_updates", "chain", "clip_by_global_norm",
           "constant_schedule", "cosine_decay_schedule", "global_norm", "join_schedules",
           "linear_schedule", "remap_state", "resolve_warmup", "sm3", "state_fields",
           "warmup_schedule"]
