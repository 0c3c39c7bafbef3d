"""Streaming delta I/O: read and write one tensor at a time (memory bounded by one tensor).

:class:`DeltaReader` checks the header once (rules V1-V6, stored lengths of V7, the abs32
rule of V8) and decodes one tensor per :meth:`DeltaReader.read` call with the same data
checks as :func:`~spdelta.format.load_delta` (V7-V10 for that tensor).

:class:`DeltaWriter` encodes each tensor when it is written and appends its bytes to an
anonymous spool file, keeping only ``(key, dtype, shape, offset, size)`` per stored
tensor. On :meth:`DeltaWriter.close` it writes the header and copies the spooled bytes in
the canonical order of :func:`~spdelta.format.save_delta` into a sibling temp file, which
is renamed over the destination (``os.replace``). The output is byte-identical to
``save_delta`` of the same delta; an error, or a process killed before ``close``, leaves
an existing destination untouched and no partial file under its name.

Example:
    >>> import os, tempfile, torch
    >>> from spdelta import DeltaTensor, SparseDelta
    >>> from spdelta.format import load_delta
    >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
    >>> with DeltaWriter(path, metadata={"task": "demo"}) as w:
    ...     w.write("b", DeltaTensor((4,), torch.tensor([1]), torch.tensor([2.0])))
    ...     w.write("a", DeltaTensor((2, 2), torch.tensor([0, 3]), torch.tensor([1.0, -1.0])))
    >>> with DeltaReader(path) as r:
    ...     r.names, r.info("a").nnz, r.read("b").values.tolist()
    (['a', 'b'], 2, [2.0])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from types import TracebackType
from typing import BinaryIO

import torch

from spdelta._io import atomic_write, claim, open_input, user_os_error
from spdelta._replace import ReplaceTensor
from spdelta.delta import DeltaTensor, _combine
from spdelta.errors import OutputExistsError, ParameterError, SpdeltaError
from spdelta.format._container import encode_header
from spdelta.format._metadata import TensorSpec
from spdelta.format._scan import Scan, read_entry, scan_file
from spdelta.format.constants import KEY_PRODUCER, KEY_VERSION
from spdelta.format.read import TensorInfo, _raise_if_problems, _user_metadata, tensor_info
from spdelta.format.write import encode_entry, finish_metadata, merged_metadata, sort_key
from spdelta.quantized import QuantizedTensor, dequantize_tensor

__all__ = ["DeltaReader", "DeltaWriter"]

_COPY_CHUNK = 8 << 20  # bytes per read/write when the kernel cannot copy file ranges


class DeltaReader:
    """Read a delta file one tensor at a time.

    Args:
        path: The delta file. Its header is checked on open.

    Raises:
        FormatError: The header breaks a rule of spec §7 (as :func:`read_header`).
        OSError: The file cannot be opened.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta import SparseDelta
        >>> from spdelta.format import save_delta
        >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> save_delta(SparseDelta({"w": ((3,), torch.tensor([2]), torch.ones(1))}), path)
        >>> with DeltaReader(path) as r:
        ...     r.format_version, r.info("w").index_encoding, r.read("w").indices.tolist()
        ('1.0', 'gap8', [2])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        scan: Scan = scan_file(path, read_data=False)
        _raise_if_problems(scan, path)
        assert scan.header is not None  # no problems means the header parsed
        self._scan = scan
        self._header = scan.header
        self._file: BinaryIO | None = open_input(self.path, "a delta file")  # closed in close()

    @property
    def names(self) -> list[str]:
        """The delta'd tensor names, sorted."""
        return sorted(self._scan.specs)

    def __contains__(self, name: object) -> bool:
        return name in self._scan.specs

    @property
    def raw_metadata(self) -> dict[str, str]:
        """The file's full ``str -> str`` metadata, structural keys included."""
        return dict(self._header.metadata or {})

    @property
    def metadata(self) -> dict[str, str]:
        """The metadata :func:`~spdelta.format.load_delta` returns (no structural keys)."""
        return _user_metadata(self.raw_metadata, self._scan.newer)

    @property
    def format_version(self) -> str:
        """The file's ``spdelta.format_version``."""
        return self.raw_metadata[KEY_VERSION]

    def info(self, name: str) -> TensorInfo:
        """The :class:`~spdelta.format.TensorInfo` of tensor ``name`` (header only)."""
        return tensor_info(self._header, name, self._spec(name))

    def _spec(self, name: str) -> TensorSpec:
        if name not in self._scan.specs:
            raise ParameterError(f"{self.path}: no tensor {name!r} in this delta file.")
        return self._scan.specs[name]

    def read_entry(self, name: str) -> DeltaTensor | QuantizedTensor | ReplaceTensor:
        """Read and check one tensor as stored: raw values, quantized codes and scales, or
        replacement values (format 1.3, in the base's dtype).

        Raises:
            FormatError: The tensor's data breaks V7-V10.
            ParameterError: No tensor ``name``; or the reader is closed.
        """
        self._spec(name)
        if self._file is None:
            raise ParameterError(f"{self.path}: the reader is closed.")
        entry, problems = read_entry(self._file, self._header, name, self._scan.specs[name])
        if problems:
            err = _combine(problems)
            raise type(err)(f"{self.path}: {err}")
        assert entry is not None
        return entry

    def read(self, name: str) -> DeltaTensor:
        """Read and check one additive tensor; quantized values are dequantized to float32.

        Raises:
            FormatError: The tensor's data breaks V7-V10.
            ParameterError: No tensor ``name``; the reader is closed; or ``name`` is a
                replacement tensor (use :meth:`read_entry`).
        """
        if self._spec(name).value_encoding == "replace":
            raise ParameterError(
                f"{self.path}: {name!r} is a replacement tensor (value_encoding 'replace'), "
                "not an additive delta; read it with read_entry, or use spdelta.patch."
            )
        entry = self.read_entry(name)
        if isinstance(entry, QuantizedTensor):
            values = dequantize_tensor(
                entry.codes,
                entry.scales,
                nnz=entry.nnz,
                bits=entry.bits,
                block_size=entry.block_size,
            )
            return DeltaTensor(entry.shape, entry.indices, values)
        assert isinstance(entry, DeltaTensor)  # replacement tensors were refused above
        return entry

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> DeltaReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class DeltaWriter:
    """Write a delta file one tensor at a time, atomically; output equals ``save_delta``'s.

    Use it as a context manager: a normal exit publishes the file, an exception discards
    it. Only the tensor being written is held in memory; its encoded bytes go to an
    anonymous spool file (no name on disk, so nothing is left behind if the process dies).
    At :meth:`close` the header is written and the spool is copied into a sibling temp
    file (by the kernel where possible), fsynced and renamed over ``path``.

    Args:
        path: Destination file.
        metadata: ``str -> str`` keys written as ``save_delta(..., metadata=...)`` would.
        index_encoding: As in ``save_delta``: ``"auto"`` or a fixed encoding.
        value_dtype: Cast raw values to this float dtype; ``None`` keeps each tensor's dtype.
        overwrite: Replace an existing file; when false, raise ``OutputExistsError`` (checked
            on open and again when publishing).

    While open, the writer holds :func:`spdelta._io.claim` on ``path``: a second writer
    of the same path (in this or another process) fails at once.

    Raises:
        OutputExistsError: ``overwrite`` is false and ``path`` exists.
        OutputBusyError: Another writer holds ``path``.
        MetadataError: Bad metadata (as ``save_delta``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, str] | None = None,
        index_encoding: str = "auto",
        value_dtype: torch.dtype | None = None,
        overwrite: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        if not overwrite and os.path.lexists(self.path):
            raise OutputExistsError(
                f"{self.path!r} already exists; pass overwrite=True (--force) to replace it."
            )
        self._meta = merged_metadata({}, metadata)
        self._index_encoding, self._value_dtype = index_encoding, value_dtype
        self._overwrite = overwrite
        folder = os.path.dirname(os.path.abspath(self.path))
        self._claim = contextlib.ExitStack()
        self._claim.enter_context(claim(self.path))  # until close/abort: one writer per path
        try:
            self._spool: BinaryIO | None = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
        except OSError as e:
            self._claim.close()
            raise user_os_error(self.path, e) from e
        self._parts: list[tuple[str, str, list[int], int, int]] = []  # key, dtype, shape, off, n
        self._specs: dict[str, dict[str, object]] = {}
        self._offset = 0

    @property
    def names(self) -> list[str]:
        """Names written so far, sorted."""
        return sorted(self._specs)

    def update_metadata(self, metadata: Mapping[str, str]) -> None:
        """Add or replace metadata keys before :meth:`close` (values known only at the end,
        such as fingerprints computed while the tensors streamed through).

        Raises:
            MetadataError: Bad metadata (as ``save_delta``).
            ParameterError: The writer is closed.
        """
        if self._spool is None:
            raise ParameterError(f"{self.path}: the writer is closed.")
        producer = {KEY_PRODUCER: self._meta[KEY_PRODUCER]}  # keep the one given on open
        self._meta = merged_metadata(self._meta, {**producer, **metadata})

    def write(self, name: str, entry: DeltaTensor | QuantizedTensor | ReplaceTensor) -> None:
        """Encode one tensor and spool its bytes; the entry is not kept.

        Raises:
            FormatError: The entry breaks a rule of spec §7 (as ``save_delta``).
            ParameterError: ``name`` was written before, or the writer is closed.
        """
        if self._spool is None:
            raise ParameterError(f"{self.path}: the writer is closed.")
        if name in self._specs:
            raise ParameterError(f"{name!r}: written twice to {self.path}; write each once.")
        parts, spec = encode_entry(
            name, entry, index_encoding=self._index_encoding, value_dtype=self._value_dtype
        )
        for key, dtype, t in parts:
            nbytes = t.numel() * t.element_size()
            if nbytes:
                self._spool.write(t.contiguous().view(torch.uint8).numpy().data)
            self._parts.append((key, dtype, [t.numel()], self._offset, nbytes))
            self._offset += nbytes
        self._specs[name] = spec

    def close(self) -> None:
        """Publish the file: header, tensors in canonical order, fsync, rename (idempotent).

        Raises:
            OutputExistsError: ``overwrite`` was false and ``path`` appeared meanwhile.
            OSError: The file cannot be written; an existing file is left intact.
        """
        if self._spool is None:
            return
        spool, self._spool = self._spool, None
        try:
            spool.flush()
            meta = dict(self._meta)
            finish_metadata(meta, dict(sorted(self._specs.items())))
            order = sorted(self._parts, key=lambda p: sort_key(p[0], p[1]))
            header = encode_header(meta, [(k, dt, shape, n) for k, dt, shape, _, n in order])
            with atomic_write(self.path, overwrite=self._overwrite) as out:
                out.write(header)
                out.flush()
                for _, _, _, offset, nbytes in order:
                    _copy_range(spool, out, offset, nbytes)
        finally:
            spool.close()
            self._claim.close()

    def abort(self) -> None:
        """Discard everything written (idempotent); ``path`` is not touched."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._claim.close()

    def __enter__(self) -> DeltaWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to ``dst`` (flushed, at its end)."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while copy is not None and done < nbytes:
        try:
            n = copy(src.fileno(), dst.fileno(), nbytes - done, offset + done)
        except OSError:  # e.g. EXDEV on old kernels: fall back to read/write
            break
        if n == 0:
            break
        done += n
    while done < nbytes:  # portable fallback: bounded chunks through user space
        src.seek(offset + done)
        chunk = src.read(min(_COPY_CHUNK, nbytes - done))
        if not chunk:
            raise SpdeltaError(f"spool file ended early ({done} of {nbytes} bytes copied).")
        view = memoryview(chunk)
        while view:  # unbuffered: dst was flushed before
            view = view[os.write(dst.fileno(), view) :]
        done += len(chunk)
