"""The base-model fingerprint of spec §5.1: a fixed rule over every tensor of a checkpoint.

A fingerprint ``base1:<32 hex digits>`` identifies a base checkpoint, whatever delta is
made for it: it covers every tensor the checkpoint stores (by its stored name), with its
dtype, its shape and 1,024 of its elements taken at exact integer positions. It is
computed from tensors in memory (:func:`tensor_record`) or from a safetensors file on
disk (:func:`file_records`, a few KiB read per tensor); both give the same bytes.

Deltas written before format 1.2 carry the *legacy* rule ``sha256:<16 hex>``, a hash of
only the tensors the delta covers; :func:`legacy_sample` reproduces it so that they still
verify, and :func:`check_fingerprint` picks the rule from the prefix.

Example:
    >>> import torch
    >>> fp = fingerprint_tensors({"w": torch.zeros(3), "b": torch.ones(2)})
    >>> fp.startswith("base1:"), len(fp)
    (True, 38)
    >>> sample_positions(10**12, 3)
    [0, 499999999999, 999999999999]
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from spdelta._io import open_input
from spdelta.errors import ParameterError, SpdeltaWarning
from spdelta.format._container import parse_header
from spdelta.format.constants import DTYPE_BITS, SAFETENSORS_DTYPES

__all__ = [
    "ALGORITHM",
    "SAMPLES",
    "check_fingerprint",
    "combine_records",
    "file_records",
    "fingerprint_tensors",
    "legacy_combine",
    "legacy_file_sample",
    "legacy_positions",
    "legacy_sample",
    "sample_positions",
    "sample_record",
    "tensor_record",
]

#: Name of the rule (spec §5.1), the prefix of every fingerprint it gives.
ALGORITHM = "base1"
#: Elements sampled per tensor (all of them when a tensor has fewer).
SAMPLES = 1024
LEGACY = "sha256"
_HEX = 32
_WHOLE_READ = 1 << 16  # tensors up to this many bytes are read in one go

_DTYPE_NAMES = SAFETENSORS_DTYPES
_TORCH = {v: k for k, v in _DTYPE_NAMES.items()}


def sample_positions(numel: int, k: int = SAMPLES) -> list[int]:
    """The flat positions sampled from a tensor of ``numel`` elements (exact at any size).

    ``m = min(k, numel)`` positions ``floor(i * (numel - 1) / (m - 1))`` for ``i < m``
    (``[0]`` when ``m == 1``), in Python integers: no rounding, whatever ``numel``.

    Args:
        numel: Number of elements (``>= 0``).
        k: Most positions to take.

    Returns:
        Strictly increasing positions in ``[0, numel)``; every position when ``numel <= k``.

    Example:
        >>> sample_positions(5, 3), sample_positions(2, 3), sample_positions(0)
        ([0, 2, 4], [0, 1], [])
    """
    m = min(k, numel)
    if m <= 1:
        return list(range(m))
    return [(i * (numel - 1)) // (m - 1) for i in range(m)]


def _head(name: str, dtype: str, shape: Iterable[int], samples: int) -> bytes:
    doc = {"dtype": dtype, "name": name, "samples": samples, "shape": list(shape)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def sample_record(name: str, dtype: str, shape: Iterable[int], samples: bytes) -> bytes:
    """A tensor's record from the stored bytes of its elements at :func:`sample_positions`.

    For streaming tools that see the tensor a window at a time and keep only the samples.

    Args:
        name: The tensor's name in the checkpoint.
        dtype: Its safetensors dtype name, e.g. ``"BF16"``.
        shape: Its shape.
        samples: The little-endian bytes of the sampled elements, in position order.

    Example:
        >>> t = torch.arange(5.0)
        >>> sample_record("w", "F32", [5], t.numpy().tobytes()) == tensor_record("w", t)
        True
    """
    n = 1
    for s in shape:
        n *= s
    return _head(name, dtype, shape, min(SAMPLES, n)) + samples


def tensor_record(name: str, t: Tensor) -> bytes:
    """The bytes the fingerprint hashes for one tensor held in memory (a few KiB).

    A JSON line ``{"dtype","name","samples","shape"}`` (sorted keys, no spaces, ASCII),
    then the stored little-endian bytes of the elements at :func:`sample_positions`.

    Args:
        name: The tensor's name in the checkpoint.
        t: The tensor, on any device, in the dtype the checkpoint stores.

    Raises:
        ParameterError: ``t`` is on the meta device or has a dtype safetensors cannot store.

    Example:
        >>> tensor_record("w", torch.tensor([1, 2], dtype=torch.int8))
        b'{"dtype":"I8","name":"w","samples":2,"shape":[2]}\\n\\x01\\x02'
    """
    if t.dtype not in _DTYPE_NAMES:
        raise ParameterError(f"fingerprint: tensor {name!r} has dtype {t.dtype}, which a "
                             "safetensors checkpoint cannot hold; fingerprint the checkpoint.")
    if t.device.type == "meta":
        raise ParameterError(f"fingerprint: tensor {name!r} is on the meta device (no values); "
                             "load the weights, or fingerprint the checkpoint directory.")
    pos = sample_positions(t.numel())
    flat = t.detach().reshape(-1)
    picked = flat[torch.tensor(pos, dtype=torch.int64, device=flat.device)].cpu().contiguous()
    data = picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b""
    return _head(name, _DTYPE_NAMES[t.dtype], t.shape, len(pos)) + data


def combine_records(records: Mapping[str, bytes]) -> str:
    """``base1:`` and the first 32 hex digits of sha256 over the records in name order.

    Example:
        >>> combine_records({})
        'base1:e3b0c44298fc1c149afbf4c8996fb924'
    """
    h = hashlib.sha256()
    for name in sorted(records):
        h.update(records[name])
    return f"{ALGORITHM}:{h.hexdigest()[:_HEX]}"


def fingerprint_tensors(tensors: Mapping[str, Tensor]) -> str:
    """The fingerprint of a checkpoint given as name -> tensor (every tensor it stores).

    Example:
        >>> fingerprint_tensors({"w": torch.ones(2)}) == fingerprint_tensors({"w": torch.ones(2)})
        True
    """
    return combine_records({n: tensor_record(n, t) for n, t in tensors.items()})


def _elements(fd: int, start: int, nbytes: int, bits: int, pos: list[int]) -> bytes:
    """The bytes of the elements at ``pos`` (for sub-byte dtypes: the byte holding each)."""
    size = max(bits // 8, 1)
    offsets = [p * bits // 8 for p in pos]
    if nbytes <= _WHOLE_READ:
        buf = os.pread(fd, nbytes, start)
        return b"".join(buf[o:o + size] for o in offsets)
    return b"".join(os.pread(fd, size, start + o) for o in offsets)


def file_records(path: str | os.PathLike[str], names: Iterable[str] | None = None
                 ) -> dict[str, bytes]:
    """:func:`tensor_record` of tensors of one safetensors file, reading only the samples.

    Args:
        path: A safetensors file (e.g. one checkpoint shard).
        names: Tensors to read (default: all of them).

    Returns:
        Name -> record, equal to ``tensor_record(name, tensor)`` of the loaded tensor.

    Raises:
        ContainerError: The file is not a well-formed safetensors file.
        KeyError: A name in ``names`` is not in the file.

    Example:
        >>> import os, tempfile
        >>> from safetensors.torch import save_file
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save_file({"w": torch.arange(3000.0)}, p)
        >>> file_records(p)["w"] == tensor_record("w", torch.arange(3000.0))
        True
    """
    with open_input(path, "a safetensors file") as f:
        header = parse_header(f, os.fstat(f.fileno()).st_size)
        out = {}
        for name in header.tensors if names is None else names:
            t = header.tensors[name]
            pos = sample_positions(_numel(t.shape))
            data = _elements(f.fileno(), header.data_start + t.begin, t.end - t.begin,
                             DTYPE_BITS[t.dtype], pos)
            out[name] = _head(name, t.dtype, t.shape, len(pos)) + data
    return out


def legacy_file_sample(path: str | os.PathLike[str], key: str, name: str) -> bytes:
    """:func:`legacy_sample` of tensor ``key`` of a safetensors file, reading only the samples.

    Args:
        path: A safetensors file (a checkpoint shard).
        key: The tensor's key in the file.
        name: The delta's name for it (hashed by the legacy rule).

    Raises:
        ContainerError: The file is not a well-formed safetensors file.
        KeyError: ``key`` is not in the file.
        ParameterError: The tensor's dtype has no torch equivalent here.

    Example:
        >>> import os, tempfile
        >>> from safetensors.torch import save_file
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save_file({"w": torch.arange(6.0)}, p)
        >>> legacy_file_sample(p, "w", "w") == legacy_sample("w", torch.arange(6.0), [6])
        True
    """
    with open_input(path, "a safetensors file") as f:
        header = parse_header(f, os.fstat(f.fileno()).st_size)
        t = header.tensors[key]
        if t.dtype not in _TORCH:
            raise ParameterError(f"{os.fspath(path)!r}: tensor {key!r} has dtype {t.dtype}, "
                                 "which torch cannot read here.")
        data = _elements(f.fileno(), header.data_start + t.begin, t.end - t.begin,
                         DTYPE_BITS[t.dtype], legacy_positions(_numel(t.shape)))
    dtype = _TORCH[t.dtype]
    values = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)
    return legacy_sample(name, values, t.shape)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def legacy_positions(numel: int) -> list[int]:
    """The positions of the legacy rule: float32 ``linspace(0, numel - 1, 1024)``, truncated.

    Reproduces what spdelta before format 1.2 sampled; positions that float32 rounding
    put past the end (tensors over 2**24 elements, where it used to crash) are clamped.
    """
    m = min(SAMPLES, numel)
    pos = torch.linspace(0, max(numel - 1, 0), m, dtype=torch.float32).long()
    return pos.clamp_(max=max(numel - 1, 0)).tolist()


def legacy_sample(name: str, values: Tensor, shape: Iterable[int]) -> bytes:
    """The legacy rule's bytes for one tensor, from its elements at :func:`legacy_positions`.

    Args:
        name: The delta's name of the tensor.
        values: The elements at ``legacy_positions(numel)``, any dtype.
        shape: The tensor's shape.
    """
    head = f"{name}:{list(shape)}:".encode()
    return head + values.detach().to("cpu", torch.float32).numpy().tobytes()


def legacy_combine(samples: Mapping[str, bytes]) -> str:
    """The legacy fingerprint ``sha256:<16 hex>`` of :func:`legacy_sample` bytes by name."""
    h = hashlib.sha256()
    for name in sorted(samples):
        h.update(samples[name])
    return f"{LEGACY}:{h.hexdigest()[:16]}"


def check_fingerprint(expected: str | None, *, current: Callable[[], str],
                      legacy: Callable[[], str]) -> str | None:
    """Compare a delta's base fingerprint with a base; return what the base has on mismatch.

    Args:
        expected: The delta's ``spdelta.base_model.fingerprint`` (``None``: nothing to check).
        current: Computes the base's ``base1`` fingerprint.
        legacy: Computes the base's legacy ``sha256`` fingerprint over the delta's tensors.

    Returns:
        ``None`` when the fingerprints agree (or there is nothing to compare), else the
        base's fingerprint under the delta's rule.

    Warns:
        SpdeltaWarning: The fingerprint follows a rule this version does not know; it is
            not checked.

    Example:
        >>> check_fingerprint("base1:00", current=lambda: "base1:00", legacy=lambda: "")
    """
    if expected is None:
        return None
    rule = expected.split(":", 1)[0]
    if rule not in (ALGORITHM, LEGACY):
        warnings.warn(f"base fingerprint {expected[:40]!r} follows a rule this spdelta does not "
                      f"know (it knows {ALGORITHM!r} and {LEGACY!r}); not checked. Upgrade "
                      "spdelta to check it.", SpdeltaWarning, stacklevel=2)
        return None
    found = current() if rule == ALGORITHM else legacy()
    return None if found == expected else found
