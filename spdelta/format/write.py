"""Writing delta files: ``save_delta`` (deterministic, atomic, validated)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from spdelta._io import atomic_write
from spdelta._replace import Patch, ReplaceTensor, check_replace, storable
from spdelta._version import __version__
from spdelta.delta import SEPARATOR, DeltaTensor, SparseDelta, _combine, numel_of
from spdelta.errors import DtypeError, FormatError, IndexRangeError, MetadataError
from spdelta.format._container import encode_header
from spdelta.format._fastcheck import entry_problems, index_problems
from spdelta.format._metadata import check_reserved
from spdelta.format.codec import encode_auto, encode_indices
from spdelta.format.constants import (
    DTYPE_BITS,
    ENCODINGS,
    INDEX_DTYPES,
    KEY_MINORS,
    KEY_PRODUCER,
    KEY_TENSORS,
    KEY_VERSION,
    MAJOR,
    QUANTIZED_VALUE_DTYPES,
    REPLACE,
    SCALE_DTYPE,
    TORCH_DTYPES,
    min_minor,
)
from spdelta.quantized import QuantizedDelta, QuantizedTensor
from spdelta.types import Shape

__all__ = ["encode_entry", "finish_metadata", "merged_metadata", "save_delta", "sort_key"]

#: A stored tensor: ``(key, safetensors dtype name, 1-D CPU tensor)``.
Part = tuple[str, str, Tensor]

_VALUE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


def merged_metadata(base: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    """``base`` updated by ``extra``, with the producer set; checked against V4."""
    meta = {**base, **(extra or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MetadataError(
            "save_delta: metadata must map str to str (spec §7 V4); "
            "convert values with str() or json.dumps()."
        )
    for key in (KEY_VERSION, KEY_TENSORS):
        if key in meta:
            raise MetadataError(
                f"save_delta: metadata key {key!r} is written by save_delta "
                "(spec §7 V4); remove it from the metadata."
            )
    if extra is None or KEY_PRODUCER not in extra:
        meta[KEY_PRODUCER] = f"spdelta {__version__}"
    problems = check_reserved(meta)
    if problems:
        raise _combine([e for _, e in problems])
    return meta


def _encode(name: str, indices: Tensor, numel: int, requested: str) -> tuple[str, Tensor]:
    """The index encoding (``auto``: the smallest) and the ``::idx`` codes."""
    if requested == "auto":
        return encode_auto(indices, numel)
    if requested not in ENCODINGS:
        raise MetadataError(
            f"save_delta: index_encoding must be 'auto' or one of {list(ENCODINGS)} "
            f"(spec §7 V4); found {requested!r}."
        )
    if requested == "abs32" and numel > 2**31:
        raise IndexRangeError(
            f"{name!r}: abs32 indices cannot address {numel} elements "
            "(spec §7 V8); use index_encoding='abs64' or 'auto'."
        )
    return requested, encode_indices(indices, requested)


def _raw_parts(
    name: str, e: DeltaTensor, index_encoding: str, value_dtype: torch.dtype | None
) -> tuple[list[Part], dict[str, object]]:
    values = e.values.detach().to("cpu", value_dtype).contiguous()
    if values.dtype not in _VALUE_NAMES:
        raise DtypeError(
            f"{name!r}: values must be float16, bfloat16, float32 or float64 "
            f"(spec §7 V6); found {values.dtype}. Pass value_dtype=torch.bfloat16."
        )
    found = entry_problems(name, e.shape, e.indices, values)
    if found:
        raise _combine(found)
    return _index_and_values(name, e.shape, e.indices, index_encoding,
                             _VALUE_NAMES[values.dtype], values, "raw")


def _index_and_values(
    name: str, shape: Shape, indices: Tensor, index_encoding: str, value_dtype: str,
    values: Tensor, value_encoding: str,
) -> tuple[list[Part], dict[str, object]]:
    """The ``::idx`` and ``::val`` parts and the header entry of a raw or replace tensor."""
    encoding, codes = _encode(name, indices, numel_of(shape), index_encoding)
    parts = [
        (f"{name}{SEPARATOR}idx", INDEX_DTYPES[encoding], codes),
        (f"{name}{SEPARATOR}val", value_dtype, values),
    ]
    spec = {
        "index_encoding": encoding,
        "nnz": int(indices.numel()),
        "shape": list(shape),
        "value_encoding": value_encoding,
    }
    return parts, spec


def _quantized_parts(
    name: str, t: QuantizedTensor, index_encoding: str
) -> tuple[list[Part], dict[str, object]]:
    QuantizedDelta({name: t})  # full layout check of the tensor (raises a FormatError)
    encoding, codes = _encode(name, t.indices, numel_of(t.shape), index_encoding)
    value_encoding = "int8" if t.bits == 8 else "int4"
    parts = [
        (f"{name}{SEPARATOR}idx", INDEX_DTYPES[encoding], codes),
        (f"{name}{SEPARATOR}val", QUANTIZED_VALUE_DTYPES[value_encoding], t.codes.cpu()),
        (f"{name}{SEPARATOR}scale", SCALE_DTYPE, t.scales.detach().cpu().contiguous()),
    ]
    spec = {
        "block_size": t.block_size,
        "index_encoding": encoding,
        "nnz": t.nnz,
        "shape": list(t.shape),
        "value_encoding": value_encoding,
    }
    return parts, spec


_STORED_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def _replace_parts(
    name: str, t: ReplaceTensor, index_encoding: str
) -> tuple[list[Part], dict[str, object]]:
    found = [] if storable(t.values.dtype) and t.values.shape == t.indices.shape else (
        check_replace(name, t.shape, t.indices, t.values))
    found = found or index_problems(name, t.shape, t.indices)
    if found:
        raise _combine(found)
    values = t.values.detach().to("cpu").contiguous()  # the bits, in the base's dtype
    return _index_and_values(name, t.shape, t.indices, index_encoding,
                             _STORED_NAMES[values.dtype], values, REPLACE)


def encode_entry(
    name: str,
    entry: DeltaTensor | QuantizedTensor | ReplaceTensor,
    *,
    index_encoding: str = "auto",
    value_dtype: torch.dtype | None = None,
) -> tuple[list[Part], dict[str, object]]:
    """Stored tensors ``(key, dtype name, tensor)`` and the ``spdelta.tensors`` entry of one tensor.

    ``value_dtype`` casts raw (additive) values only: replacement values always keep the
    base's dtype and bits.

    Raises:
        FormatError: A subclass, when the entry breaks a rule of spec §7.
    """
    if isinstance(entry, ReplaceTensor):
        return _replace_parts(name, entry, index_encoding)
    if isinstance(entry, QuantizedTensor):
        if value_dtype is not None:
            raise DtypeError(
                f"{name!r}: value_dtype cannot be applied to quantized values (spec §7 V6); "
                "dequantize first or pass value_dtype=None."
            )
        return _quantized_parts(name, entry, index_encoding)
    return _raw_parts(name, DeltaTensor(*entry), index_encoding, value_dtype)


def _encode_entries(
    delta: SparseDelta | QuantizedDelta | Patch,
    index_encoding: str,
    value_dtype: torch.dtype | None,
) -> tuple[list[Part], dict[str, dict[str, object]]]:
    """Stored tensors ``(key, dtype name, tensor)`` and the ``spdelta.tensors`` object."""
    parts: list[Part] = []
    specs: dict[str, dict[str, object]] = {}
    problems: list[FormatError] = []
    for name, e in delta.items():
        try:
            more, spec = encode_entry(
                name, e, index_encoding=index_encoding, value_dtype=value_dtype
            )
        except FormatError as err:
            if isinstance(err, MetadataError) and "index_encoding must be" in str(err):
                raise
            problems.append(err)
            continue
        parts += more
        specs[name] = spec
    if problems:
        raise _combine(problems)
    return parts, specs


def finish_metadata(meta: dict[str, str], specs: Mapping[str, Mapping[str, object]]) -> None:
    """Set ``spdelta.tensors`` and the lowest ``spdelta.format_version`` the specs need (§8)."""
    meta[KEY_TENSORS] = json.dumps(dict(specs), sort_keys=True, separators=(",", ":"))
    minor = max((min_minor(str(s["value_encoding"])) for s in specs.values()), default=0)
    minor = max([minor, *(KEY_MINORS.get(k, 0) for k in meta)])
    meta[KEY_VERSION] = f"{MAJOR}.{minor}"


def sort_key(key: str, dtype: str) -> tuple[int, str]:
    """Canonical data order: item size descending, then stored name (every tensor aligned)."""
    return (-DTYPE_BITS[dtype], key)


def save_delta(
    delta: SparseDelta | QuantizedDelta | Patch,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    index_encoding: str = "auto",
    value_dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``delta`` to ``path`` in the spdelta format (``spec/format.md``), atomically.

    The file is a safetensors file holding ``<name>::idx`` and ``<name>::val`` per
    tensor (and ``<name>::scale`` for a quantized one). Output is deterministic: the same
    delta and metadata give the same bytes. Stored data is ordered by item size, then
    name, so every tensor is aligned. The file is labelled with the lowest version whose
    features it uses (spec §8): ``1.0``; ``1.1`` with quantized values (a
    ``QuantizedDelta``); ``1.3`` with replacement tensors or a result fingerprint (a
    :class:`~spdelta.patch.Patch`).

    Args:
        delta: The delta to write: a ``SparseDelta``, a ``QuantizedDelta`` from
            :func:`spdelta.ops.quantize` (int8 / int4 codes with per-block float32 scales),
            or a :class:`~spdelta.patch.Patch` (replacement tensors stored in their own
            dtype, bit for bit, and additive ones).
        path: Destination file (conventionally ``*.safetensors``).
        metadata: ``str -> str`` keys merged over ``delta.metadata``. ``spdelta.producer``
            defaults to ``"spdelta <version>"`` unless given here.
        index_encoding: ``"auto"`` (smallest of gap8/gap16/abs32/abs64 per tensor by exact
            byte count) or one of ``"gap8"``, ``"gap16"``, ``"abs32"``, ``"abs64"``.
        value_dtype: Cast the additive values to this dtype (float16, bfloat16, float32,
            float64) before writing; ``None`` keeps each tensor's dtype. Replacement
            values are never cast.
        overwrite: Replace an existing file; when false, raise ``OutputExistsError``.

    Raises:
        NonFiniteError: A value is NaN or infinite (possibly after the cast).
        DtypeError: Values are not of a storable float dtype.
        MetadataError: Bad metadata (non-str, reserved or unknown ``spdelta.*`` key) or
            an unknown ``index_encoding``.
        IndexRangeError: ``abs32`` was requested for a tensor of more than 2**31 elements.
        OutputExistsError: ``overwrite`` is false and ``path`` exists.
        OSError: The file cannot be written; an existing file is then left intact.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta import SparseDelta
        >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> d = SparseDelta({"w": ((1000, 100), torch.arange(0, 100_000, 100), torch.ones(1000))})
        >>> save_delta(d, path, value_dtype=torch.bfloat16)  # gap8 codes + bf16 values
        >>> os.path.getsize(path) / d.nnz < 3.5
        True
    """
    meta = merged_metadata(delta.metadata, metadata)
    parts, specs = _encode_entries(delta, index_encoding, value_dtype)
    finish_metadata(meta, specs)
    parts.sort(key=lambda p: sort_key(p[0], p[1]))  # aligned, no padding needed
    header = encode_header(
        meta, [(k, dt, [t.numel()], t.numel() * t.element_size()) for k, dt, t in parts]
    )
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(header)
        for _, _, t in parts:
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)
