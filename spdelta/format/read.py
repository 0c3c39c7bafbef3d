"""Reading delta files: ``load_delta`` and the header-only ``read_header``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import MappingProxyType

import torch

from spdelta._replace import Entry, Patch
from spdelta.delta import SEPARATOR, DeltaTensor, SparseDelta, _combine
from spdelta.errors import ParameterError
from spdelta.format._container import Header
from spdelta.format._metadata import TensorSpec
from spdelta.format._scan import Scan, scan_file
from spdelta.format.constants import EXT_PREFIX, KEY_TENSORS, KEY_VERSION, KNOWN_KEYS, PREFIX
from spdelta.quantized import QuantizedDelta, dequantize_tensor

__all__ = ["TensorInfo", "load_delta", "load_patch", "load_quantized", "read_header"]


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one delta'd tensor.

    Attributes:
        shape: Dense shape of the tensor the delta applies to.
        nnz: Number of stored entries.
        index_encoding: ``"gap8"``, ``"gap16"``, ``"abs32"`` or ``"abs64"``.
        value_encoding: ``"raw"``, (format 1.1) ``"int8"`` / ``"int4"``, or (format 1.3)
            ``"replace"``.
        value_dtype: safetensors dtype of the stored ``::val`` tensor: ``"F16"``, ``"BF16"``,
            ``"F32"``, ``"F64"`` (raw), ``"I8"`` (int8 codes), ``"U8"`` (packed int4 codes),
            or for ``replace`` the base tensor's dtype (e.g. ``"BF16"``, ``"I64"``).
        index_nbytes: Bytes of the stored ``::idx`` tensor.
        value_nbytes: Bytes of the stored ``::val`` tensor.
        block_size: Values per scale for a quantized encoding, else ``None``.
        scale_nbytes: Bytes of the stored ``::scale`` tensor (0 when not quantized).
    """

    shape: tuple[int, ...]
    nnz: int
    index_encoding: str
    value_encoding: str
    value_dtype: str
    index_nbytes: int
    value_nbytes: int
    block_size: int | None = None
    scale_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        """Stored bytes of this tensor: indices, values and scales."""
        return self.index_nbytes + self.value_nbytes + self.scale_nbytes

    @property
    def density(self) -> float:
        """``nnz / numel`` (0 for an empty tensor)."""
        numel = math.prod(self.shape)
        return self.nnz / numel if numel else 0.0

    @property
    def bytes_per_entry(self) -> float:
        """Stored bytes per entry (0 when ``nnz`` is 0)."""
        return self.nbytes / self.nnz if self.nnz else 0.0


def _raise_if_problems(scan: Scan, path: str | os.PathLike[str]) -> None:
    """Raise one error of the first problem's class, prefixed with the file name."""
    if scan.problems:
        err = _combine([e for _, e in scan.problems])
        raise type(err)(f"{os.fspath(path)}: {err}")


def _user_metadata(metadata: dict[str, str], newer: bool) -> dict[str, str]:
    """File metadata minus the structural keys (and, for a newer MINOR, unknown reserved keys)."""

    def keep(key: str) -> bool:
        if key in (KEY_VERSION, KEY_TENSORS):
            return False
        reserved = key.startswith(PREFIX) and not key.startswith(EXT_PREFIX)
        return not (newer and reserved and key not in KNOWN_KEYS)

    return {k: v for k, v in sorted(metadata.items()) if keep(k)}


