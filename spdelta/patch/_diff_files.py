"""``diff_checkpoints``: a patch file from two checkpoints on disk, one tensor at a time."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from spdelta._progress import tqdm
from spdelta._replace import ReplaceTensor
from spdelta._version import __version__
from spdelta.delta import DeltaTensor
from spdelta.errors import KeyMismatchError, ParameterError, ShapeError, format_names
from spdelta.format import DeltaWriter
from spdelta.format.constants import (
    KEY_FINGERPRINT,
    KEY_PROVENANCE,
    KEY_RESULT_FINGERPRINT,
    TORCH_DTYPES,
)
from spdelta.format.fingerprint import (
    combine_records,
    file_records,
    sample_positions,
    sample_record,
)
from spdelta.hf.checkpoint import CheckpointError
from spdelta.hf.extract import _diff, _nonzero_entry
from spdelta.patch._source import Source
from spdelta.rules import budget, topk_indices

__all__ = ["CHUNK_BYTES", "diff_checkpoints"]

#: Bytes compared at a time per side: bounds a diff's temporaries (32 MiB = 16 Mi bf16).
CHUNK_BYTES = 32 << 20


def check_pair(base: Source, tuned: Source) -> None:
    """Both checkpoints hold the same names, each with one dtype and shape.

    Raises:
        KeyMismatchError: A tensor is in one checkpoint only (a patch changes values only).
        ShapeError: A tensor's dtype or shape differs.
    """
    a, b = set(base.names), set(tuned.names)
    if a != b:
        raise KeyMismatchError(
            f"the checkpoints hold different tensors: only in BASE [{format_names(a - b)}], "
            f"only in TUNED [{format_names(b - a)}]; a patch changes values, never the set of "
            "tensors, so diff refuses them. Diff checkpoints of one architecture.")
    bad = [f"{n!r}: {base.tensors[n].dtype}{list(base.tensors[n].shape)} vs "
           f"{tuned.tensors[n].dtype}{list(tuned.tensors[n].shape)}" for n in sorted(a)
           if (base.tensors[n].dtype, base.tensors[n].shape)
           != (tuned.tensors[n].dtype, tuned.tensors[n].shape)]
    if bad:
        raise ShapeError(f"{len(bad)} tensors differ in dtype or shape: " + "; ".join(bad[:10])
                         + ". A patch keeps each tensor's dtype and shape; save both in one dtype.")


class Samples:
    """The fingerprint samples (spec §5.1) of one tensor on both sides, filled window by
    window, so that a diff fingerprints both checkpoints without reading anything twice."""

    def __init__(self, numel: int, itemsize: int) -> None:
        self.positions = np.asarray(sample_positions(numel), dtype=np.int64)
        self.old = np.zeros(self.positions.size, dtype=f"<u{itemsize}")
        self.new = np.zeros(self.positions.size, dtype=f"<u{itemsize}")

    def take(self, start: int, old: np.ndarray, new: np.ndarray) -> None:
        """Copy the sampled elements that lie in the window starting at element ``start``."""
        lo, hi = np.searchsorted(self.positions, [start, start + old.size])
        at = self.positions[lo:hi] - start
        self.old[lo:hi], self.new[lo:hi] = old[at], new[at]


def exact_entry(base: Source, tuned: Source, name: str, *, chunk_bytes: int = CHUNK_BYTES,
                samples: Samples | None = None) -> ReplaceTensor:
    """Every element of tensor ``name`` whose bits differ, compared a chunk at a time.

    Both sides are seen through memory maps of one chunk each (no copy); only the changed
    positions and their new values are kept, and the fingerprint samples if ``samples``.

    Args:
        base, tuned: The two checkpoints (``check_pair`` passed).
        name: The tensor, of a dtype of whole bytes.
        chunk_bytes: Bytes compared at a time per side (whole elements, at least one).
        samples: Filled with both sides' fingerprint samples of this tensor.
    """
    st = base.tensors[name]
    dtype = TORCH_DTYPES[st.dtype]
    step = max(1, chunk_bytes // dtype.itemsize)
    idx, vals = [], []
    for start in range(0, st.numel, step):
        n = min(step, st.numel - start)
        with base.window(name, start, n) as old, tuned.window(name, start, n) as new:
            where = np.flatnonzero(old != new)  # the bits differ
            vals.append(new[where])  # copies: the windows are unmapped next
            if samples is not None:
                samples.take(start, old, new)
            del old, new
        where += start
        idx.append(where)
    if not idx:
        empty = torch.zeros(0, dtype=torch.long)
        return ReplaceTensor(st.shape, empty, torch.zeros(0, dtype=dtype))
    i = np.concatenate(idx) if len(idx) != 1 else idx[0]
    v = np.concatenate(vals) if len(vals) != 1 else vals[0]
    return ReplaceTensor(st.shape, torch.from_numpy(i), torch.from_numpy(v).view(dtype))


def _sub_byte_entry(base: Source, tuned: Source, name: str) -> None:
    """A tensor of fewer than 8 bits per element: equal bytes, or refused."""
    st, sb = base.tensors[name], tuned.tensors[name]
    a, b = (torch.empty(st.nbytes, dtype=torch.uint8) for _ in range(2))
    base.read_bytes(st.shard, st.begin, a)
    tuned.read_bytes(sb.shard, sb.begin, b)
    if not torch.equal(a, b):
        raise CheckpointError(f"{name!r} ({st.dtype}) changed, but a patch holds dtypes of "
                              "whole bytes only.")


def _exact(base: Source, tuned: Source, name: str, records: tuple[dict[str, bytes],
           dict[str, bytes]]) -> ReplaceTensor | None:
    """The entry of one tensor, recording both sides' fingerprint records."""
    st = base.tensors[name]
    if st.dtype not in TORCH_DTYPES:  # F4 / F6: no entry unless the bytes differ
        _sub_byte_entry(base, tuned, name)
        for side, rec in zip((base, tuned), records, strict=True):
            rec.update(file_records(side.root / side.tensors[name].shard, [name]))
        return None
    samples = Samples(st.numel, TORCH_DTYPES[st.dtype].itemsize)
    entry = exact_entry(base, tuned, name, samples=samples)
    for rec, got in zip(records, (samples.old, samples.new), strict=True):
        rec[name] = sample_record(name, st.dtype, st.shape, got.tobytes())
    return entry


