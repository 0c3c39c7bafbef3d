"""Delta-file tools streamed one tensor at a time: merge, compose, quantize, convert.

Every tool opens its inputs with :class:`~spdelta.format.stream.DeltaReader`, checks that
they fit together (:func:`check_inputs`), then reads, transforms and writes one tensor at a
time through :class:`~spdelta.format.stream.DeltaWriter`: peak memory is bounded by the
largest tensor (times the number of inputs), not by the model. Outputs are atomic and
record ``spdelta.provenance`` (inputs' sha256, operation, parameters, spdelta version,
command). The maths is :mod:`spdelta.ops`' per-tensor kernels, so a streamed merge equals
the in-memory :func:`spdelta.ops.merge` of the loaded files.

Example:
    >>> import os, tempfile, torch
    >>> from spdelta import SparseDelta
    >>> from spdelta.format import load_delta, save_delta
    >>> tmp = tempfile.mkdtemp()
    >>> a, b, out = (os.path.join(tmp, n) for n in ("a.st", "b.st", "out.st"))
    >>> save_delta(SparseDelta({"w": ((4,), torch.tensor([0]), torch.tensor([1.0]))}), a)
    >>> save_delta(SparseDelta({"w": ((4,), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))}), b)
    >>> report = merge_files([a, b], out, method="task_arithmetic", weights=[0.5, 0.5])
    >>> load_delta(out).to_dense("w").tolist(), report["nnz"]
    ([1.0, 0.0, 1.0, 0.0], 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from spdelta._replace import Entry, ReplaceTensor
from spdelta._version import __version__
from spdelta.delta import DeltaTensor, numel_of
from spdelta.errors import BaseMismatchError, CompositionError, ShapeError, SpdeltaWarning
from spdelta.format._chain import chain_keys, is_chain
from spdelta.format.constants import (
    KEY_BASE_MISMATCH,
    KEY_BASE_MODEL,
    KEY_FINGERPRINT,
    KEY_PRODUCER,
    KEY_PROVENANCE,
    KEY_REVISION,
)
from spdelta.format.stream import DeltaReader, DeltaWriter
from spdelta.ops import merge_tensor, sequence_tensor
from spdelta.ops._common import check_finite_result
from spdelta.ops.quantize import QuantizedTensor, dequantize_tensor, quantize_tensor

__all__ = [
    "BaseMismatchError",
    "check_inputs",
    "compose_files",
    "convert_file",
    "file_sha256",
    "merge_files",
    "quantize_file",
]

#: Metadata keys that identify the base model; inputs that disagree on one are refused.
BASE_KEYS = (KEY_BASE_MODEL, KEY_REVISION, KEY_FINGERPRINT)
Report = dict[str, Any]


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


def check_inputs(readers: Sequence[DeltaReader], *, allow_base_mismatch: bool = False) -> Report:
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
        ``{"shapes": {name: shape}, "base": {key: value}}``: the union of tensor names with
        their shape, and the metadata the output carries about its base.

    Raises:
        ShapeError: A tensor name has different shapes in two inputs.
        BaseMismatchError: Two inputs name different base models (``spdelta.base_model``,
            ``.revision`` or ``.fingerprint``) and ``allow_base_mismatch`` is false.

    Warns:
        SpdeltaWarning: Some inputs carry a base key and others do not.
    """
    shapes = _shapes(readers)
    return {"shapes": shapes, "base": _base_keys(readers, allow_base_mismatch)}


def _shapes(readers: Sequence[DeltaReader]) -> dict[str, tuple[int, ...]]:
    """Union of tensor names -> shape; ``ShapeError`` when two inputs disagree on one."""
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


@contextlib.contextmanager
def _open_all(paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[DeltaReader]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(DeltaReader(p)) for p in paths]


