"""Exception hierarchy: every error spdelta raises on bad input is a ``SpdeltaError``.

Each class is also a ``ValueError``, so callers that already catch ``ValueError``
keep working. Format errors carry the spec rule id (``spec/format.md`` §7) they
enforce, in ``rule`` and in the message.

Example:
    >>> from spdelta.errors import IndexOrderError, FormatError
    >>> issubclass(IndexOrderError, FormatError) and issubclass(IndexOrderError, ValueError)
    True
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BaseMismatchError",
    "CompositionError",
    "ContainerError",
    "DataError",
    "DtypeError",
    "FormatError",
    "IndexOrderError",
    "IndexRangeError",
    "KeyMismatchError",
    "LengthError",
    "MetadataError",
    "NonFiniteError",
    "NotRegularFileError",
    "NotSpdeltaError",
    "OutputBusyError",
    "OutputExistsError",
    "ParameterError",
    "ShapeError",
    "SpdeltaError",
    "SpdeltaWarning",
    "TensorSetError",
    "VersionError",
    "format_names",
]


class SpdeltaError(ValueError):
    """Base class of every error that spdelta raises on bad input."""


class FormatError(SpdeltaError):
    """A delta (on disk or in memory) breaks a rule of ``spec/format.md`` §7.

    Attributes:
        rule: The spec rule id, e.g. ``"V8"``.
    """

    rule: str = ""


class ContainerError(FormatError):
    """V1: the bytes are not a well-formed safetensors container."""

    rule = "V1"


class NotSpdeltaError(FormatError):
    """V2: a safetensors file without ``spdelta.format_version`` metadata."""

    rule = "V2"


class VersionError(FormatError):
    """V3: the format version is malformed or its MAJOR is not supported."""

    rule = "V3"


class MetadataError(FormatError):
    """V4: the ``spdelta.*`` metadata is malformed or does not match the schema."""

    rule = "V4"


class TensorSetError(FormatError):
    """V5: a tensor is missing, stray, or badly named."""

    rule = "V5"


class DtypeError(FormatError):
    """V6: a stored tensor has the wrong dtype or rank for its encoding."""

    rule = "V6"


class LengthError(FormatError):
    """V7: indices and values do not have the declared number of entries."""

    rule = "V7"


class IndexRangeError(FormatError):
    """V8: an index lies outside ``[0, numel)`` of the declared shape."""

    rule = "V8"


class IndexOrderError(FormatError):
    """V9: indices are not strictly increasing (unsorted or duplicated)."""

    rule = "V9"


class NonFiniteError(FormatError):
    """V10: a value is NaN or infinite."""

    rule = "V10"


class KeyMismatchError(SpdeltaError, KeyError):
    """A delta names a tensor that the parameters do not have, or the reverse."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message.
        return str(self.args[0]) if self.args else ""


class ShapeError(SpdeltaError):
    """A tensor's shape does not match the shape the delta or model expects."""


class BaseMismatchError(SpdeltaError):
    """A delta was made for another base model (its base metadata or fingerprint differ)."""


class CompositionError(SpdeltaError):
    """Deltas cannot be combined as asked: the result is undefined without the base (spec §6.5),
    e.g. a replacement tensor in a merge, or an additive entry followed by a replacement
    that does not cover it."""


class OutputExistsError(SpdeltaError, FileExistsError):
    """The output path exists and overwriting was not allowed."""


class NotRegularFileError(SpdeltaError):
    """An input is a FIFO, socket or device, not a regular file (reading it could block)."""


class OutputBusyError(SpdeltaError):
    """Another spdelta run holds the output (or checkpoint directory) this run would write."""


class DataError(SpdeltaError):
    """Training data cannot be read, or lacks the columns its format needs."""


class ParameterError(SpdeltaError):
    """A hyperparameter (weight, density, bits, block size, ...) is invalid for the call."""


class SpdeltaWarning(UserWarning):
    """A recoverable case spdelta tells the user about (a weight left out, a fallback taken).

    The test suite turns these into errors (``pyproject.toml``), so a warning spdelta
    itself raises is always tested for.
    """


def format_names(names: Iterable[str], limit: int = 10) -> str:
    """Return sorted, quoted names, capped at ``limit`` with a count of the rest.

    Example:
        >>> format_names(["b", "a"])
        "'a', 'b'"
    """
    items = sorted(names)
    shown = ", ".join(repr(n) for n in items[:limit])
    rest = len(items) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