def lossy_entry(base: Source, tuned: Source, name: str, *, density: float | None,
                k: int | None) -> DeltaTensor | None:
    """The top-|tuned - base| additive entry of a floating tensor (``extract``'s rule)."""
    st = base.tensors[name]
    if st.dtype not in TORCH_DTYPES or not TORCH_DTYPES[st.dtype].is_floating_point:
        return None
    diff = _diff(base.read(name), tuned.read(name))
    keep = budget(density, st.numel) if density is not None else min(k or 0, st.numel)
    entry = _nonzero_entry(st.shape, diff, topk_indices(diff.abs(), keep))
    bad = int((~torch.isfinite(entry.values)).sum())
    if bad:
        raise ParameterError(
            f"{name!r}: tuned - base is NaN or infinite at {bad} kept entries (NaN or inf "
            "weights); an additive delta cannot hold them. Use the exact diff (no --density or "
            "--topk), which copies any value.")
    return entry


def _provenance(base: Source, tuned: Source, fps: tuple[str, str], parameters: dict[str, Any],
                command: str | None) -> str:
    sides = (("base", base, fps[0]), ("tuned", tuned, fps[1]))
    inputs = [{"fingerprint": fp, "path": os.path.basename(os.path.normpath(src.path)),
               "role": role} for role, src, fp in sides]
    return json.dumps({"command": command, "inputs": inputs, "operation": "diff",
                       "parameters": parameters, "spdelta_version": __version__},
                      sort_keys=True, separators=(",", ":"))


def _check_mode(density: float | None, k: int | None, targets: str | None,
                value_dtype: torch.dtype | None) -> bool:
    """Whether the diff is lossy; raises on options that make no sense for its mode."""
    if density is not None and k is not None:
        raise ParameterError("diff: pass density or k (--density or --topk), not both.")
    if density is not None and not 0.0 <= density <= 1.0:
        raise ParameterError(f"diff: density must lie in [0, 1]; found {density}.")
    if k is not None and k < 0:
        raise ParameterError(f"diff: k must be >= 0; found {k}.")
    lossy = density is not None or k is not None
    if not lossy and (targets is not None or value_dtype is not None):
        raise ParameterError("diff: targets and value_dtype (--targets, --value-dtype) select "
                             "the lossy additive mode; add density or k (--density, --topk).")
    return lossy


