"""Read delta files, check them against the base, and cut them into per-layer parts."""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from spdelta.delta import SparseDelta
from spdelta.errors import BaseMismatchError, ShapeError, SpdeltaError
from spdelta.format import load_delta
from spdelta.hf._names import resolve_names
from spdelta.hf.model import check_base, model_prefixes, tied_aliases
from spdelta.quant.nf4 import is_nf4
from spdelta.rules import accumulate_dtype
from spdelta.serve._bank import Part, part_from_indices

__all__ = ["DeltaSource", "ServeError", "Target", "delta_parts", "linear_targets", "read_delta",
           "trim_heap"]

#: A delta file path or an in-memory delta.
DeltaSource = str | os.PathLike[str] | SparseDelta


class ServeError(SpdeltaError):
    """A delta or a request that :class:`spdelta.serve.DeltaModel` cannot serve as asked."""


class Target(NamedTuple):
    """A linear layer a delta may address.

    Attributes:
        module: The ``nn.Linear`` (or GPT-2 ``Conv1D``) module.
        out_features: Its output features.
        in_features: Its input features.
        transposed: Its weight is stored ``(in, out)`` (``Conv1D``).
    """

    module: nn.Module
    out_features: int
    in_features: int
    transposed: bool

    @property
    def weight(self) -> Tensor:
        """The module's weight parameter."""
        return cast(Tensor, self.module.weight)


def _conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is installed with the hf extra
        return None
    return Conv1D  # type: ignore[no-any-return]


def linear_targets(model: nn.Module) -> dict[str, Target]:
    """Weight name -> :class:`Target` for every linear layer whose weight is not tied.

    A tied weight (e.g. an output head sharing the input embeddings) is left out: a
    delta on it would also change the embedding lookup, which a per-row product on
    the linear's output cannot reproduce.

    Example:
        >>> sorted(linear_targets(torch.nn.Sequential(torch.nn.Linear(2, 3))))
        ['0.weight']
    """
    conv1d = _conv1d()
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out: dict[str, Target] = {}
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if weight is None or uses[id(weight)] != 1:
            continue
        key = f"{name}.weight" if name else "weight"
        if isinstance(m, nn.Linear):
            out[key] = Target(m, m.out_features, m.in_features, False)
        elif conv1d is not None and isinstance(m, conv1d):
            out[key] = Target(cast(nn.Module, m), weight.shape[1], weight.shape[0], True)
    return out


def read_delta(source: DeltaSource) -> SparseDelta:
    """``source`` itself, or the delta file it names (fully validated, onto the CPU)."""
    if isinstance(source, SparseDelta):
        return source
    return load_delta(source)


def _check(model: nn.Module, name: str, delta: SparseDelta, targets: Mapping[str, str]) -> None:
    """:func:`spdelta.hf.model.check_base`; NF4 weights cannot be fingerprinted."""
    params = dict(model.named_parameters())
    if any(is_nf4(params[t]) for t in targets.values()):
        raise ServeError(
            f"delta {name!r}: the base's target weights are NF4, and its fingerprint is taken "
            "over the dense weights; load the deltas before quantize_nf4(), or pass "
            "check_base=False.")
    try:
        check_base(model, delta)
    except BaseMismatchError as e:
        raise BaseMismatchError(f"delta {name!r}: {e}") from None


def delta_parts(model: nn.Module, name: str, delta: SparseDelta, targets: Mapping[str, Target],
                *, check: bool) -> dict[str, Part]:
    """Check ``delta`` against ``model`` and cut it into one :class:`Part` per linear layer.

    Args:
        model: The base model (its weights are read, never changed).
        name: The name the delta is served under (for messages).
        delta: The delta.
        targets: :func:`linear_targets` of ``model``.
        check: Check the delta's base fingerprint (:func:`spdelta.hf.model.check_base`).

    Returns:
        Weight name (in ``model``) -> the delta's part on that layer; values in fp32
        (fp64 for an fp64 weight), indices int32.

    Raises:
        KeyMismatchError: A delta name matches no parameter of ``model``.
        ShapeError: A delta shape differs from its parameter's.
        BaseMismatchError: ``check`` and the delta was made for another base.
        ServeError: A delta tensor is not the weight of an untied linear layer.
    """
    params = dict(model.named_parameters())
    mapping = resolve_names(delta.keys(), params, prefixes=model_prefixes(model),
                            aliases=tied_aliases(model))
    if check:
        _check(model, name, delta, mapping)
    for dname, pname in mapping.items():
        if delta[dname].shape != tuple(params[pname].shape):
            raise ShapeError(
                f"delta {name!r}: {dname!r} is for shape {list(delta[dname].shape)} but the "
                f"model's {pname!r} has {list(params[pname].shape)}; use the base model the "
                "delta was made for.")
    bad = sorted(n for n, t in mapping.items() if t not in targets)
    if bad:
        shown = ", ".join(repr(n) for n in bad[:10]) + (f" and {len(bad) - 10} more"
                                                          if len(bad) > 10 else "")
        raise ServeError(
            f"delta {name!r}: {len(bad)} tensors are not the weight of an untied linear layer "
            f"[{shown}]; per-row serving adds products to linear outputs only. Merge such a "
            "delta with spdelta.hf.apply_to_model instead.")
    out = {}
    for dname, pname in mapping.items():
        t, e = targets[pname], delta[dname]
        acc = accumulate_dtype(params[pname].dtype)
        index_dtype = torch.int32 if e.nnz < 2**31 else torch.int64
        out[pname] = part_from_indices(e.indices, e.values.to(acc), t.out_features,
                                       t.in_features, transposed=t.transposed,
                                       index_dtype=index_dtype)
    return out


_LIBC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None


def trim_heap() -> None:
    """Give the C heap's freed pages back to the OS (glibc's ``malloc_trim``; else a no-op).

    Loading cuts every delta into one small tensor per layer before packing them into
    the banks. glibc keeps those freed chunks in its heap: for 8 deltas of 1 % on
    SmolLM2-135M about 50 MB stayed resident after loading, measured by VmRSS before
    and after this call.

    Example:
        >>> trim_heap()
    """
    if _LIBC_TRIM is not None:
        _LIBC_TRIM(0)
