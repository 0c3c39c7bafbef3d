"""``apply_patch``: a patched copy of a checkpoint on disk, bit-exact, one tensor at a time.

Each output shard keeps its base shard's header bytes (names, dtypes, shapes, offsets and
metadata). Every tensor's bytes are copied by the kernel (``copy_file_range``: no copy
through user space, in a worker thread that runs one tensor ahead), and a patched tensor
is then patched in place through a memory map of just that tensor: its changed entries
are written, nothing else is touched. The
output is built in a temp location beside its destination and renamed into place only
when every check passed: the base fingerprint before anything is written, and the
result's fingerprint (spec §5.1, computed from the patched tensors) against the patch's
``spdelta.result.fingerprint`` before publishing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from spdelta._io import _publish
from spdelta._progress import tqdm
from spdelta._replace import Entry, Patch, ReplaceTensor
from spdelta.errors import (
    BaseMismatchError,
    KeyMismatchError,
    OutputExistsError,
    ShapeError,
    format_names,
)
from spdelta.format import DeltaReader
from spdelta.format.constants import KEY_FINGERPRINT, KEY_RESULT_FINGERPRINT, TORCH_DTYPES
from spdelta.format.fingerprint import (
    check_fingerprint,
    combine_records,
    legacy_combine,
    legacy_file_sample,
    tensor_record,
)
from spdelta.hf.checkpoint import CheckpointError, _atomic_dir, _copy_other_files
from spdelta.patch._memory import _write
from spdelta.patch._source import Source
from spdelta.quantized import QuantizedTensor

__all__ = ["apply_patch"]


_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_CHUNK = 8 << 20  # bytes per pread/pwrite where copy_file_range is unavailable


class _PatchInput:
    """A patch file read one entry at a time (memory: one entry), or a :class:`Patch`."""

    def __init__(self, patch: Patch | str | os.PathLike[str]) -> None:
        self._patch = patch if isinstance(patch, Patch) else Patch({})
        self._reader = None if isinstance(patch, Patch) else DeltaReader(patch)
        self.metadata = self._patch.metadata if self._reader is None else self._reader.metadata

    @property
    def names(self) -> list[str]:
        return self._reader.names if self._reader is not None else self._patch.keys()

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and kind: the stored dtype name of a replacement, or ``"add"``."""
        if self._reader is not None:
            info = self._reader.info(name)
            return info.shape, info.value_dtype if info.value_encoding == "replace" else "add"
        e = self._patch[name]
        kind = _NAMES.get(e.values.dtype, "?") if isinstance(e, ReplaceTensor) else "add"
        return tuple(e.shape), kind

    def entry(self, name: str) -> Entry:
        if self._reader is None:
            return self._patch[name]
        e = self._reader.read_entry(name)
        return self._reader.read(name) if isinstance(e, QuantizedTensor) else e

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _check_fit(src: Source, patch: _PatchInput) -> None:
    """Every entry names a tensor of ``src`` with its shape (and dtype): before any write."""
    missing = [n for n in patch.names if n not in src.tensors]
    if missing:
        raise KeyMismatchError(
            f"the patch names {len(missing)} tensors the checkpoint does not hold: "
            f"[{format_names(missing)}]; apply it to the checkpoint it was made from.")
    bad = []
    for name in patch.names:
        shape, kind = patch.layout(name)
        st = src.tensors[name]
        fits = kind == st.dtype if kind != "add" else (
            st.dtype in TORCH_DTYPES and TORCH_DTYPES[st.dtype].is_floating_point)
        if shape != st.shape or not fits:
            bad.append(f"{name!r}: patch {kind}{list(shape)}, "
                       f"checkpoint {st.dtype}{list(st.shape)}")
    if bad:
        raise ShapeError(f"{len(bad)} entries do not fit the checkpoint: " + "; ".join(bad[:10])
                         + ". Apply the patch to the checkpoint it was made from.")