def diff_checkpoints(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    density: float | None = None,
    k: int | None = None,
    targets: str | None = None,
    value_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    command: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the patch from checkpoint ``base`` to checkpoint ``tuned``, streamed.

    Exact by default: every element whose bits differ becomes an entry of a replacement
    tensor (format 1.3) in the base's dtype, so applying the patch to ``base`` gives
    ``tuned`` bit for bit. The file records both fingerprints (spec §5.1):
    ``spdelta.base_model.fingerprint`` of ``base`` and ``spdelta.result.fingerprint`` of
    ``tuned``, taken from the same pass (each byte is read once). Tensors are compared
    :data:`CHUNK_BYTES` at a time, one tensor after another, the next one read ahead:
    memory is bounded by one tensor's entries, never by the model.

    With ``density`` or ``k`` the diff is today's lossy ``extract`` instead: per floating
    tensor, the top ``k`` (or ``floor(density * numel + 0.5)``) entries of
    ``|tuned - base|`` (taken in fp32, fp64 for fp64), additive, no result fingerprint.

    Args:
        base: A checkpoint directory (single file or sharded) or a ``.safetensors`` file.
        tuned: The same kind of checkpoint, with the same tensors, dtypes and shapes.
        output: The patch file, written atomically.
        density: Lossy mode: fraction in ``[0, 1]`` of each tensor's entries to keep.
        k: Lossy mode: entries to keep per tensor.
        targets: Lossy mode: regex; only tensor names it matches (``re.search``).
        value_dtype: Lossy mode: store values in this float dtype (default fp32 / fp64).
        overwrite: Replace an existing ``output``.
        command: The command line, recorded in the provenance.
        progress: Show a progress bar over the tensors.

    Returns:
        A report: ``mode``, ``tensors``, ``changed_tensors``, ``numel``, ``nnz``,
        ``changed_fraction``, ``checkpoint_bytes``, ``output_bytes``, ``bytes_per_entry``,
        ``base_fingerprint``, ``tuned_fingerprint``.

    Raises:
        CheckpointError: A checkpoint is missing, malformed or a delta file.
        KeyMismatchError: A tensor is in only one checkpoint.
        ShapeError: A tensor's dtype or shape differs.
        ParameterError: Options of the two modes mixed, or out of range.
        OutputExistsError: ``output`` exists and ``overwrite`` is false.

    Example:
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": torch.zeros(4)}, f"{d}/a.safetensors")
        >>> save_file({"w": torch.tensor([0.0, -0.0, 0.0, 1.0])}, f"{d}/b.safetensors")
        >>> diff_checkpoints(f"{d}/a.safetensors", f"{d}/b.safetensors", f"{d}/p.st")["nnz"]
        2
    """
    lossy = _check_mode(density, k, targets, value_dtype)
    params = {"density": density, "k": k, "mode": "lossy" if lossy else "exact",
              "targets": targets, "value_dtype": None if value_dtype is None else str(value_dtype)}
    with Source(base) as a, Source(tuned) as b:
        check_pair(a, b)
        records: tuple[dict[str, bytes], dict[str, bytes]] = ({}, {})
        with DeltaWriter(output, overwrite=overwrite, value_dtype=value_dtype) as writer:
            counts = _stream(a, b, writer, records, lossy=lossy, density=density, k=k,
                             regex=re.compile(targets) if targets else None, progress=progress)
            fps = (combine_records(records[0]), combine_records(records[1]))
            meta = {KEY_FINGERPRINT: fps[0], KEY_PROVENANCE: _provenance(a, b, fps, params,
                                                                         command)}
            if not lossy:  # applying an exact patch gives TUNED, bit for bit (spec §5.2)
                meta[KEY_RESULT_FINGERPRINT] = fps[1]
            writer.update_metadata(meta)
        size, (nnz, numel, changed) = os.path.getsize(output), counts
        return {"mode": params["mode"], "tensors": len(a.names), "changed_tensors": changed,
                "numel": numel, "nnz": nnz, "changed_fraction": nnz / numel if numel else 0.0,
                "checkpoint_bytes": sum(t.nbytes for t in a.tensors.values()),
                "output_bytes": size, "bytes_per_entry": size / nnz if nnz else 0.0,
                "base_fingerprint": fps[0], "tuned_fingerprint": fps[1]}


def _stream(a: Source, b: Source, writer: DeltaWriter,
            records: tuple[dict[str, bytes], dict[str, bytes]], *, lossy: bool,
            density: float | None, k: int | None, regex: re.Pattern[str] | None,
            progress: bool) -> tuple[int, int, int]:
    """Write every tensor's entry, in file order; fill both sides' fingerprint records.

    Returns:
        ``(nnz, numel, changed tensors)``.
    """
    if lossy:  # the lossy mode skips tensors: sample both checkpoints up front
        records[0].update(a.records())
        records[1].update(b.records())
    nnz = numel = changed = 0
    order = a.in_file_order()
    with ThreadPoolExecutor(max_workers=1) as pool:  # asks for the next tensor's pages
        for i, name in enumerate(tqdm(order, desc="diff", unit="tensor", disable=not progress)):
            if i + 1 < len(order):  # the disk reads the next tensor while this one runs
                pool.submit(a.prefetch, order[i + 1])
                pool.submit(b.prefetch, order[i + 1])
            numel += a.tensors[name].numel
            e = _entry(a, b, name, records, lossy=lossy, density=density, k=k, regex=regex)
            if e is not None and e.nnz:
                writer.write(name, e)
                nnz, changed = nnz + e.nnz, changed + 1
    return nnz, numel, changed


def _entry(a: Source, b: Source, name: str, records: tuple[dict[str, bytes], dict[str, bytes]],
           *, lossy: bool, density: float | None, k: int | None,
           regex: re.Pattern[str] | None) -> DeltaTensor | ReplaceTensor | None:
    """The entry of one tensor in either mode (``None``: nothing to write)."""
    if regex is not None and not regex.search(name):
        return None
    if lossy:
        return lossy_entry(a, b, name, density=density, k=k)
    return _exact(a, b, name, records)
