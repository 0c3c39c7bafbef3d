"""Apply a delta to an in-memory model and remove it again, checking its base first."""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from spdelta._replace import refuse_patch
from spdelta.delta import SparseDelta
from spdelta.errors import (
    BaseMismatchError,
    KeyMismatchError,
    ParameterError,
    ShapeError,
    format_names,
)
from spdelta.format.constants import KEY_FINGERPRINT
from spdelta.format.fingerprint import (
    check_fingerprint,
    fingerprint_tensors,
    legacy_combine,
    legacy_positions,
    legacy_sample,
)
from spdelta.hf._layout import checkpoint_tensors
from spdelta.hf._names import candidates, resolve_names
from spdelta.hf.layout import CheckpointLayout
from spdelta.rules import accumulate_dtype

__all__ = [
    "BaseMismatchError",
    "apply_to_model",
    "check_base",
    "model_delta",
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


def resolve_delta(model: nn.Module, names: Iterable[str]
                  ) -> tuple[dict[str, str], CheckpointLayout | None]:
    """Delta name -> the parameter, or the checkpoint tensor, it names (and the layout, if used).

    Names are first matched against the parameters (prefixes, tied aliases); only when
    some do not match is the checkpoint layout built and its names tried too.
    """
    names = list(names)
    params = dict(model.named_parameters())
    prefixes, aliases = model_prefixes(model), tied_aliases(model)
    try:
        return resolve_names(names, params, prefixes=prefixes, aliases=aliases), None
    except KeyMismatchError:
        layout = CheckpointLayout(model)
        if layout.is_identity:
            raise
    examples = layout.converted or layout.checkpoint_shapes
    found = [sum(any(c in side for c in candidates(n, prefixes)) for n in names)
             for side in (params, layout.checkpoint_shapes)]
    hint = (f"Of the delta's {len(names)} tensors, {found[0]} are in the model's layout (its "
            f"parameters, named like [{format_names(params, 3)}]) and {found[1]} in its "
            f"checkpoint's layout (named like [{format_names(examples, 3)}]); use the base "
            "model the delta was made for.")
    known = set(params) | set(layout.checkpoint_shapes)
    return resolve_names(names, known, prefixes=prefixes, aliases=aliases, hint=hint), layout


def _check_shape(name: str, found: tuple[int, ...], target: str, shape: tuple[int, ...]) -> None:
    if tuple(shape) != found:
        raise ShapeError(
            f"{name!r}: the delta is for shape {list(found)} but the model's {target!r} has "
            f"{list(shape)}; use the base model the delta was made for."
        )


def model_delta(model: nn.Module, delta: SparseDelta) -> SparseDelta:
    """``delta`` in ``model``'s own parameter names and layout.

    Delta names may carry or omit the model's prefix, name either tensor of a tied pair,
    or be checkpoint names (what ``save_pretrained`` writes: for Mixtral,
    ``block_sparse_moe.experts.3.w1.weight`` for part of the fused parameter
    ``mlp.experts.gate_up_proj``); see :class:`spdelta.hf.layout.CheckpointLayout`.

    Args:
        model: The model.
        delta: A delta in model or checkpoint names (or a mix of both).

    Returns:
        The same entries keyed by ``model.named_parameters()`` names, laid out as the
        parameters are; metadata kept.

    Raises:
        KeyMismatchError: A name matches nothing (the message shows both layouts' names),
            or two delta names address the same parameter.
        ShapeError: A delta shape differs from its tensor's.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> d = SparseDelta({"weight": ((2, 2), torch.tensor([1]), torch.tensor([1.0]))})
        >>> model_delta(lin, d).keys()
        ['weight']
    """
    mapping, layout = resolve_delta(model, delta.keys())
    params = dict(model.named_parameters())
    direct, via = {}, {}
    for name, target in mapping.items():
        if target in params:
            _check_shape(name, delta[name].shape, target, tuple(params[target].shape))
            direct[target] = delta[name]
        elif layout is not None:
            _check_shape(name, delta[name].shape, target, layout.checkpoint_shapes[target])
            via[target] = delta[name]
    out = dict(direct)
    if via and layout is not None:
        for target, entry in layout.to_model(SparseDelta._trusted(via, {})).items():
            if target in out:
                raise KeyMismatchError(
                    f"the delta names {target!r} both directly and through checkpoint "
                    "tensors; a delta must name each tensor once (spec §6). Compose them.")
            out[target] = entry
    return SparseDelta._trusted(out, delta.metadata)


def _base_tensors(model: nn.Module, delta: SparseDelta) -> dict[str, Tensor]:
    """Delta name -> the base tensor it addresses, in the delta's own layout."""
    mapping, layout = resolve_delta(model, delta.keys())
    params: dict[str, Tensor] = dict(model.named_parameters())
    out = {n: params[t] for n, t in mapping.items() if t in params}
    via = {t: n for n, t in mapping.items() if t not in params}
    if via and layout is not None:
        out.update({via[c]: t for c, t in layout.checkpoint_tensors(names=via).items()})
    return out


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or raise: a scale must be a finite real number.

    Raises:
        ParameterError: ``alpha`` is NaN, infinite, or not a real number.

    Example:
        >>> check_alpha(0.5)
        0.5
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ParameterError(f"alpha must be a finite number; found {alpha!r} (--alpha).")
    return float(alpha)


def check_overflow(name: str, before: Tensor, after: Tensor, alpha: float) -> None:
    """Refuse entries that ``alpha * delta`` made non-finite (they were finite before).

    Raises:
        ParameterError: Some entries overflowed the weight's dtype.

    Example:
        >>> check_overflow("w", torch.ones(2), torch.tensor([1.0, float("inf")]), 1e38)
        Traceback (most recent call last):
        ...
        spdelta.errors.ParameterError: 'w': alpha 1e+38 times the delta overflows float32 \
in 1 entries; use a smaller alpha (--alpha).
    """
    bad = int((~torch.isfinite(after) & torch.isfinite(before)).sum())
    if bad:
        raise ParameterError(f"{name!r}: alpha {alpha:g} times the delta overflows "
                             f"{str(after.dtype).removeprefix('torch.')} in {bad} entries; use "
                             "a smaller alpha (--alpha).")


def legacy_fingerprint(targets: Mapping[str, Tensor]) -> str:
    """The legacy ``sha256:`` fingerprint over a delta's base tensors (files before format 1.2).

    Args:
        targets: Delta name -> the base tensor it addresses, in the delta's layout.

    Example:
        >>> legacy_fingerprint({"w": torch.ones(3)})[:7]
        'sha256:'
    """
    samples = {}
    for name, t in targets.items():
        pos = torch.tensor(legacy_positions(t.numel()), dtype=torch.int64, device=t.device)
        samples[name] = legacy_sample(name, t.detach().reshape(-1)[pos], t.shape)
    return legacy_combine(samples)


def _check_base(model: nn.Module, delta: SparseDelta) -> None:
    expected = delta.metadata.get(KEY_FINGERPRINT)
    found = check_fingerprint(
        expected,
        current=lambda: fingerprint_tensors(checkpoint_tensors(model)),
        # the legacy rule covers the delta's own tensors, in the delta's names and layout
        legacy=lambda: legacy_fingerprint(_base_tensors(model, delta)),
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


def _add(model: nn.Module, delta: SparseDelta, alpha: float) -> _Applied:
    """Add ``alpha * delta`` (in model names and layout) in place; what was displaced."""
    alpha = check_alpha(alpha)
    params = dict(model.named_parameters())
    targets = {n: params[n] for n in delta.keys()}
    original, applied = {}, {}
    with torch.no_grad():
        for name, p in targets.items():
            e = delta[name]
            flat = p.view(-1)
            idx = e.indices.to(p.device)
            acc = accumulate_dtype(p.dtype)
            original[name] = flat[idx].clone()
            added = original[name].to(acc) + alpha * e.values.to(p.device, acc)
            applied[name] = added.to(p.dtype)
            check_overflow(name, original[name], applied[name], alpha)
        for name, p in targets.items():  # every tensor checked first: all or nothing
            p.view(-1)[delta[name].indices.to(p.device)] = applied[name]
    return _Applied(delta, alpha, original, applied)


def _restore(model: nn.Module, record: _Applied) -> bool:
    """Put back the displaced entries if the model still holds what was applied."""
    params = dict(model.named_parameters())
    targets = {n: params[n] for n in record.delta.keys()}
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

    Delta names may carry or omit the model's ``base_model_prefix``, may name
    either tensor of a tied pair (it is then applied once, to the shared storage),
    and may be the checkpoint's names and layout instead of the model's (a delta
    trained or extracted on a Mixtral checkpoint names ``...experts.3.w1.weight``;
    see :func:`model_delta`). Each touched entry is summed in fp32 (fp64 for fp64 weights)
    and cast back,
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
    if check_base:
        _check_base(model, delta)
    _APPLIED.setdefault(model, []).append(_add(model, model_delta(model, delta), alpha))
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
    delta = model_delta(model, delta)
    records = _APPLIED.get(model, [])
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r.alpha == alpha and r.delta == delta and _restore(model, r):
            del records[i]
            return model
    _add(model, delta, -alpha)
    return model


def check_base(model: nn.Module, delta: SparseDelta) -> None:
    """Refuse ``delta`` unless it was made for ``model``: the check :func:`apply_to_model` makes.

    Resolves the delta's names on ``model`` (prefixes, tied aliases), compares each
    shape, then compares the delta's base fingerprint (when the file has one) with
    this model's weights (spec §5.1). Nothing is modified. This is the one place other modules
    (``spdelta.serve``) call to check a base, so that the fingerprint rule has one home.

    Args:
        model: The base model, with dense weights as they were when the delta was made.
        delta: The delta to check.

    Raises:
        KeyMismatchError: A delta name matches no parameter.
        ShapeError: A delta shape differs from its parameter's.
        BaseMismatchError: The delta's fingerprint differs from this model's.

    Example:
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> d = SparseDelta({"weight": ((2, 2), torch.tensor([1]), torch.tensor([3.0]))})
        >>> check_base(model, d)  # no fingerprint in d: only names and shapes are checked
    """
    model_delta(model, delta)  # names and shapes
    _check_base(model, delta)
