"""Delta-file tools streamed one tensor at a time: merge, compose, quantize, convert.

Every tool opens its inputs with :class:`~spdelta.format.stream.DeltaReader`, checks that
they fit together (:func:`spdelta.format.check_inputs`), then reads, transforms and writes
one tensor at a time through :class:`~spdelta.format.stream.DeltaWriter`: peak memory is
bounded by the largest tensor (times the number of inputs), not by the model. Outputs are
atomic and record ``spdelta.provenance`` (inputs' sha256, operation, parameters, spdelta
version, command). The maths is :mod:`spdelta.ops`' per-tensor kernels, so a streamed
merge equals the in-memory :func:`spdelta.ops.merge` of the loaded files. This module sits
above both :mod:`spdelta.ops` and :mod:`spdelta.format`; each tool returns a
:class:`FileReport`.

Example:
    >>> import os, tempfile, torch
    >>> from spdelta import SparseDelta
    >>> from spdelta.format import load_delta, save_delta
    >>> tmp = tempfile.mkdtemp()
    >>> a, b, out = (os.path.join(tmp, n) for n in ("a.st", "b.st", "out.st"))
    >>> save_delta(SparseDelta({"w": ((4,), torch.tensor([0]), torch.tensor([1.0]))}), a)
    >>> save_delta(SparseDelta({"w": ((4,), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))}), b)
    >>> report = merge_files([a, b], out, method="task_arithmetic", weights=[0.5, 0.5])
    >>> load_delta(out).to_dense("w").tolist(), report.nnz
    ([1.0, 0.0, 1.0, 0.0], 2)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from spdelta._replace import Entry, ReplaceTensor
from spdelta._version import __version__
from spdelta.delta import DeltaTensor, numel_of
from spdelta.errors import CompositionError
from spdelta.format._chain import chain_keys, is_chain
from spdelta.format.constants import KEY_PRODUCER, KEY_PROVENANCE
from spdelta.format.inputs import CheckedInputs, check_inputs, file_sha256, input_shapes
from spdelta.format.stream import DeltaReader, DeltaWriter
from spdelta.ops import merge_tensor, sequence_tensor
from spdelta.ops._common import check_finite_result
from spdelta.ops.quantize import quantize_tensor
from spdelta.quantized import QuantizedTensor, dequantize_tensor

__all__ = ["FileReport", "compose_files", "convert_file", "merge_files", "quantize_file"]


@dataclass(frozen=True)
class FileReport:
    """What a file tool did (or, in a dry run, would do).

    Attributes:
        operation: ``"merge"``, ``"compose"``, ``"quantize"`` or ``"convert"``.
        inputs: The input paths, in the order given.
        output: The output path.
        parameters: The operation's parameters, as recorded in the provenance.
        tensors: Number of tensors in the output.
        written: Whether ``output`` was written (false for a dry run).
        input_bytes: Total size of the inputs (merge and compose), else ``None``.
        nnz: Stored entries written (merge and compose, once written), else ``None``.
        output_bytes: Size of the written output, else ``None``.
        max_abs_error: Largest ``|v - v'|`` (quantize only), else ``None``.
        relative_error: ``||v - v'||_2 / ||v||_2`` over all tensors, float64 (quantize
            only), else ``None``.
    """

    operation: str
    inputs: list[str]
    output: str
    parameters: dict[str, Any]
    tensors: int
    written: bool
    input_bytes: int | None = None
    nnz: int | None = None
    output_bytes: int | None = None
    max_abs_error: float | None = None
    relative_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict, fields that do not apply (``None``) left out.

        Example:
            >>> FileReport("convert", ["a"], "b", {}, 1, True, output_bytes=9).to_dict()
            {'operation': 'convert', 'inputs': ['a'], 'output': 'b', 'parameters': {}, \
'tensors': 1, 'written': True, 'output_bytes': 9}
        """
        return {k: v for k, v in asdict(self).items() if v is not None}


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


def _plan(readers: Sequence[DeltaReader], operation: str, allow: bool) -> CheckedInputs:
    """Shapes and output base keys: a chain of patches composes by its links (spec §6.5)."""
    metas = [r.raw_metadata for r in readers]
    if operation == "compose" and is_chain(metas):
        labels = [os.path.basename(r.path) for r in readers]
        base = chain_keys(list(zip(labels, metas, strict=True)), allow_mismatch=allow)
        return CheckedInputs(input_shapes(readers), base)
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
) -> FileReport:
    """Shared loop of merge and compose: one output tensor per name of any input."""
    with _open_all(paths) as readers:
        plan = _plan(readers, operation, allow_base_mismatch)
        report = FileReport(operation, [os.fspath(p) for p in paths], os.fspath(output),
                            parameters, len(plan.shapes), False,
                            input_bytes=sum(os.path.getsize(p) for p in paths))
        if dry_run:
            return report
        meta = {**plan.base, KEY_PROVENANCE: _provenance(operation, paths, parameters, command)}
        nnz = 0
        with DeltaWriter(output, metadata=meta, overwrite=overwrite) as writer:
            for name, shape in plan.shapes.items():
                entries = [_read_any(r, name) if name in r else None for r in readers]
                out = kernel(name, entries, numel_of(shape))
                del entries  # keep only the output tensor alive while writing
                writer.write(name, out)
                nnz += out.nnz
        return replace(report, written=True, nnz=nnz, output_bytes=os.path.getsize(output))


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
) -> FileReport:
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
        A :class:`FileReport` with ``input_bytes`` and, once written, ``nnz`` and
        ``output_bytes``.

    Raises:
        ParameterError: A merge parameter is invalid.
        ShapeError, BaseMismatchError: The inputs do not fit together (see
            :func:`spdelta.format.check_inputs`).
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
) -> FileReport:
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
) -> FileReport:
    """Quantize every tensor of a delta file to int8 / int4 (format 1.1), tensor by tensor.

    Returns:
        A :class:`FileReport` with ``output_bytes``, ``max_abs_error`` and
        ``relative_error`` (``||v - v'|| / ||v||`` over all tensors, float64).

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
    return FileReport("quantize", [os.fspath(input)], os.fspath(output), parameters, tensors,
                      True, output_bytes=os.path.getsize(output), max_abs_error=max_abs,
                      relative_error=rel)


def convert_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,  # noqa: A002
    index_encoding: str = "auto",
    value_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> FileReport:
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
    return FileReport("convert", [os.fspath(input)], os.fspath(output), parameters, tensors,
                      True, output_bytes=os.path.getsize(output))
