"""Constants of the spdelta file format (``spec/format.md``): version, keys, dtypes, limits."""

from __future__ import annotations

import torch

# The metadata key names are a rule every module follows: they live in spdelta.rules (and
# its __all__); the format's modules import them from here, beside its other constants.
from spdelta.rules import (  # noqa: F401
    EXT_PREFIX,
    KEY_BASE_MISMATCH,
    KEY_BASE_MODEL,
    KEY_FINGERPRINT,
    KEY_PRODUCER,
    KEY_PROVENANCE,
    KEY_RESULT_FINGERPRINT,
    KEY_REVISION,
    KEY_TENSORS,
    KEY_TRAINING,
    KEY_VERSION,
    KNOWN_KEYS,
    PREFIX,
)

__all__ = [
    "DTYPE_BITS",
    "ENCODINGS",
    "FORMAT_VERSION",
    "INDEX_DTYPES",
    "KEY_MINORS",
    "MAJOR",
    "MAX_HEADER_BYTES",
    "MAX_NUMEL",
    "MINOR",
    "QUANTIZED_BITS",
    "QUANTIZED_VALUE_DTYPES",
    "REPLACE",
    "REPLACE_VALUE_DTYPES",
    "SAFETENSORS_DTYPES",
    "SCALE_DTYPE",
    "TORCH_DTYPES",
    "VALUE_DTYPES",
    "VALUE_ENCODINGS",
    "min_minor",
]

#: Newest version this library understands (spec §8). Writers label a file with the lowest
#: version whose features it uses: ``1.0`` without quantized values, ``1.1`` with them,
#: ``1.2`` with a ``spdelta.base_model.mismatch`` record, ``1.3`` with a replacement tensor
#: or a ``spdelta.result.fingerprint``.
MAJOR, MINOR = 1, 3
FORMAT_VERSION = f"{MAJOR}.{MINOR}"

#: Reserved keys defined after 1.0 -> the MINOR that defines them (spec §5, §8).
KEY_MINORS: dict[str, int] = {KEY_BASE_MISMATCH: 2, KEY_RESULT_FINGERPRINT: 3}

#: Largest header a reader accepts (spec §9), in bytes.
MAX_HEADER_BYTES = 100_000_000
#: Every dense tensor addressed by a delta has fewer than 2**63 elements (int64 indices).
MAX_NUMEL = 2**63 - 1

#: safetensors dtype name -> bits per element (the container accepts all of them, spec §3).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

#: Index encoding -> the safetensors dtype of its ``::idx`` tensor (spec §6, V6).
INDEX_DTYPES: dict[str, str] = {"gap8": "U8", "gap16": "U16", "abs32": "I32", "abs64": "I64"}
ENCODINGS = tuple(INDEX_DTYPES)
#: The value encoding of a replacement tensor (spec §6.4, since 1.3): its values replace the
#: base's entries, bit for bit, in the base tensor's own dtype.
REPLACE = "replace"
#: Value encodings (spec §6.3, §6.4): ``raw`` since 1.0, ``int8`` / ``int4`` since 1.1,
#: ``replace`` since 1.3.
VALUE_ENCODINGS = ("raw", "int8", "int4", REPLACE)
#: Quantized value encoding -> bits per code.
QUANTIZED_BITS: dict[str, int] = {"int8": 8, "int4": 4}
#: Quantized value encoding -> the safetensors dtype of its ``::val`` codes (V6).
QUANTIZED_VALUE_DTYPES: dict[str, str] = {"int8": "I8", "int4": "U8"}
#: The dtype of ``::scale`` (V6).
SCALE_DTYPE = "F32"


def min_minor(value_encoding: str) -> int:
    """The first MINOR of format 1 that defines ``value_encoding`` (spec §8).

    Example:
        >>> min_minor("raw"), min_minor("int4"), min_minor("replace")
        (0, 1, 3)
    """
    return {"raw": 0, REPLACE: 3}.get(value_encoding, 1)


#: safetensors dtype name -> torch dtype, for the dtypes a delta may store (every dtype of a
#: whole number of bytes: replacement values take any dtype a checkpoint holds).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "F32": torch.float32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
}
#: Allowed ``::val`` dtypes of ``raw`` values (V6).
VALUE_DTYPES = ("F16", "BF16", "F32", "F64")
#: Allowed ``::val`` dtypes of ``replace`` values (V6): every dtype of whole bytes, not the
#: sub-byte ``F4`` / ``F6_*``.
REPLACE_VALUE_DTYPES = tuple(TORCH_DTYPES)

#: torch dtype -> the safetensors dtype name it is stored as (every dtype both know).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
    torch.uint32: "U32", torch.float32: "F32", torch.int64: "I64", torch.uint64: "U64",
    torch.float64: "F64", torch.complex64: "C64", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0",
}
