"""NF4 base weights via ``torchao``: 4-bit storage, dequantised per op, never stored dense."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from spdelta.errors import KeyMismatchError, ShapeError, SpdeltaError, format_names
from spdelta.types import Params

__all__ = ["dequantize_base", "is_nf4", "nbytes", "nf4_to_dense", "to_nf4", "torchao_hidden"]

#: Packed bytes dequantised per chunk: bounds the int32 code buffer at 8 MiB.
_CHUNK = 1 << 20


def _nf4_module() -> Any:
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:  # older torchao keeps it under dtypes
        try:
            from torchao.dtypes import nf4tensor as nf4_tensor  # type: ignore[no-redef]
        except ImportError as e:
            raise SpdeltaError("NF4 base weights need torchao; install it with "
                               "`pip install torchao`.") from e
    return nf4_tensor


@contextmanager
def torchao_hidden() -> Iterator[None]:
    """While open, this process behaves as if ``torchao`` were not installed (unless imported).

    transformers imports ``torchao`` as soon as its model code loads, whenever
    ``torchao`` is installed, and importing ``torchao`` prints library-load failures
    and ``torch.utils._pytree`` warnings. spdelta needs ``torchao`` for NF4 only, so the
    command line runs every command but ``train --nf4`` inside this context: a ``None``
    entry in ``sys.modules`` makes ``importlib.util.find_spec("torchao")`` return ``None``
    and ``import torchao`` fail, which transformers reads as "not installed". On exit
    the entry is removed and transformers' cached availability check is cleared, so a
    later NF4 use imports ``torchao`` normally. If ``torchao`` is already imported,
    nothing is hidden.

    Example:
        >>> import importlib.util, sys
        >>> already = "torchao" in sys.modules
        >>> with torchao_hidden():
        ...     hidden = importlib.util.find_spec("torchao") is None
        >>> hidden or already
        True
    """
    if "torchao" in sys.modules:
        yield
        return
    sys.modules["torchao"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "torchao" in sys.modules and sys.modules["torchao"] is None:
            del sys.modules["torchao"]
        checks = sys.modules.get("transformers.utils.import_utils")
        cache_clear = getattr(getattr(checks, "is_torchao_available", None), "cache_clear", None)
        if callable(cache_clear):
            cache_clear()


def is_nf4(t: object) -> bool:
    """True when ``t`` is a ``torchao`` ``NF4Tensor`` (without importing torchao otherwise).

    Example:
        >>> import torch
        >>> is_nf4(torch.zeros(2))
        False
    """
    return type(t).__name__ == "NF4Tensor" and type(t).__module__.startswith("torchao")


def to_nf4(base: Mapping[str, Tensor], targets: Sequence[str], *, block_size: int = 64,
           scaler_block_size: int = 256) -> Params:
    """Return ``base`` with each target weight replaced by a ``torchao`` ``NF4Tensor``.

    NF4 (QLoRA's 4-bit NormalFloat) stores two 4-bit codes per byte plus one absmax
    scale per ``block_size`` values; the scales are themselves quantised to int8 in
    blocks of ``scaler_block_size`` (double quantisation), about ``0.52`` bytes per
    parameter at block size 64. ``torchao`` needs the number of blocks to be a multiple
    of the scaler block, so the scaler block used is ``gcd(numel / block_size,
    scaler_block_size)``. The tensor keeps the base's dtype (``.dtype``);
    :func:`nf4_to_dense` (or ``.to(dtype)``) gives the dense weight. Both paths of
    :func:`spdelta.make_loss_fn` take an NF4 base unchanged: the fast kernel
    (:func:`spdelta.kernels.sparse_delta_linear`) dequantises each NF4 linear weight
    inside its forward and again in backward, saving only the 4-bit tensor, so the
    dense weight exists only transiently.

    Args:
        base: Name -> tensor (a state dict); not modified.
        targets: Names of the weights to quantise (e.g. from
            :func:`spdelta.targets.resolve_targets`).
        block_size: Values per absmax scale; must divide each target's ``numel``.
        scaler_block_size: Upper bound of the scales' quantisation block.

    Returns:
        A new dict; non-target tensors are the same objects as in ``base``.

    Raises:
        KeyMismatchError: A target is not in ``base``.
        ShapeError: A target's ``numel`` is not a multiple of ``block_size``.
        SpdeltaError: ``torchao`` is not installed.

    Example:
        >>> import torch
        >>> base = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
        >>> q = to_nf4(base, ["w"])
        >>> is_nf4(q["w"]), q["w"].shape, round(nbytes(q) / q["w"].numel(), 2)  # bytes/param
        (True, torch.Size([64, 64]), 0.53)

    References:
        Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023,
        https://arxiv.org/abs/2305.14314 ; Ansell et al., 2024 (qSpIEL),
        https://arxiv.org/abs/2401.16405
    """
    missing = set(targets) - set(base)
    if missing:
        raise KeyMismatchError(f"to_nf4: targets absent from base: [{format_names(missing)}].")
    bad = [f"{n!r} ({base[n].numel()} values)" for n in sorted(targets)
           if base[n].numel() % block_size or base[n].numel() == 0]
    if bad:
        raise ShapeError(f"to_nf4: the number of values must be a positive multiple of "
                         f"block_size={block_size}; not so for {', '.join(bad[:10])}. "
                         "Leave those tensors out of targets or pick a smaller block size.")
    nf4 = _nf4_module()
    out = dict(base)
    for n in targets:
        w = base[n].detach()
        scaler = math.gcd(w.numel() // block_size, scaler_block_size)
        out[n] = nf4.to_nf4(w.contiguous(), block_size, scaler)
    return out


def nf4_to_dense(t: Tensor) -> Tensor:
    """Return the dense tensor (``t.dtype``) of an ``NF4Tensor``; equal to torchao's dequantisation.

    Bit-identical to ``t.get_original_weight()`` (each value is its code's NF4 level
    times its block's scale, the same two factors) but with less transient memory:
    torchao's version holds int64 codes and several half-size intermediates (about 22
    bytes per parameter at its peak); this one writes the levels straight into the
    output, a chunk of codes at a time, then scales each block in place (about 4 bytes
    per parameter plus a fixed 8 MiB). Non-contiguous (transposed) NF4 tensors use
    torchao's path.

    Example:
        >>> import torch
        >>> q = to_nf4({"w": torch.randn(4, 64, generator=torch.Generator().manual_seed(0))},
        ...            ["w"])["w"]
        >>> torch.equal(nf4_to_dense(q), q.get_original_weight())
        True
    """
    if not t.is_contiguous():
        return t.get_original_weight()  # type: ignore[attr-defined, no-any-return]
    packed = t.quantized_data.reshape(-1)  # type: ignore[attr-defined]  # 2 codes per byte
    levels = t.nf4  # type: ignore[attr-defined]  # (16,) in t.dtype
    out = torch.empty(t.numel(), dtype=levels.dtype, device=packed.device)
    for start in range(0, packed.numel(), _CHUNK):
        byte = packed[start:start + _CHUNK]
        codes = torch.stack([byte >> 4, byte & 0b1111], dim=-1).reshape(-1).int()  # high first
        torch.index_select(levels, 0, codes, out=out[2 * start:2 * start + codes.numel()])
    scales = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor,  # type: ignore[attr-defined]
                                  t.scaler_block_size)  # type: ignore[attr-defined]
    out.view(-1, t.block_size).mul_(scales.unsqueeze(-1))  # type: ignore[attr-defined]
    return out.view(t.shape)


def dequantize_base(base: Mapping[str, Tensor]) -> Params:
    """Return ``base`` with every NF4 tensor dequantised to a dense tensor of its dtype.

    Example:
        >>> import torch
        >>> q = to_nf4({"w": torch.ones(4, 16)}, ["w"])
        >>> dequantize_base(q)["w"].unique().tolist()
        [1.0]
    """
    return {n: nf4_to_dense(t) if is_nf4(t) else t for n, t in base.items()}


def _tensor_nbytes(t: Tensor) -> int:
    if is_nf4(t):
        inner, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(_tensor_nbytes(getattr(t, a)) for a in inner)
    return t.numel() * t.element_size()


def nbytes(base: Mapping[str, Tensor]) -> int:
    """Bytes held by the tensors of ``base``; for NF4 tensors, their packed codes and scales.

    Example:
        >>> import torch
        >>> nbytes({"w": torch.zeros(4, dtype=torch.float64)})
        32
    """
    return sum(_tensor_nbytes(t) for t in base.values())
