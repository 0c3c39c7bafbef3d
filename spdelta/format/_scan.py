"""One pass over a file that collects every problem (V1-V10) and decodes the valid entries."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from torch import Tensor

from spdelta._io import open_input
from spdelta._replace import ReplaceTensor
from spdelta.delta import SEPARATOR, DeltaTensor, numel_of
from spdelta.errors import (
    ContainerError,
    DtypeError,
    FormatError,
    IndexRangeError,
    LengthError,
    NonFiniteError,
    SpdeltaError,
    TensorSetError,
)
from spdelta.format._container import Header, parse_header, read_tensor
from spdelta.format._fastcheck import entry_problems, index_problems
from spdelta.format._metadata import Found, TensorSpec, check_metadata
from spdelta.format.codec import decode_indices
from spdelta.format.constants import (
    INDEX_DTYPES,
    QUANTIZED_BITS,
    QUANTIZED_VALUE_DTYPES,
    REPLACE,
    REPLACE_VALUE_DTYPES,
    SCALE_DTYPE,
    VALUE_DTYPES,
)
from spdelta.quantized import QuantizedTensor, unpack_int4

__all__ = ["Entry", "Scan", "read_entry", "scan_file", "stored_parts"]

_PARTS = ("idx", "val", "scale")
#: A decoded entry: raw values, quantized codes and scales, or replacement values.
Entry = DeltaTensor | QuantizedTensor | ReplaceTensor


def stored_parts(spec: TensorSpec) -> tuple[str, ...]:
    """The stored tensor suffixes of one entry: ``idx``, ``val`` (and ``scale`` if quantized)."""
    return _PARTS if spec.value_encoding in QUANTIZED_BITS else _PARTS[:2]


#: Exceptions that malformed bytes may provoke below the checks; they become V1 problems.
_LOW_LEVEL = (
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RuntimeError,
    RecursionError,
    MemoryError,
)


@dataclass
class Scan:
    """What one pass over a file found: the header, the tensor specs, problems, entries."""

    header: Header | None = None
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    newer: bool = False
    problems: list[Found] = field(default_factory=list)
    entries: dict[str, DeltaTensor] = field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    replaced: dict[str, ReplaceTensor] = field(default_factory=dict)


def _tensor_set(header: Header, specs: dict[str, TensorSpec], declared: set[str]) -> list[Found]:
    """V5: every declared tensor has ``::idx`` and ``::val``; nothing else is stored."""
    out: list[Found] = []
    for name in sorted(specs):
        missing = [
            p for p in stored_parts(specs[name]) if f"{name}{SEPARATOR}{p}" not in header.tensors
        ]
        if missing:
            out.append(
                (
                    name,
                    TensorSetError(
                        f"{name!r}: missing stored tensor(s) "
                        f"{[name + SEPARATOR + p for p in missing]} "
                        "(spec §7 V5); re-create the file with spdelta.save_delta."
                    ),
                )
            )
    for key in sorted(header.tensors):
        base, sep, part = key.rpartition(SEPARATOR)
        scale_ok = part != "scale" or base not in specs or len(stored_parts(specs[base])) == 3
        if not (sep and part in _PARTS and base in declared and scale_ok):
            out.append(
                (
                    None,
                    TensorSetError(
                        f"stored tensor {key!r} is not '<name>::idx', '<name>::val' or (for a "
                        "quantized value_encoding) '<name>::scale' of a tensor declared "
                        "in spdelta.tensors (spec §7 V5); remove it or declare it."
                    ),
                )
            )
    return out


def _value_layout(spec: TensorSpec) -> tuple[str, int, int]:
    """Expected ``::val`` dtype, ``::val`` length and ``::scale`` length (-1: no scales)."""
    if spec.value_encoding == REPLACE:
        return "/".join(REPLACE_VALUE_DTYPES), spec.nnz, -1
    if spec.value_encoding not in QUANTIZED_BITS:
        return "/".join(VALUE_DTYPES), spec.nnz, -1
    assert spec.block_size is not None  # checked by V4
    n_codes = spec.nnz if spec.value_encoding == "int8" else (spec.nnz + 1) // 2
    return QUANTIZED_VALUE_DTYPES[spec.value_encoding], n_codes, -(-spec.nnz // spec.block_size)


def _dtype_ok(name: str, spec: TensorSpec, header: Header, want_val: str) -> bool:
    idx = header.tensors[f"{name}{SEPARATOR}idx"]
    val = header.tensors[f"{name}{SEPARATOR}val"]
    ok = idx.dtype == INDEX_DTYPES[spec.index_encoding] and len(idx.shape) == len(val.shape) == 1
    ok = ok and val.dtype in want_val.split("/")
    scale = header.tensors.get(f"{name}{SEPARATOR}scale")
    return ok and (scale is None or (scale.dtype == SCALE_DTYPE and len(scale.shape) == 1))


def _header_checks(name: str, spec: TensorSpec, header: Header) -> list[FormatError]:
    """V6, V7 (stored lengths) and the abs32 range rule of V8, from the header alone."""
    idx = header.tensors[f"{name}{SEPARATOR}idx"]
    val = header.tensors[f"{name}{SEPARATOR}val"]
    scale = header.tensors.get(f"{name}{SEPARATOR}scale")
    want = INDEX_DTYPES[spec.index_encoding]
    want_val, n_val, n_scale = _value_layout(spec)
    if not _dtype_ok(name, spec, header, want_val):
        scale_txt = f" and '::scale' 1-D {SCALE_DTYPE}" if scale is not None else ""
        found_scale = f", {scale.dtype}{list(scale.shape)}" if scale is not None else ""
        return [
            DtypeError(
                f"{name!r}: '::idx' must be 1-D {want} for {spec.index_encoding} and '::val' 1-D "
                f"{want_val} for {spec.value_encoding}{scale_txt} (spec §7 V6); found "
                f"{idx.dtype}{list(idx.shape)} and {val.dtype}{list(val.shape)}{found_scale}."
            )
        ]
    out: list[FormatError] = []
    count = idx.shape[0]
    short = count < spec.nnz if spec.index_encoding.startswith("gap") else count != spec.nnz
    if short or val.shape[0] != n_val:
        out.append(
            LengthError(
                f"{name!r}: nnz is {spec.nnz} but '::idx' holds {count} codes and '::val' "
                f"{val.shape[0]} elements, expected {n_val} (spec §7 V7); re-create the file."
            )
        )
    if scale is not None and n_scale >= 0 and scale.shape[0] != n_scale:  # stray scale: V5
        out.append(
            LengthError(
                f"{name!r}: nnz={spec.nnz} with block_size={spec.block_size} needs {n_scale} "
                f"scales (ceil(nnz / block_size)); '::scale' holds {scale.shape[0]} "
                "(spec §7 V7); re-create the file."
            )
        )
    if spec.index_encoding == "abs32" and numel_of(spec.shape) > 2**31:
        out.append(
            IndexRangeError(
                f"{name!r}: abs32 indices cannot address {numel_of(spec.shape)} elements "
                "(spec §7 V8); "
                "use abs64 or a gap encoding."
            )
        )
    return out


def _gap_checks(name: str, spec: TensorSpec, codes: Tensor, decoded: int) -> list[FormatError]:
    """V7 for gap streams: ``nnz`` non-zero codes (``decoded`` entries) and no trailing escape."""
    trailing = codes.numel() > 0 and int(codes[-1]) == 0
    if decoded == spec.nnz and not trailing:
        return []
    return [
        LengthError(
            f"{name!r}: a {spec.index_encoding} stream must hold nnz={spec.nnz} non-zero codes "
            "and end "
            f"with one (spec §7 V7); found {decoded} non-zero codes"
            f"{' and a trailing escape' if trailing else ''}."
        )
    ]


def _code_checks(name: str, spec: TensorSpec, codes: Tensor, scales: Tensor) -> list[FormatError]:
    """V7 (int4 padding nibble) and V10 (code range, finite non-negative scales)."""
    out: list[FormatError] = []
    bits = QUANTIZED_BITS[spec.value_encoding]
    qmax = 2 ** (bits - 1) - 1
    if bits == 4 and spec.nnz % 2 and int(codes[-1]) >> 4:
        out.append(
            LengthError(
                f"{name!r}: int4 with odd nnz={spec.nnz} must leave the last high nibble 0 "
                "(spec §7 V7); re-create the file."
            )
        )
    q = codes if bits == 8 else unpack_int4(codes, spec.nnz)
    reserved = int((q < -qmax).sum()) if q.numel() else 0
    bad_scales = int((~torch.isfinite(scales) | (scales < 0)).sum())
    if reserved or bad_scales:
        out.append(
            NonFiniteError(
                f"{name!r}: {spec.value_encoding} codes must lie in [-{qmax}, {qmax}] and scales "
                f"be finite and >= 0 (spec §7 V10); found {reserved} reserved codes "
                f"(-{qmax + 1}) and {bad_scales} bad scales."
            )
        )
    return out


def read_entry(
    f: BinaryIO, header: Header, name: str, spec: TensorSpec
) -> tuple[Entry | None, list[FormatError]]:
    """Read, decode and check (V7-V10) one entry whose header checks passed.

    Returns:
        ``(entry, problems)``: a ``DeltaTensor`` (raw values), a ``QuantizedTensor``
        (codes and scales) or a ``ReplaceTensor`` (values in the base's dtype, any bits),
        or ``None`` with the problems found.
    """
    codes = read_tensor(f, header, f"{name}{SEPARATOR}idx")
    values = read_tensor(f, header, f"{name}{SEPARATOR}val")
    quantized = spec.value_encoding in QUANTIZED_BITS
    scales = read_tensor(f, header, f"{name}{SEPARATOR}scale") if quantized else None
    indices = decode_indices(codes, spec.index_encoding)  # one entry per non-zero gap code
    gap = spec.index_encoding.startswith("gap")
    found = _gap_checks(name, spec, codes, indices.numel()) if gap else []
    if found:
        return None, found
    # gap streams decode strictly increasing: only the range needs checking; V10 concerns
    # raw values only (quantized codes are checked below, replacement values are any bits)
    if scales is not None or spec.value_encoding == REPLACE:
        found = index_problems(name, spec.shape, indices, increasing=gap)
    else:
        found = entry_problems(name, spec.shape, indices, values, increasing=gap)
    if scales is not None:
        found += _code_checks(name, spec, values, scales)
    if found:
        return None, found
    if spec.value_encoding == REPLACE:
        return ReplaceTensor(spec.shape, indices, values), []
    if scales is None:
        return DeltaTensor(spec.shape, indices, values), []
    bits = QUANTIZED_BITS[spec.value_encoding]
    assert spec.block_size is not None
    return QuantizedTensor(spec.shape, indices, values, scales, bits, spec.block_size), []


def _read_entry(f: BinaryIO, header: Header, scan: Scan, name: str) -> None:
    entry, found = read_entry(f, header, name, scan.specs[name])
    if isinstance(entry, QuantizedTensor):
        scan.quantized[name] = entry
    elif isinstance(entry, ReplaceTensor):
        scan.replaced[name] = entry
    elif entry is not None:
        scan.entries[name] = entry
    scan.problems += [(name, e) for e in found]


def _scan_open(f: BinaryIO, scan: Scan, read_data: bool) -> None:
    header = scan.header = parse_header(f, os.fstat(f.fileno()).st_size)
    found, specs, scan.newer = check_metadata(header.metadata)
    scan.problems += found
    if specs is None:
        return
    scan.specs = specs
    declared = set(specs) | {n for n, _ in found if n is not None}
    scan.problems += _tensor_set(header, specs, declared)
    broken = {n for n, _ in scan.problems if n is not None}
    for name in sorted(set(specs) - broken):
        errors = _header_checks(name, specs[name], header)
        scan.problems += [(name, e) for e in errors]
        if not errors and read_data:
            _read_entry(f, header, scan, name)


def scan_file(path: str | os.PathLike[str], *, read_data: bool = True) -> Scan:
    """Check the file at ``path`` against spec §7 and decode its valid entries.

    Raises:
        NotRegularFileError: ``path`` is a FIFO, socket or device (refused before reading).
        OSError: The file cannot be opened or read.
    """
    scan = Scan()
    with open_input(path, "a delta file") as f:
        try:
            _scan_open(f, scan, read_data)
        except SpdeltaError as e:
            err = e if isinstance(e, FormatError) else ContainerError(str(e))
            scan.problems.append((None, err))
        except _LOW_LEVEL as e:  # a gap in the checks above; never let it escape raw
            scan.problems.append(
                (
                    None,
                    ContainerError(
                        f"unreadable file ({type(e).__name__}: {str(e)[:80]}) (spec §7 V1); "
                        "the file is corrupt or not safetensors."
                    ),
                )
            )
    return scan