def _provenance(
    operation: str,
    paths: Sequence[str | os.PathLike[str]],
    parameters: dict[str, Any],
    command: str | None,
) -> str:
    inputs = [{"file": os.path.basename(os.fspath(p)), "sha256": file_sha256(p)} for p in paths]
    record = {
        "command": command,
        "inputs": inputs,
        "operation": operation,
        "parameters": parameters,
        "spdelta_version": __version__,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _read_any(reader: DeltaReader, name: str) -> Entry:
    """One entry: additive (quantized values dequantized) or replacing."""
    entry = reader.read_entry(name)
    return entry if isinstance(entry, ReplaceTensor) else reader.read(name)


def _plan(readers: Sequence[DeltaReader], operation: str, allow: bool) -> dict[str, Any]:
    """Shapes and output base keys: a chain of patches composes by its links (spec §6.5)."""
    metas = [r.raw_metadata for r in readers]
    if operation == "compose" and is_chain(metas):
        labels = [os.path.basename(r.path) for r in readers]
        base = chain_keys(list(zip(labels, metas, strict=True)), allow_mismatch=allow)
        return {"shapes": _shapes(readers), "base": base}
    if operation != "compose":
        for r in readers:
            replaced = [n for n in r.names if r.info(n).value_encoding == "replace"]
            if replaced:
                raise CompositionError(
                    f"{r.path}: {replaced[0]!r} is a replacement tensor; merge methods "
                    "combine additive deltas only (spec §6.5). Use compose to apply patches "
                    "in sequence."
                )
    return check_inputs(readers, allow_base_mismatch=allow)


def _combine_files(
    operation: str,
    paths: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    kernel: Callable[[str, list[Entry | None], int], Entry],
    parameters: dict[str, Any],
    *,
    overwrite: bool,
    allow_base_mismatch: bool,
    command: str | None,
    dry_run: bool,
) -> Report:
    """Shared loop of merge and compose: one output tensor per name of any input."""
    with _open_all(paths) as readers:
        plan = _plan(readers, operation, allow_base_mismatch)
        report: Report = {
            "operation": operation,
            "inputs": [os.fspath(p) for p in paths],
            "output": os.fspath(output),
            "parameters": parameters,
            "tensors": len(plan["shapes"]),
            "written": False,
            "input_bytes": sum(os.path.getsize(p) for p in paths),
        }
        if dry_run:
            return report
        meta = {**plan["base"], KEY_PROVENANCE: _provenance(operation, paths, parameters, command)}
        nnz = 0
        with DeltaWriter(output, metadata=meta, overwrite=overwrite) as writer:
            for name, shape in plan["shapes"].items():
                entries = [_read_any(r, name) if name in r else None for r in readers]
                out = kernel(name, entries, numel_of(shape))
                del entries  # keep only the output tensor alive while writing
                writer.write(name, out)
                nnz += out.nnz
        return {**report, "written": True, "nnz": nnz, "output_bytes": os.path.getsize(output)}


def merge_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    method: str = "task_arithmetic",
    weights: float | Sequence[float] | None = None,
    density: float | Sequence[float] | None = None,
    seed: int | None = None,
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    command: str | None = None,
    dry_run: bool = False,
) -> Report:
    """Merge delta files tensor by tensor with :func:`spdelta.ops.merge_tensor`; write ``output``.

    The result equals ``save_delta(merge([load_delta(p) for p in inputs], ...))`` apart
    from metadata: the output carries the base keys all inputs share and a provenance record.

    Args:
        inputs: Two or more (one is allowed) delta files.
        output: Destination, written atomically.
        method, weights, density, seed, params: As in :func:`spdelta.ops.merge`.
        overwrite: Replace an existing ``output``.
        allow_base_mismatch: Accept inputs whose base-model metadata differ.
        command: The command line, recorded in the provenance.
        dry_run: Check inputs and parameters, write nothing.

    Returns:
        A report: ``operation``, ``inputs``, ``output``, ``parameters``, ``tensors``,
        ``written``, ``input_bytes`` and, once written, ``nnz`` and ``output_bytes``.

    Raises:
        ParameterError: A merge parameter is invalid.
        ShapeError, BaseMismatchError: The inputs do not fit together (see :func:`check_inputs`).
        FormatError: An input is not a valid delta file.
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
    """
    params = dict(params or {})
    n = len(inputs)
    empty = [torch.zeros(0, dtype=torch.long)] * n
    merge_tensor(
        "",
        empty,
        [torch.zeros(0)] * n,
        numel=0,
        method=method,
        weights=weights,
        density=density,
        seed=seed,
        **params,
    )  # validates the arguments up front
    parameters = {"method": method, "weights": weights, "density": density, "seed": seed, **params}

    def kernel(name: str, entries: list[Entry | None], numel: int) -> Entry:
        present = [e for e in entries if e is not None]
        empty_i = torch.zeros(0, dtype=torch.long)
        empty_v = torch.zeros(0, dtype=present[0].values.dtype)
        idx = [e.indices if e is not None else empty_i for e in entries]
        val = [e.values if e is not None else empty_v for e in entries]
        i, v = merge_tensor(
            name,
            idx,
            val,
            numel=numel,
            method=method,
            weights=weights,
            density=density,
            seed=seed,
            **params,
        )
        return DeltaTensor(present[0].shape, i, v)

    return _combine_files(
        "merge",
        inputs,
        output,
        kernel,
        parameters,
        overwrite=overwrite,
        allow_base_mismatch=allow_base_mismatch,
        command=command,
        dry_run=dry_run,
    )


