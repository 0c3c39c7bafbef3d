"""A safetensors checkpoint read one tensor (or one slice) at a time, without a memory map.

Headers are parsed and checked by spdelta's own parser (no size is trusted before it is
checked against the file). Tensor bytes are read with ``preadv`` into buffers of their
own, or seen through a memory map of one window (:meth:`Source.window`) that is unmapped
before the next: a tool never maps a whole shard, so its resident size stays bounded by
the largest tensor (or window) it holds, whatever the checkpoint.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from spdelta.errors import ContainerError
from spdelta.format._container import Header, RawTensor, parse_header
from spdelta.format.constants import DTYPE_BITS, KEY_VERSION, TORCH_DTYPES
from spdelta.format.fingerprint import combine_records, file_records
from spdelta.hf.checkpoint import CheckpointError, checkpoint_shards

__all__ = ["Source", "Stored"]


@dataclass(frozen=True)
class Stored:
    """Where one tensor lives: its shard (relative path), dtype name, shape, byte range."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n


class Source:
    """A checkpoint directory (``model.safetensors`` or a sharded index) or one file.

    Args:
        path: The directory or the ``.safetensors`` file.

    Raises:
        CheckpointError: No readable safetensors weights, a malformed shard, a shard
            without a tensor the index names, or a spdelta delta file instead of weights.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.is_dir = self.path.is_dir()
        shards = checkpoint_shards(self.path) if self.is_dir else {self.path.name: None}
        self.root = self.path if self.is_dir else self.path.parent
        self.headers: dict[str, Header] = {}
        self.tensors: dict[str, Stored] = {}
        self._files: dict[str, BinaryIO] = {}
        try:
            for shard, names in shards.items():
                self._open_shard(shard, names)
        except BaseException:
            self.close()
            raise

    def _open_shard(self, shard: str, names: list[str] | None) -> None:
        file = self.root / shard
        try:
            f = self._files[shard] = open(file, "rb", buffering=0)  # noqa: SIM115 - see close
        except OSError as e:
            raise CheckpointError(f"{str(file)!r}: cannot open the shard ({e.strerror}).") from e
        try:
            header = parse_header(f, os.fstat(f.fileno()).st_size)
        except ContainerError as e:
            raise CheckpointError(f"{str(file)!r}: not a valid safetensors file ({e}).") from e
        if KEY_VERSION in (header.metadata or {}):
            raise CheckpointError(f"{str(file)!r} is a spdelta delta file, not checkpoint "
                                  "weights; diff and apply take checkpoints.")
        self.headers[shard] = header
        for name in sorted(header.tensors) if names is None else names:
            if name not in header.tensors:
                raise CheckpointError(f"{str(file)!r} lacks {name!r}, which the index names; "
                                      "is the checkpoint complete?")
            self.tensors[name] = _stored(shard, header, header.tensors[name])

    @property
    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self.tensors)

    def in_file_order(self) -> list[str]:
        """Tensor names shard by shard, each shard's in data order (sequential reads)."""
        return sorted(self.tensors, key=lambda n: (self.tensors[n].shard, self.tensors[n].begin))

    def read(self, name: str, start: int = 0, count: int | None = None, *,
             out: Tensor | None = None) -> Tensor:
        """Elements ``start`` to ``start + count`` of tensor ``name``, flat, in its dtype.

        Args:
            name: The tensor.
            start: First element.
            count: Elements to read (default: to the end).
            out: A 1-D uint8 buffer of at least that many bytes, reused across calls (a
                fresh buffer costs a page fault per 4 KiB); the result is a view of it.

        Raises:
            CheckpointError: The dtype has less than a byte per element, or the file is
                shorter than its header says (it changed while reading).
        """
        t = self.tensors[name]
        if t.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{name!r} has dtype {t.dtype} ({DTYPE_BITS[t.dtype]} bits per "
                                  "element); patches handle dtypes of whole bytes only.")
        dtype = TORCH_DTYPES[t.dtype]
        count = t.numel - start if count is None else count
        size = dtype.itemsize
        buf = torch.empty(count * size, dtype=torch.uint8) if out is None else out[: count * size]
        self.read_bytes(t.shard, t.begin + start * size, buf)
        return buf.view(dtype)

    @contextlib.contextmanager
    def window(self, name: str, start: int, count: int) -> Iterator[np.ndarray]:
        """Elements ``start`` to ``start + count`` of ``name`` as a read-only NumPy array of
        unsigned integers of the element's size (its bits), mapped from the file, no copy.

        The array is valid inside the ``with`` block only: copy what must outlive it.
        """
        t = self.tensors[name]
        size = TORCH_DTYPES[t.dtype].itemsize
        offset, length = t.begin + start * size, count * size
        if length == 0:
            yield np.zeros(0, dtype=f"<u{size}")
            return
        lead = offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._files[t.shard].fileno(), lead + length, offset=offset - lead,
                       access=mmap.ACCESS_READ)
        try:
            yield np.frombuffer(mm, dtype=f"<u{size}", count=count, offset=lead)
        finally:
            mm.close()  # BufferError if the caller kept a view: copy instead

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading tensor ``name`` now, in the background.

        Reads of the next tensor then overlap the work on this one; a no-op where
        ``posix_fadvise`` does not exist. Nothing is mapped or allocated here.
        """
        t = self.tensors.get(name)
        if t is not None and t.nbytes and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._files[t.shard].fileno(), t.begin, t.nbytes,
                             os.POSIX_FADV_WILLNEED)

    def read_bytes(self, shard: str, offset: int, buf: Tensor) -> None:
        """Fill the uint8 tensor ``buf`` from ``shard`` at byte ``offset``."""
        view = memoryview(buf.numpy().data) if buf.numel() else memoryview(b"")
        f = self._files[shard]
        done = 0
        while done < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(f.fileno(), [view[done:]], offset + done)
            else:  # no preadv (macOS before 11, Windows): seek, then read into the view
                f.seek(offset + done)
                n = f.readinto(view[done:]) or 0  # type: ignore[attr-defined]
            if n <= 0:
                raise CheckpointError(f"{str(self.root / shard)!r} ended early; did it change "
                                      "while reading?")
            done += n

    def file(self, shard: str) -> BinaryIO:
        """The open (unbuffered) file of ``shard``."""
        return self._files[shard]

    def fingerprint(self) -> str:
        """The ``base1`` fingerprint (spec §5.1) of the checkpoint: a few KiB read per tensor."""
        return combine_records(self.records())

    def records(self) -> dict[str, bytes]:
        """Name -> fingerprint record (spec §5.1) of every tensor."""
        out: dict[str, bytes] = {}
        for shard in self.headers:
            names = [n for n, t in self.tensors.items() if t.shard == shard]
            out.update(file_records(self.root / shard, names))
        return out

    def close(self) -> None:
        """Close every shard (idempotent)."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self) -> Source:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _stored(shard: str, header: Header, t: RawTensor) -> Stored:
    return Stored(shard, t.dtype, t.shape, header.data_start + t.begin, t.end - t.begin)