def _check_base(src: Source, patch: _PatchInput, found: str) -> None:
    """Refuse a base whose fingerprint is not the patch's (base1, or the legacy rule)."""
    expected = patch.metadata.get(KEY_FINGERPRINT)

    def legacy() -> str:  # files before 1.2: over the patch's own tensors
        return legacy_combine({n: legacy_file_sample(src.root / src.tensors[n].shard, n, n)
                               for n in patch.names})

    mismatch = check_fingerprint(expected, current=lambda: found, legacy=legacy)
    if mismatch is not None:
        done = (" (the patch's result: it is already applied)"
                if found == patch.metadata.get(KEY_RESULT_FINGERPRINT) else "")
        raise BaseMismatchError(
            f"wrong base: the patch applies to {expected}, the checkpoint is {mismatch}{done}; "
            "apply the patches of a chain in order, or pass --allow-base-mismatch "
            "(check_base=False).")


def _put(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _copy_at(src: int, dst: int, offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` at ``offset`` of file ``src`` to the same offset of ``dst``."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while copy is not None and done < nbytes:
        try:
            n = copy(src, dst, nbytes - done, offset + done, offset + done)
        except OSError:  # e.g. EXDEV on old kernels: copy through user space
            break
        if n == 0:
            break
        done += n
    while done < nbytes:
        chunk = os.pread(src, min(_CHUNK, nbytes - done), offset + done)
        if not chunk:
            raise CheckpointError(f"the base ended early ({done} of {nbytes} bytes copied).")
        done += os.pwrite(dst, chunk, offset + done)


def _write_shard(src: Source, shard: str, out: BinaryIO, patch: _PatchInput,
                 records: dict[str, bytes], bar: Any) -> int:
    """Write one shard (``out``: raw, read-write, empty): its header as is, then each
    tensor's bytes copied by the kernel and, for a patched tensor, patched in place
    through a memory map of just that tensor. Returns the entries applied.

    A worker thread copies the next tensor (``copy_file_range`` releases the GIL) while
    this thread decodes and writes the current one's entries: reading and patching
    overlap instead of adding up.
    """
    header = src.headers[shard]
    head = torch.empty(header.data_start, dtype=torch.uint8)
    src.read_bytes(shard, 0, head)
    _put(out.fileno(), head.numpy().data)
    names = set(patch.names)
    nnz = 0
    order = sorted((n for n, t in src.tensors.items() if t.shard == shard),
                   key=lambda n: src.tensors[n].begin)
    fd_in, fd_out = src.file(shard).fileno(), out.fileno()

    def copy(name: str) -> Future[None]:
        st = src.tensors[name]
        return pool.submit(_copy_at, fd_in, fd_out, st.begin, st.nbytes)

    with ThreadPoolExecutor(max_workers=1) as pool:
        copied = copy(order[0]) if order else None
        for i, name in enumerate(order):
            assert copied is not None
            copied.result()
            if i + 1 < len(order):  # one tensor ahead: it is still in the page cache when
                copied = copy(order[i + 1])  # its turn to be patched comes
            if name in names:
                st = src.tensors[name]
                e = patch.entry(name)
                with _mapped(out, st.begin, st.nbytes) as raw:
                    t = raw.view(TORCH_DTYPES[st.dtype])
                    _write(t, e)
                    records[name] = tensor_record(name, t.view(st.shape))
                    del t, raw
                nnz += e.nnz
            bar.update(1)
    return nnz


@contextlib.contextmanager
def _mapped(f: BinaryIO, offset: int, nbytes: int) -> Iterator[torch.Tensor]:
    """Bytes ``offset`` to ``offset + nbytes`` of the file ``f`` as a writable uint8 tensor
    (a shared memory map: writes go to the file). Valid inside the block only."""
    if nbytes == 0:
        yield torch.empty(0, dtype=torch.uint8)
        return
    lead = offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(f.fileno(), lead + nbytes, offset=offset - lead, access=mmap.ACCESS_WRITE)
    try:
        yield torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=lead)
    finally:
        mm.close()


Opener = Callable[[str], BinaryIO]


@contextlib.contextmanager
def _destination(src: Source, output: Path, overwrite: bool) -> Iterator[Opener]:
    """Opens each output shard (read-write) in a temp location; published on success only."""
    if src.is_dir:
        with _atomic_dir(output, overwrite) as tmp:

            def opener(shard: str) -> BinaryIO:
                (tmp / shard).parent.mkdir(parents=True, exist_ok=True)
                return open(tmp / shard, "x+b", buffering=0)

            yield opener
            _copy_other_files(src.root, tmp, set(src.headers))
        return
    if not overwrite and os.path.lexists(output):
        raise OutputExistsError(f"{str(output)!r} already exists; pass --force to replace it.")
    fd, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        yield lambda shard: open(temp, "r+b", buffering=0)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        _publish(temp, os.fspath(output), overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_patch(
    base: str | os.PathLike[str],
    patch: Patch | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    check_base: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``base`` with ``patch`` applied, bit-exact, one tensor at a time.

    Replacement entries copy their bits; additive entries add as spec §6.4 does, at their
    entries only. Every other byte of the base is copied: each shard keeps its header and
    layout, and a checkpoint directory keeps its index and other files. Memory holds one
    tensor and its entry. Before anything is written, names, shapes and dtypes are
    checked and (``check_base``) the base's fingerprint is compared with the patch's, so
    a patch applied to the wrong step of a chain is refused, naming both fingerprints,
    and leaves no output. After the last tensor, the result's fingerprint is compared
    with ``spdelta.result.fingerprint``; the output is published only if they agree.

    Args:
        base: A checkpoint directory (single file or sharded) or a ``.safetensors`` file.
        patch: A patch file (streamed entry by entry) or a :class:`~spdelta.patch.Patch`;
            its names are the checkpoint's tensor names.
        output: Output directory (for a directory ``base``) or file.
        overwrite: Replace an existing ``output``.
        check_base: Compare the fingerprints of the base and of the result.
        progress: Show a progress bar over the tensors.

    Returns:
        A report: ``tensors``, ``patched_tensors``, ``nnz``, ``base_fingerprint``,
        ``result_fingerprint``, ``verified`` (the result fingerprint was checked).

    Raises:
        CheckpointError: ``base`` is missing or malformed.
        KeyMismatchError, ShapeError: An entry does not fit the checkpoint.
        BaseMismatchError: The base or the result is not the patch's (nothing is written).
        OutputExistsError: ``output`` exists and ``overwrite`` is false.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import load_file, save_file
        >>> from spdelta.patch import diff_checkpoints
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": torch.zeros(3, dtype=torch.bfloat16)}, f"{d}/a.safetensors")
        >>> save_file({"w": torch.tensor([0, -0.0, 2], dtype=torch.bfloat16)}, f"{d}/b.safetensors")
        >>> _ = diff_checkpoints(f"{d}/a.safetensors", f"{d}/b.safetensors", f"{d}/p.st")
        >>> apply_patch(f"{d}/a.safetensors", f"{d}/p.st", f"{d}/c.safetensors")["verified"]
        True
        >>> load_file(f"{d}/c.safetensors")["w"].tolist()
        [0.0, -0.0, 2.0]
    """
    with Source(base) as src, contextlib.closing(_PatchInput(patch)) as p:
        _check_fit(src, p)
        records = src.records()
        found = combine_records(records)
        result = p.metadata.get(KEY_RESULT_FINGERPRINT)
        if check_base:
            _check_base(src, p, found)
        nnz = 0
        with _destination(src, Path(output), overwrite) as opener, tqdm(
                total=len(src.tensors), desc="apply", unit="tensor", disable=not progress) as bar:
            for shard in src.headers:
                with opener(shard) as out:
                    nnz += _write_shard(src, shard, out, p, records, bar)
            made = combine_records(records)
            if check_base and result is not None and made != result:
                raise BaseMismatchError(
                    f"the patched checkpoint is {made}, not the patch's result {result}: the "
                    "base matched the patch's fingerprint only in its sampled elements. Nothing "
                    "was written; diff against this checkpoint to make a patch for it.")
        return {"tensors": len(src.tensors), "patched_tensors": len(p.names), "nnz": nnz,
                "base_fingerprint": found, "result_fingerprint": made,
                "verified": check_base and result is not None}
