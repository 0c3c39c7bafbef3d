"""Several delta files as the inputs of one output: their hashes, shapes and base metadata.

These checks read headers only (no maths); the file tools of :mod:`spdelta.files` run them
before they combine anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from spdelta.errors import BaseMismatchError, ShapeError, SpdeltaWarning
from spdelta.format.constants import (
    KEY_BASE_MISMATCH,
    KEY_BASE_MODEL,
    KEY_FINGERPRINT,
    KEY_REVISION,
)
from spdelta.format.stream import DeltaReader

__all__ = ["BASE_KEYS", "CheckedInputs", "check_inputs", "file_sha256", "input_shapes"]

#: Metadata keys that identify the base model; inputs that disagree on one are refused.
BASE_KEYS = (KEY_BASE_MODEL, KEY_REVISION, KEY_FINGERPRINT)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x")
        >>> with open(p, "wb") as f:
        ...     _ = f.write(b"abc")
        >>> file_sha256(p)[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CheckedInputs:
    """What several delta files that fit together give the output.

    Attributes:
        shapes: The union of the inputs' tensor names (sorted) -> dense shape.
        base: The base-model metadata the output carries (``spdelta.base_model`` and
            friends, and a ``spdelta.base_model.mismatch`` record when one was overridden).
    """

    shapes: dict[str, tuple[int, ...]]
    base: dict[str, str]


def check_inputs(readers: Sequence[DeltaReader], *,
                 allow_base_mismatch: bool = False) -> CheckedInputs:
    """Check that several delta files fit together; return their shapes and shared base keys.

    For each base key (:data:`BASE_KEYS`), the inputs that carry it must agree. An input
    without it does not block the others: the output keeps the value (its base is then
    unchecked for that input, and a :class:`~spdelta.errors.SpdeltaWarning` says so).
    With ``allow_base_mismatch``, disagreeing keys are dropped and recorded under
    ``spdelta.base_model.mismatch`` (file name -> value, per key; spec §5).

    Args:
        readers: Open inputs.
        allow_base_mismatch: Accept different base-model metadata (shapes must still agree).

    Returns:
        A :class:`CheckedInputs`: the union of tensor names with their shape, and the
        metadata the output carries about its base.

    Raises:
        ShapeError: A tensor name has different shapes in two inputs.
        BaseMismatchError: Two inputs name different base models (``spdelta.base_model``,
            ``.revision`` or ``.fingerprint``) and ``allow_base_mismatch`` is false.

    Warns:
        SpdeltaWarning: Some inputs carry a base key and others do not.
    """
    shapes = input_shapes(readers)
    return CheckedInputs(shapes, _base_keys(readers, allow_base_mismatch))


def input_shapes(readers: Sequence[DeltaReader]) -> dict[str, tuple[int, ...]]:
    """Union of the inputs' tensor names (sorted) -> shape.

    Raises:
        ShapeError: Two inputs disagree on a tensor's shape.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    bad: list[str] = []
    for r in readers:
        for name in r.names:
            shape = r.info(name).shape
            if shapes.setdefault(name, shape) != shape:
                bad.append(f"{name!r} {list(shapes[name])} vs {list(shape)} in {r.path}")
    if bad:
        raise ShapeError(
            f"{len(bad)} tensors have different shapes across inputs: "
            + "; ".join(bad[:10])
            + ". Combine only deltas made for one base model."
        )
    return dict(sorted(shapes.items()))


def _base_keys(readers: Sequence[DeltaReader], allow_mismatch: bool) -> dict[str, str]:
    """The base keys the output keeps, and the record of those ``allow_mismatch`` overrode."""
    base: dict[str, str] = {}
    overridden: dict[str, dict[str, str]] = {}
    for r in readers:  # earlier overrides travel on
        for key, values in json.loads(r.raw_metadata.get(KEY_BASE_MISMATCH, "{}")).items():
            if isinstance(values, dict):
                overridden.setdefault(key, {}).update({str(k): str(v) for k, v in values.items()})
    for key in BASE_KEYS:
        values = {os.fspath(r.path): r.raw_metadata[key] for r in readers
                  if key in r.raw_metadata}
        if len(set(values.values())) > 1:
            seen = "; ".join(f"{p}: {v!r}" for p, v in list(values.items())[:10])
            if not allow_mismatch:
                raise BaseMismatchError(
                    f"inputs were made for different base models ({key} differs: {seen}). "
                    "Pass --allow-base-mismatch (allow_base_mismatch=True) if that is intended."
                )
            overridden.setdefault(key, {}).update(
                {os.path.basename(p): v for p, v in values.items()})
        elif values:
            base[key] = next(iter(values.values()))
            missing = [os.fspath(r.path) for r in readers if key not in r.raw_metadata]
            if missing:
                warnings.warn(
                    f"{', '.join(missing[:10])}: no {key}; the output keeps {base[key]!r} from "
                    f"the other inputs, so it is not checked for these.",
                    SpdeltaWarning, stacklevel=4)
    if overridden:
        base[KEY_BASE_MISMATCH] = json.dumps(overridden, sort_keys=True, separators=(",", ":"))
    return base