def load_delta(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> SparseDelta:
    """Load and fully validate a delta file (``spec/format.md``).

    Quantized tensors (format 1.1, ``int8`` / ``int4``) are dequantized to float32
    (``code * scale``); use :func:`load_quantized` to get the codes and scales.

    The returned ``metadata`` is the file's ``str -> str`` metadata without the
    structural keys ``spdelta.format_version`` and ``spdelta.tensors`` (``save_delta``
    writes them again); for a file with a newer MINOR, reserved ``spdelta.*`` keys this
    reader does not know are dropped too. Every other key, ``spdelta.ext.*`` and user
    keys included, is kept.

    Args:
        path: The delta file.
        device: Where to put indices (int64) and values (stored dtype).

    Returns:
        The ``SparseDelta``, values in their stored dtype (float32 for quantized tensors).

    Raises:
        FormatError: A subclass for the first broken rule of spec §7 (``ContainerError``,
            ``VersionError``, ``IndexRangeError``...); its message lists every problem (max 10).
        ParameterError: The file holds replacement tensors (format 1.3): use
            :func:`load_patch`.
        OSError: The file cannot be opened or read.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta import SparseDelta
        >>> from spdelta.format import save_delta
        >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> d = SparseDelta({"w": ((2, 2), torch.tensor([0, 3]), torch.tensor([1.5, -2.0]))})
        >>> save_delta(d, path, metadata={"task": "demo"})
        >>> back = load_delta(path)
        >>> back == d, back.metadata["task"]
        (True, 'demo')
    """
    scan = scan_file(path)
    _raise_if_problems(scan, path)
    assert scan.header is not None  # no problems means the header parsed
    if scan.replaced:
        raise ParameterError(
            f"{os.fspath(path)}: {sorted(scan.replaced)[0]!r} is a replacement tensor "
            "(value_encoding 'replace', format 1.3), which a SparseDelta cannot hold; load "
            "the file with spdelta.patch.load_patch, or apply it with spdelta apply."
        )
    entries = _additive(scan)
    meta = _user_metadata(scan.header.metadata or {}, scan.newer)
    delta = SparseDelta._trusted(dict(sorted(entries.items())), meta)
    return delta if torch.device(device).type == "cpu" else delta.to(device)


def _additive(scan: Scan) -> dict[str, DeltaTensor]:
    """The scan's raw entries and its quantized ones dequantized to float32."""
    entries = dict(scan.entries)
    for name, q in scan.quantized.items():
        values = dequantize_tensor(
            q.codes, q.scales, nnz=q.nnz, bits=q.bits, block_size=q.block_size
        )
        entries[name] = DeltaTensor(q.shape, q.indices, values)
    return entries


def load_patch(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> Patch:
    """Load and fully validate any delta file as a :class:`~spdelta.patch.Patch`.

    Replacement tensors (format 1.3) keep their stored dtype and bits; additive tensors
    are ``DeltaTensor`` entries as :func:`load_delta` returns them (quantized values
    dequantized to float32). The metadata is :func:`load_delta`'s.

    Args:
        path: The file.
        device: Where to put indices and values.

    Returns:
        The patch, with ``base_fingerprint`` / ``result_fingerprint`` from the metadata.

    Raises:
        FormatError: As for :func:`load_delta`.
        OSError: The file cannot be opened or read.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta.patch import Patch, ReplaceTensor
        >>> from spdelta.format import save_delta
        >>> path = os.path.join(tempfile.mkdtemp(), "p.safetensors")
        >>> nan = torch.tensor([float("nan")], dtype=torch.bfloat16)
        >>> save_delta(Patch({"w": ReplaceTensor((4,), torch.tensor([2]), nan)}), path)
        >>> back = load_patch(path)
        >>> back["w"].values.dtype, back["w"].values.isnan().tolist()
        (torch.bfloat16, [True])
    """
    scan = scan_file(path)
    _raise_if_problems(scan, path)
    assert scan.header is not None
    entries: dict[str, Entry] = {**_additive(scan), **scan.replaced}
    patch = Patch._trusted(entries, _user_metadata(scan.header.metadata or {}, scan.newer))
    return patch if torch.device(device).type == "cpu" else patch.to(device)


def load_quantized(path: str | os.PathLike[str]) -> QuantizedDelta:
    """Load and fully validate a delta file whose tensors are all quantized (format 1.1).

    Args:
        path: The delta file.

    Returns:
        The :class:`~spdelta.ops.QuantizedDelta` (codes, scales, bits and block size per
        tensor) with the metadata :func:`load_delta` would return.

    Raises:
        FormatError: As for :func:`load_delta`.
        ParameterError: A tensor of the file is not quantized (``value_encoding`` raw).
        OSError: The file cannot be opened or read.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta import SparseDelta
        >>> from spdelta.format import save_delta
        >>> from spdelta.ops import quantize
        >>> path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
        >>> d = SparseDelta({"w": ((4,), torch.tensor([0, 3]), torch.tensor([0.5, -1.0]))})
        >>> save_delta(quantize(d, bits=4), path)
        >>> q = load_quantized(path)
        >>> q["w"].bits, q["w"].codes.tolist(), load_delta(path)["w"].values.tolist()
        (4, [147], [0.4285714626312256, -1.0])
    """
    scan = scan_file(path)
    _raise_if_problems(scan, path)
    assert scan.header is not None
    if scan.entries or scan.replaced:
        found = [(n, "raw") for n in scan.entries] + [(n, "replace") for n in scan.replaced]
        name, enc = min(found)
        raise ParameterError(
            f"{os.fspath(path)}: load_quantized needs quantized tensors only; "
            f"{name!r} has value_encoding {enc!r}. Use load_delta or load_patch."
        )
    q = QuantizedDelta.__new__(QuantizedDelta)  # trusted: validated by the scan
    q._tensors = MappingProxyType(dict(sorted(scan.quantized.items())))
    q._metadata = MappingProxyType(_user_metadata(scan.header.metadata or {}, scan.newer))
    return q


def tensor_info(header: Header, name: str, spec: TensorSpec) -> TensorInfo:
    """The :class:`TensorInfo` of one checked entry (internal: used by the streaming reader)."""
    idx = header.tensors[f"{name}{SEPARATOR}idx"]
    val = header.tensors[f"{name}{SEPARATOR}val"]
    scale = header.tensors.get(f"{name}{SEPARATOR}scale")
    return TensorInfo(
        spec.shape,
        spec.nnz,
        spec.index_encoding,
        spec.value_encoding,
        val.dtype,
        idx.end - idx.begin,
        val.end - val.begin,
        spec.block_size,
        0 if scale is None else scale.end - scale.begin,
    )


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Read and check only the header of a delta file (no tensor data is read).

    Checks every rule that the header alone decides (V1-V6, stored lengths of V7, the
    abs32 rule of V8); ``validate_file`` checks the data too.

    Args:
        path: The delta file.

    Returns:
        ``(metadata, infos)``: the file's full ``str -> str`` metadata (structural keys
        included) and a ``TensorInfo`` per delta'd tensor, sorted by name.

    Raises:
        FormatError: A subclass for the first broken rule; the message lists all of them.
        OSError: The file cannot be opened or read.

    Example:
        >>> import os, tempfile, torch
        >>> from spdelta import SparseDelta
        >>> from spdelta.format import save_delta
        >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> save_delta(SparseDelta({"w": ((4,), torch.tensor([1]), torch.ones(1))}), path)
        >>> meta, infos = read_header(path)
        >>> meta["spdelta.format_version"], infos["w"].index_encoding, infos["w"].index_nbytes
        ('1.0', 'gap8', 1)
    """
    scan = scan_file(path, read_data=False)
    _raise_if_problems(scan, path)
    assert scan.header is not None
    infos = {n: tensor_info(scan.header, n, spec) for n, spec in sorted(scan.specs.items())}
    return dict(scan.header.metadata or {}), infos
