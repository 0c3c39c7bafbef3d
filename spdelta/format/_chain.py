"""Fingerprints of a composed chain of patches (spec §5.1, §6.5): each applies to the last."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

from spdelta.errors import BaseMismatchError, SpdeltaWarning
from spdelta.format.constants import (
    KEY_BASE_MODEL,
    KEY_FINGERPRINT,
    KEY_RESULT_FINGERPRINT,
    KEY_REVISION,
)

__all__ = ["chain_keys", "is_chain"]


def is_chain(metas: Sequence[Mapping[str, str]]) -> bool:
    """Whether inputs compose as a chain: some input names the checkpoint it gives.

    Example:
        >>> is_chain([{"spdelta.result.fingerprint": "base1:01"}, {}]), is_chain([{}, {}])
        (True, False)
    """
    return any(KEY_RESULT_FINGERPRINT in m for m in metas)


def chain_keys(inputs: Sequence[tuple[str, Mapping[str, str]]], *,
               allow_mismatch: bool = False) -> dict[str, str]:
    """The base and result keys of the composition of a chain, after checking its links.

    Input ``i + 1`` must apply to what input ``i`` gives: its base fingerprint equals the
    result fingerprint of input ``i`` (when both carry one). The output applies to the
    first input's base (its base model, revision and fingerprint) and gives the last
    input's result, which it records only when every link was checked.

    Args:
        inputs: ``(label, metadata)`` per input, in application order; labels name files.
        allow_mismatch: Accept broken links (the output then records no result).

    Returns:
        The keys the output carries.

    Raises:
        BaseMismatchError: A link is broken and ``allow_mismatch`` is false.

    Warns:
        SpdeltaWarning: A link could not be checked (a fingerprint is missing), so the
            output records no result fingerprint.
    """
    first = inputs[0][1]
    out = {k: first[k] for k in (KEY_BASE_MODEL, KEY_REVISION, KEY_FINGERPRINT) if k in first}
    linked = True
    for (prev_label, prev), (label, meta) in zip(inputs, inputs[1:], strict=False):
        gives, wants = prev.get(KEY_RESULT_FINGERPRINT), meta.get(KEY_FINGERPRINT)
        if gives is None or wants is None:
            linked = False
            warnings.warn(
                f"{label}: cannot check that it applies to what {prev_label} gives (no "
                f"{KEY_RESULT_FINGERPRINT if gives is None else KEY_FINGERPRINT}); the output "
                "records no result fingerprint.", SpdeltaWarning, stacklevel=3)
        elif gives != wants:
            if not allow_mismatch:
                raise BaseMismatchError(
                    f"{label} applies to {wants}, but {prev_label} gives {gives}: the inputs "
                    "are not consecutive steps of one chain. Give them in the order they "
                    "were made, or pass --allow-base-mismatch (allow_base_mismatch=True).")
            linked = False
    last = inputs[-1][1]
    if linked and KEY_RESULT_FINGERPRINT in last:
        out[KEY_RESULT_FINGERPRINT] = last[KEY_RESULT_FINGERPRINT]
    return out