def compose_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
    command: str | None = None,
    dry_run: bool = False,
) -> Report:
    """Compose delta files in order, tensor by tensor (spec §6.5), streamed.

    Additive deltas are summed (:func:`spdelta.ops.compose`). With replacement tensors
    (format 1.3) the inputs apply in the given order: a later replacement wins, an
    addition after a replacement is added to it, and compositions that depend on the
    base are refused (:func:`spdelta.ops.then_tensor`). When some input carries a result
    fingerprint, the inputs must be consecutive steps of a chain (each applies to what the
    one before gives); the output applies to the first input's base and gives the last
    one's result.

    Arguments and result are those of :func:`merge_files`.

    Raises:
        CompositionError: A tensor's composition depends on the base (spec §6.5).
        BaseMismatchError: Inputs made for different bases, or a chain out of order.
        ShapeError, FormatError, OutputExistsError: As :func:`merge_files`.
    """

    def kernel(name: str, entries: list[Entry | None], numel: int) -> Entry:
        out = sequence_tensor(name, entries)
        if isinstance(out, DeltaTensor):
            check_finite_result(name, out.values, "the sum of the inputs",
                                "scale the inputs down (spdelta merge --weights)")
        return out

    return _combine_files(
        "compose",
        inputs,
        output,
        kernel,
        {},
        overwrite=overwrite,
        allow_base_mismatch=allow_base_mismatch,
        command=command,
        dry_run=dry_run,
    )


def _carried(
    reader: DeltaReader,
    operation: str,
    path: str | os.PathLike[str],
    parameters: dict[str, Any],
    command: str | None,
) -> dict[str, str]:
    meta = {k: v for k, v in reader.metadata.items() if k not in (KEY_PRODUCER, KEY_PROVENANCE)}
    meta[KEY_PROVENANCE] = _provenance(operation, [path], parameters, command)
    return meta


def quantize_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    bits: int = 8,  # noqa: A002
    block_size: int = 64,
    overwrite: bool = False,
    command: str | None = None,
) -> Report:
    """Quantize every tensor of a delta file to int8 / int4 (format 1.1), tensor by tensor.

    Returns:
        A report with ``max_abs_error`` and ``relative_error`` (``||v - v'|| / ||v||`` over
        all tensors, float64) besides the fields of :func:`merge_files`.

    Raises:
        ParameterError: ``bits`` is not 8 or 4, or ``block_size`` < 1.
        FormatError, OutputExistsError: As :func:`merge_files`.
    """
    quantize_tensor(torch.zeros(0), bits=bits, block_size=block_size)  # validates up front
    parameters = {"bits": bits, "block_size": block_size}
    max_abs = err2 = ref2 = 0.0
    with DeltaReader(input) as reader:
        meta = _carried(reader, "quantize", input, parameters, command)
        with DeltaWriter(output, metadata=meta, overwrite=overwrite) as writer:
            for name in reader.names:
                e = reader.read(name)  # refuses replacement tensors: they stay exact
                codes, scales = quantize_tensor(e.values, bits=bits, block_size=block_size)
                writer.write(
                    name, QuantizedTensor(e.shape, e.indices, codes, scales, bits, block_size)
                )
                v = e.values.to(torch.float64)
                err = v - dequantize_tensor(
                    codes, scales, nnz=e.nnz, bits=bits, block_size=block_size, dtype=torch.float64
                )
                max_abs = max(max_abs, float(err.abs().max())) if err.numel() else max_abs
                err2 += float((err * err).sum())
                ref2 += float((v * v).sum())
        tensors = len(reader.names)
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    return {
        "operation": "quantize",
        "inputs": [os.fspath(input)],
        "output": os.fspath(output),
        "parameters": parameters,
        "tensors": tensors,
        "written": True,
        "max_abs_error": max_abs,
        "relative_error": rel,
        "output_bytes": os.path.getsize(output),
    }


def convert_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,  # noqa: A002
    index_encoding: str = "auto",
    value_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> Report:
    """Re-encode a delta file: index encoding and/or value dtype, tensor by tensor.

    With ``value_dtype=None`` values are kept as stored (quantized tensors stay quantized);
    with a float dtype, quantized tensors are dequantized and every value is cast.

    Raises:
        MetadataError: Unknown ``index_encoding``.
        IndexRangeError: ``abs32`` for a tensor of more than 2**31 elements.
        FormatError, OutputExistsError: As :func:`merge_files`.
    """
    parameters = {
        "index_encoding": index_encoding,
        "value_dtype": None if value_dtype is None else str(value_dtype),
    }
    with DeltaReader(input) as reader:
        meta = _carried(reader, "convert", input, parameters, command)
        with DeltaWriter(
            output,
            metadata=meta,
            overwrite=overwrite,
            index_encoding=index_encoding,
            value_dtype=value_dtype,
        ) as writer:
            for name in reader.names:
                entry = reader.read_entry(name)
                if value_dtype is not None and not isinstance(entry, ReplaceTensor):
                    entry = reader.read(name)  # dequantized, then cast by the writer
                writer.write(name, entry)
        tensors = len(reader.names)
    return {
        "operation": "convert",
        "inputs": [os.fspath(input)],
        "output": os.fspath(output),
        "parameters": parameters,
        "tensors": tensors,
        "written": True,
        "output_bytes": os.path.getsize(output),
    }
