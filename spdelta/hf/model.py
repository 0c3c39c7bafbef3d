"""Apply a delta to an in-memory model and remove it again, checking its base first."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from spdelta._replace import refuse_patch
from spdelta.delta import SparseDelta
from spdelta.errors import BaseMismatchError, ShapeError
from spdelta.format.constants import KEY_FINGERPRINT
from spdelta.format.fingerprint import (
    check_fingerprint,
    fingerprint_tensors,
    legacy_combine,
    legacy_positions,
    legacy_sample,
)
from spdelta.functional import accumulate_dtype
from spdelta.hf._layout import checkpoint_tensors
from spdelta.hf._names import resolve_names

__all__ = [
    "BaseMismatchError",
    "apply_to_model",
    "model_prefixes",
    "remove_from_model",
    "tied_aliases",
]

def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Alias name -> canonical name for parameters that share storage (tied weights).

    The canonical name is the one ``model.named_parameters()`` reports.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> m = torch.nn.ModuleDict({"a": lin, "b": lin})
        >>> tied_aliases(m)
        {'b.weight': 'a.weight', 'b.bias': 'a.bias'}
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {
        n: canonical[id(p)]
        for n, p in model.named_parameters(remove_duplicate=False)
        if canonical[id(p)] != n
    }


def model_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes a delta may carry or omit for ``model`` (HF ``base_model_prefix``).

    Example:
        >>> model_prefixes(torch.nn.Linear(1, 1))
        []
    """
    prefix = getattr(model, "base_model_prefix", "")
    return [prefix + "."] if prefix else []


def _targets(model: nn.Module, delta: SparseDelta) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    mapping = resolve_names(
        delta.keys(), params, prefixes=model_prefixes(model), aliases=tied_aliases(model)
    )
    out: dict[str, Tensor] = {}
    for name, target in mapping.items():
        if tuple(params[target].shape) != delta[name].shape:
            raise ShapeError(
                f"{name!r}: the delta is for shape {list(delta[name].shape)} but the "
                f"model's {target!r} has {list(params[target].shape)}; use the base "
                "model the delta was made for."
            )
        out[name] = params[target]
    return out


def _legacy(targets: Mapping[str, Tensor]) -> str:
    """The legacy ``sha256:`` fingerprint over the delta's tensors (files before format 1.2)."""
    samples = {}
    for name, t in targets.items():
        pos = torch.tensor(legacy_positions(t.numel()), dtype=torch.int64, device=t.device)
        samples[name] = legacy_sample(name, t.detach().reshape(-1)[pos], t.shape)
    return legacy_combine(samples)


def _check_base(model: nn.Module, delta: SparseDelta, targets: Mapping[str, Tensor]) -> None:
    expected = delta.metadata.get(KEY_FINGERPRINT)
    found = check_fingerprint(
        expected,
        current=lambda: fingerprint_tensors(checkpoint_tensors(model)),
        legacy=lambda: _legacy(targets),
    )
    if found is not None:
        raise BaseMismatchError(
            f"base model fingerprint: the delta was made for {expected}, this model is {found}; "
            "load the base model the delta was made for, in the dtype of its checkpoint, or "
            "pass check_base=False to apply anyway."
        )


class _Applied(NamedTuple):
    """What :func:`apply_to_model` displaced, so :func:`remove_from_model` can restore it."""

    delta: SparseDelta
    alpha: float
    original: dict[str, Tensor]  # name -> the touched entries before the add
    applied: dict[str, Tensor]  # name -> the same entries after the add


_APPLIED: weakref.WeakKeyDictionary[nn.Module, list[_Applied]] = weakref.WeakKeyDictionary()


def _add(model: nn.Module, delta: SparseDelta, alpha: float, check_base: bool) -> _Applied:
    targets = _targets(model, delta)
    if check_base:
        _check_base(model, delta, targets)
    original, applied = {}, {}
    with torch.no_grad():
        for name, p in targets.items():
            e = delta[name]
            flat = p.view(-1)
            idx = e.indices.to(p.device)
            acc = accumulate_dtype(p.dtype)
            original[name] = flat[idx].clone()
            flat[idx] = (flat[idx].to(acc) + alpha * e.values.to(p.device, acc)).to(p.dtype)
            applied[name] = flat[idx].clone()
    return _Applied(delta, alpha, original, applied)


def _restore(model: nn.Module, record: _Applied) -> bool:
    """Put back the displaced entries if the model still holds what was applied."""
    targets = _targets(model, record.delta)
    idx = {n: record.delta[n].indices.to(p.device) for n, p in targets.items()}
    if not all(torch.equal(p.view(-1)[idx[n]], record.applied[n]) for n, p in targets.items()):
        return False
    with torch.no_grad():
        for name, p in targets.items():
            p.view(-1)[idx[name]] = record.original[name]
    return True


def apply_to_model(
    model: nn.Module, delta: SparseDelta, *, alpha: float = 1.0, check_base: bool = True
) -> nn.Module:
    """Add ``alpha * delta`` to ``model``'s parameters in place and return ``model``.

    Delta names may carry or omit the model's ``base_model_prefix`` and may name
    either tensor of a tied pair (it is then applied once, to the shared storage).
    Each touched entry is summed in fp32 (fp64 for fp64 weights) and cast back,
    as ``apply_delta`` does; only the touched entries are materialised.

    Args:
        model: Any ``nn.Module``, e.g. a Hugging Face ``PreTrainedModel``.
        delta: The sparse delta.
        alpha: Scale of the delta.
        check_base: Compare ``spdelta.base_model.fingerprint`` (when the file has
            one) with this model's weights and refuse on mismatch.

    Raises:
        KeyMismatchError: A delta name matches no parameter.
        ShapeError: A delta shape differs from its parameter's.
        BaseMismatchError: The fingerprint differs and ``check_base`` is true.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> d = SparseDelta({"weight": ((2, 2), torch.tensor([1]), torch.tensor([3.0]))})
        >>> apply_to_model(model, d).weight.tolist()
        [[0.0, 3.0], [0.0, 0.0]]
    """
    refuse_patch(delta, "apply_to_model", "spdelta.patch.apply_")
    _APPLIED.setdefault(model, []).append(_add(model, delta, alpha, check_base))
    return model


def remove_from_model(model: nn.Module, delta: SparseDelta, *, alpha: float = 1.0) -> nn.Module:
    """Undo :func:`apply_to_model` in place: an exact inverse, in any dtype.

    ``apply_to_model`` keeps the entries it overwrote (``nnz`` values per applied
    delta, held while the model lives). When the same delta (equal names, indices
    and values) and ``alpha`` were applied and the model still holds the applied
    entries, those originals are put back bit for bit. Otherwise (the delta was
    never applied here, or the entries changed since) ``alpha * delta`` is
    subtracted: ``cast(acc(w) - alpha * acc(v))``, which restores each entry up to
    the rounding of the two casts, i.e. within one ulp of the weight dtype (one
    bf16 ulp, about 0.4 % relative, for bf16 weights).

    Args:
        model: The module the delta was applied to.
        delta: The same delta.
        alpha: The same scale.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> before = model.weight.detach().clone()
        >>> d = SparseDelta({"weight": ((2, 2), torch.tensor([1]), torch.tensor([0.5]))})
        >>> torch.equal(remove_from_model(apply_to_model(model, d), d).weight, before)
        True
    """
    records = _APPLIED.get(model, [])
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r.alpha == alpha and r.delta == delta and _restore(model, r):
            del records[i]
            return model
    _add(model, delta, -alpha, check_base=False)
    return model
