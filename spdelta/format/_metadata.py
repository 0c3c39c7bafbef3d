"""Checks of the ``spdelta.*`` metadata (spec §5, rules V2, V3, V4 and the V5 name rule)."""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spdelta.delta import SEPARATOR
from spdelta.errors import (
    FormatError,
    MetadataError,
    NotSpdeltaError,
    TensorSetError,
    VersionError,
)
from spdelta.format.constants import (
    ENCODINGS,
    EXT_PREFIX,
    KEY_BASE_MISMATCH,
    KEY_MINORS,
    KEY_PROVENANCE,
    KEY_TENSORS,
    KEY_TRAINING,
    KEY_VERSION,
    KNOWN_KEYS,
    MAJOR,
    MAX_NUMEL,
    MINOR,
    PREFIX,
    QUANTIZED_BITS,
    VALUE_ENCODINGS,
    min_minor,
)

__all__ = ["Found", "TensorSpec", "check_metadata", "check_reserved", "parse_version"]

#: A problem and the tensor it concerns (``None`` for the whole file).
Found = tuple[str | None, FormatError]
_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")
_SPEC_KEYS = {"shape", "nnz", "index_encoding", "value_encoding"}
_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 8, 40, 40, 40


def _short(x: object) -> str:
    """A bounded repr of untrusted JSON (depth, length and digits capped)."""
    return _REPR.repr(x)


@dataclass(frozen=True)
class TensorSpec:
    """One entry of ``spdelta.tensors``: dense shape, entry count, encodings, block size.

    ``block_size`` is set for the quantized value encodings (``int8``, ``int4``) only.
    """

    shape: tuple[int, ...]
    nnz: int
    index_encoding: str
    value_encoding: str
    block_size: int | None = None


def parse_version(text: str) -> tuple[int, int] | None:
    """``(MAJOR, MINOR)`` of a ``"MAJOR.MINOR"`` string, or ``None`` when malformed.

    Example:
        >>> parse_version("1.0"), parse_version("1.02"), parse_version("v1")
        ((1, 0), None, None)
    """
    m = _VERSION.fullmatch(text)
    return (int(m[1]), int(m[2])) if m else None


def _reserved_problem(key: str, newer: bool, minor: int) -> str | None:
    if not key.startswith(PREFIX) or key.startswith(EXT_PREFIX):
        return None
    if key not in KNOWN_KEYS:
        if newer:
            return None
        return (f"metadata key {key!r} is reserved and unknown in format {MAJOR}.{MINOR} "
                f"(spec §7 V4); rename it outside 'spdelta.' or under {EXT_PREFIX!r}.")
    since = KEY_MINORS.get(key, 0)
    if since > minor:
        return (f"metadata key {key!r} is defined from format {MAJOR}.{since}, but the file is "
                f"labelled {MAJOR}.{minor} (spec §7 V4, §8); re-save it with spdelta.")
    return None


def check_reserved(meta: Mapping[str, str], *, newer: bool = False, minor: int = MINOR
                   ) -> list[Found]:
    """Problems of the optional reserved keys: unknown or too new ``spdelta.*`` keys, bad JSON.

    Args:
        meta: The metadata.
        newer: The file's MINOR is newer than this reader's (unknown keys are allowed).
        minor: The file's MINOR (keys defined by a later MINOR are refused).
    """
    out: list[Found] = []
    for key in sorted(meta):
        problem = _reserved_problem(key, newer, minor)
        if problem is not None:
            out.append((None, MetadataError(problem)))
    for key in (KEY_PROVENANCE, KEY_TRAINING, KEY_BASE_MISMATCH):
        if key in meta and not isinstance(_json_or_none(meta[key]), dict):
            out.append(
                (
                    None,
                    MetadataError(
                        f"metadata key {key!r} must be a JSON object string (spec §7 V4); found "
                        f"{meta[key][:40]!r}. Encode it with json.dumps(dict)."
                    ),
                )
            )
    return out


def _strict_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name}")


