"""Hugging Face models and checkpoints: apply, remove, extract, fingerprint; names, SHiRA."""

from spdelta.hf._fingerprint import fingerprint
from spdelta.hf._layout import checkpoint_tensors
from spdelta.hf._names import resolve_names
from spdelta.hf.checkpoint import (
    CheckpointError,
    apply_to_checkpoint,
    checkpoint_fingerprint,
    checkpoint_shards,
)
from spdelta.hf.extract import extract_delta
from spdelta.hf.layout import CheckpointLayout, LayoutError
from spdelta.hf.model import (
    BaseMismatchError,
    apply_to_model,
    model_delta,
    model_prefixes,
    remove_from_model,
    tied_aliases,
)
from spdelta.hf.shira import AdapterError, export_shira, import_shira

__all__ = [
    "AdapterError",
    "BaseMismatchError",
    "CheckpointError",
    "CheckpointLayout",
    "LayoutError",
    "apply_to_checkpoint",
    "apply_to_model",
    "checkpoint_fingerprint",
    "checkpoint_shards",
    "checkpoint_tensors",
    "export_shira",
    "extract_delta",
    "fingerprint",
    "import_shira",
    "model_delta",
    "model_prefixes",
    "remove_from_model",
    "resolve_names",
    "tied_aliases",
]