def _json_or_none(text: str) -> Any:
    """The JSON value of ``text``; ``None`` if malformed, with duplicate keys or NaN/Infinity."""
    try:
        return json.loads(text, object_pairs_hook=_strict_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numel_ok(shape: list[int]) -> bool:
    """Whether the product of ``shape`` fits ``MAX_NUMEL`` (stops early on huge shapes)."""
    if 0 in shape:
        return True
    n = 1
    for s in shape:
        n *= s
        if n > MAX_NUMEL:
            return False
    return True


def _encoding_problem(entry: dict[str, Any], minor: int) -> str | None:
    """Why the encodings (and ``block_size``) of a tensor entry are wrong, or ``None``."""
    if entry["index_encoding"] not in ENCODINGS:
        found = _short(entry["index_encoding"])
        return f"index_encoding must be one of {list(ENCODINGS)}; found {found}"
    known = [e for e in VALUE_ENCODINGS if min_minor(e) <= minor]
    encoding = entry["value_encoding"]
    if encoding not in known:
        since = ""
        if encoding in VALUE_ENCODINGS:
            since = f" (defined from format 1.{min_minor(encoding)})"
        if not since and minor > MINOR:
            since = (f" (the file is format {MAJOR}.{minor}, newer than this reader's "
                     f"{MAJOR}.{MINOR}; upgrade spdelta to read it)")
        return (
            f"value_encoding must be one of {known} in format 1.{minor}; "
            f"found {_short(encoding)}{since}"
        )
    block = entry.get("block_size")
    valid_block = isinstance(block, int) and not isinstance(block, bool) and block >= 1
    if encoding in QUANTIZED_BITS and not valid_block:
        return (
            f"block_size must be an int >= 1 for value_encoding {encoding}; found {_short(block)}"
        )
    if encoding not in QUANTIZED_BITS and "block_size" in entry:
        return "block_size is only allowed with a quantized value_encoding (int8, int4)"
    return None


def _spec_problem(entry: object, newer: bool, minor: int) -> str | None:
    """Why one ``spdelta.tensors`` entry breaks the schema, or ``None``."""
    if not isinstance(entry, dict) or not _SPEC_KEYS <= set(entry):
        return f"must be an object with keys {sorted(_SPEC_KEYS)}"
    allowed = _SPEC_KEYS | ({"block_size"} if minor >= 1 else set())
    if set(entry) - allowed and not newer:
        return f"has unknown keys {_short(sorted(set(entry) - allowed))}"
    shape, nnz = entry["shape"], entry["nnz"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        return f"shape must be a list of non-negative ints; found {_short(shape)}"
    if not _numel_ok(shape):
        return f"shape must have fewer than 2**63 elements; found {_short(shape)}"
    if not _is_int(nnz) or nnz < 0:
        return f"nnz must be a non-negative int; found {_short(nnz)}"
    return _encoding_problem(entry, minor)


def _check_tensors(
    text: str, newer: bool, minor: int
) -> tuple[list[Found], dict[str, TensorSpec] | None]:
    obj = _json_or_none(text)
    if not isinstance(obj, dict):
        return [
            (
                None,
                MetadataError(
                    f"metadata key {KEY_TENSORS!r} must be a JSON object string (spec §7 V4); "
                    "found "
                    f"{text[:40]!r}. Re-create the file with spdelta.save_delta."
                ),
            )
        ], None
    out: list[Found] = []
    specs: dict[str, TensorSpec] = {}
    for name, entry in sorted(obj.items()):
        if not name or SEPARATOR in name:
            out.append(
                (
                    name,
                    TensorSetError(
                        f"{name!r}: a tensor name must be non-empty and must not contain "
                        f"{SEPARATOR!r} "
                        "(spec §7 V5); rename the tensor."
                    ),
                )
            )
            continue
        why = _spec_problem(entry, newer, minor)
        if why:
            out.append((name, MetadataError(f"{name!r}: {KEY_TENSORS} entry {why} (spec §7 V4).")))
            continue
        block = entry.get("block_size") if entry["value_encoding"] in QUANTIZED_BITS else None
        specs[name] = TensorSpec(
            tuple(entry["shape"]),
            entry["nnz"],
            entry["index_encoding"],
            entry["value_encoding"],
            block,
        )
    return out, specs


def check_metadata(
    meta: Mapping[str, str] | None,
) -> tuple[list[Found], dict[str, TensorSpec] | None, bool]:
    """Check V2-V4 on a file's metadata.

    Returns:
        ``(problems, specs, newer)``: ``specs`` holds the well-formed ``spdelta.tensors``
        entries, or is ``None`` when V2, V3 or an unusable ``spdelta.tensors`` leaves
        nothing to check; ``newer`` is true when the file's MINOR is newer than this reader's.
        A V2 or V3 problem is returned alone (nothing else can be trusted).
    """
    if meta is None or KEY_VERSION not in meta:
        return (
            [
                (
                    None,
                    NotSpdeltaError(
                        f"metadata has no {KEY_VERSION!r} key (spec §7 V2): "
                        "this is not a spdelta file. "
                        "Convert a dense checkpoint with SparseDelta.from_dense and save_delta."
                    ),
                )
            ],
            None,
            False,
        )
    version = parse_version(meta[KEY_VERSION])
    if version is None or version[0] != MAJOR:
        what = "is malformed" if version is None else "has an unsupported MAJOR"
        return (
            [
                (
                    None,
                    VersionError(
                        f"{KEY_VERSION} {meta[KEY_VERSION][:20]!r} {what} (spec §7 V3); "
                        "this reader supports "
                        f"'{MAJOR}.x'. Upgrade spdelta or re-export the file."
                    ),
                )
            ],
            None,
            False,
        )
    newer = version[1] > MINOR
    out = check_reserved(meta, newer=newer, minor=version[1])
    if KEY_TENSORS not in meta:
        out.append(
            (
                None,
                MetadataError(
                    f"metadata key {KEY_TENSORS!r} is missing (spec §7 V4); "
                    "re-create the file with spdelta.save_delta."
                ),
            )
        )
        return out, None, newer
    found, specs = _check_tensors(meta[KEY_TENSORS], newer, version[1])
    return out + found, specs, newer
