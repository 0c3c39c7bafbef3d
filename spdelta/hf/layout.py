"""One name space across memory and disk: a model's parameters in its checkpoint's names and layout.

Transformers 5 converts some weights at load time: Mixtral's per-expert matrices
``block_sparse_moe.experts.3.w1.weight`` become one fused 3-D parameter
``mlp.experts.gate_up_proj`` (and ``save_pretrained`` converts them back). A delta file
speaks the checkpoint's names and layout (what ``save_pretrained`` writes), so that it
applies to the directory a model came from and to the model in memory alike.

:class:`CheckpointLayout` reads transformers' own description of those conversions
(``transformers.conversion_mapping``, the ``WeightConverter`` / ``WeightRenaming`` list a
model was loaded with, or the default one for its architecture) and runs it on
:class:`spdelta.hf._trace.Trace` stand-ins: memory is proportional to a delta's entries,
never to the model. There is no table per architecture here. With transformers 4 (no
conversions) and for dense models, both layouts are the model's own names.

Example:
    >>> import torch
    >>> layout = CheckpointLayout(torch.nn.Linear(2, 2))
    >>> layout.is_identity, sorted(layout.checkpoint_shapes)
    (True, ['bias', 'weight'])
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from spdelta.delta import DeltaTensor, SparseDelta
from spdelta.errors import KeyMismatchError, format_names
from spdelta.hf._trace import Trace, UntraceableError

__all__ = ["CheckpointLayout", "LayoutError", "state_tensors"]

_EMPTY = torch.zeros(0, dtype=torch.long)


class LayoutError(KeyMismatchError):
    """A delta's names fit neither the model's layout nor its checkpoint's (or cannot be mapped)."""


def _transforms(model: nn.Module) -> list[Any]:
    """The conversions ``save_pretrained`` reverts for ``model`` (copies), or ``[]``.

    The list the model was loaded with (``model._weight_conversions``), else the
    default one of its architecture without prefix changes: exactly the choice of
    ``transformers.core_model_loading.revert_weight_conversion``.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers < 5: weights load as stored
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    found = getattr(model, "_weight_conversions", None)
    if found is None:
        found = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                 if not isinstance(t, PrefixChange)]
    return copy.deepcopy(list(found))  # matching marks a transform as used: keep theirs clean


def _convert(model: nn.Module, transforms: list[Any], tensors: Mapping[str, Any], *,
             reverse: bool) -> tuple[dict[str, Any], dict[str, bool]]:
    """Run transformers' conversions on ``tensors`` (real tensors or traces).

    ``reverse=False`` goes from checkpoint names to model names, as
    ``convert_and_load_state_dict_in_model`` groups and converts; ``reverse=True`` goes
    back, as ``revert_weight_conversion`` does for ``save_pretrained``.

    Returns:
        ``(name -> tensor, name -> True when an operation moved entries)``.
    """
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
        rename_source_key,
    )

    steps = [t.reverse_transform() for t in transforms[::-1]] if reverse else transforms
    renamings = [t for t in steps if isinstance(t, WeightRenaming)]
    converters = [t for t in steps if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    known = {k: True for k in model.state_dict(keep_vars=True)}
    prefix = getattr(model, "base_model_prefix", "")
    groups: dict[str, Any] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        if reverse:
            renamed, pattern = apply_converters(key, converters)
            if pattern is None:
                renamed = apply_renamings(key, renamings)
        else:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, known)
            if renamed not in known and key in known:
                renamed, pattern = rename_source_key(key, [], [], prefix, known)
        group = groups.setdefault(renamed, copy.deepcopy(by_pattern[pattern]) if pattern
                                  else WeightRenaming(key, renamed))
        group.add_tensor(renamed, key, pattern or key, tensor)
    out: dict[str, Any] = {}
    moved: dict[str, bool] = {}
    for first, group in groups.items():
        converted = isinstance(group, WeightConverter)
        for name, value in group.convert(first, model=model, config=model.config).items():
            name = apply_renamings(name, renamings) if reverse and converted else name
            out[name] = value[0] if isinstance(value, list) else value
            moved[name] = converted
    return out, moved


def _storage_key(t: Tensor) -> tuple[object, ...]:
    """Equal for two views of the same memory with the same layout (tied weights)."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What ``save_pretrained`` saves of ``model``, in the model's own names and layout.

    The model's state dict (parameters and persistent buffers; not non-persistent
    buffers such as Llama's ``inv_freq``), minus the keys the model declares as not
    saved (``_keys_to_ignore_on_save``), with each group of tied tensors (one memory,
    e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``) counted once under the
    name that comes first in the state dict, as ``save_pretrained`` keeps it. The
    checkpoint's names and layout are these after the load-time conversions are
    reverted (:meth:`CheckpointLayout.checkpoint_tensors`).

    Args:
        model: Any ``nn.Module``.

    Returns:
        Name -> tensor (views of the model's own memory, detached; nothing is copied).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> sorted(state_tensors(torch.nn.ModuleDict({"a": lin, "b": lin})))
        ['a.bias', 'a.weight']
    """
    state = model.state_dict(keep_vars=False)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    out: dict[str, Tensor] = {}
    seen: set[tuple[object, ...]] = set()
    for name, t in state.items():
        key = _storage_key(t)
        if t.numel() and t.device.type != "meta" and key in seen:
            continue  # a tied alias of a tensor already kept
        seen.add(key)
        out[name] = t
    return out


def _components(pairs: Iterable[tuple[str, Iterable[str]]]) -> list[tuple[set[str], set[str]]]:
    """Groups ``(model names, checkpoint names)`` connected by ``checkpoint -> sources``."""
    groups: list[tuple[set[str], set[str]]] = []
    where: dict[str, int] = {}
    for ckpt, sources in pairs:
        hits = sorted({where[s] for s in sources if s in where})
        model, names = set(sources), {ckpt}
        for i in hits:
            model |= groups[i][0]
            names |= groups[i][1]
            groups[i] = (set(), set())
        where.update({s: len(groups) for s in model})
        groups.append((model, names))
    return [g for g in groups if g[1]]


class CheckpointLayout:
    """A model's parameters in the names and layout its checkpoint stores them in.

    Built from the model (a real one, or one on the ``meta`` device built from a
    config). The checkpoint layout is what ``model.save_pretrained`` writes: for a
    model loaded with ``from_pretrained``, the layout of the directory it came from.

    Args:
        model: Any ``nn.Module``; conversions exist only for transformers >= 5 models.

    Attributes:
        model_shapes: Parameter name (``named_parameters()``, tied weights once) -> shape.
        checkpoint_shapes: Checkpoint tensor name -> shape.
        sources: Checkpoint name -> the model parameters its entries come from.
        converted: Checkpoint names whose entries a conversion moves (not only renames).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        stored = {n: tuple(t.shape) for n, t in state_tensors(model).items()}
        self._transforms = _transforms(model)
        if not self._transforms:
            self.checkpoint_shapes = stored
            self.sources = {n: (n,) for n in stored}
            self.converted: frozenset[str] = frozenset()
        else:
            traces = {n: Trace.of((n,), s, _EMPTY, _EMPTY) for n, s in stored.items()}
            out, moved = self._run(traces, reverse=True)
            self.checkpoint_shapes = {n: tuple(t.shape) for n, t in out.items()}
            self.sources = {n: t.sources for n, t in out.items()}
            self.converted = frozenset(n for n, m in moved.items() if m)
        self._groups = _components(sorted(self.sources.items()))

    @property
    def is_identity(self) -> bool:
        """True when the checkpoint stores every parameter under its own name, as is."""
        return not self.converted and all(self.sources[n] == (n,) for n in self.checkpoint_shapes)

    def _run(self, tensors: Mapping[str, Any], *, reverse: bool) -> tuple[dict[str, Any],
                                                                          dict[str, bool]]:
        try:
            return _convert(self.model, self._transforms, tensors, reverse=reverse)
        except UntraceableError as e:
            raise LayoutError(
                f"{type(self.model).__name__}: transformers converts its checkpoint with an "
                f"operation ({e}) that does not only move entries; spdelta cannot map a delta "
                "between the checkpoint layout and the model layout. Use a delta in the "
                "model's own names.") from None

    def checkpoint_names(self, model_names: Iterable[str]) -> list[str]:
        """The checkpoint tensors that hold entries of the given model parameters, sorted."""
        wanted = set(model_names)
        return sorted(c for c, s in self.sources.items() if wanted & set(s))

    def _group_of(self, names: Iterable[str], *, model: bool) -> tuple[set[str], set[str]]:
        wanted, m_out, c_out = set(names), set(), set()
        for m, c in self._groups:
            if wanted & (m if model else c):
                m_out |= m
                c_out |= c
        return m_out, c_out

    def to_checkpoint(self, delta: SparseDelta) -> SparseDelta:
        """The same delta in checkpoint names and layout; its names must be model names.

        Raises:
            LayoutError: A name is not a parameter of the model.
        """
        self._check(delta, self.model_shapes, "model")
        if self.is_identity:
            return delta
        touched, _ = self._group_of(delta.keys(), model=True)
        return self._mapped(delta, {n: self.model_shapes[n] for n in touched}, reverse=True)

    def to_model(self, delta: SparseDelta) -> SparseDelta:
        """The same delta in the model's parameter names and layout; names must be checkpoint names.

        Raises:
            LayoutError: A name is not a checkpoint tensor of the model.
        """
        self._check(delta, self.checkpoint_shapes, "checkpoint")
        if self.is_identity:
            return delta
        _, touched = self._group_of(delta.keys(), model=False)
        return self._mapped(delta, {n: self.checkpoint_shapes[n] for n in touched}, reverse=False)

    def _check(self, delta: SparseDelta, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
        missing = [n for n in delta.keys() if n not in shapes]
        if missing:
            raise LayoutError(f"delta tensors [{format_names(missing)}] are not {what} tensors "
                              f"of {type(self.model).__name__}; its {what} names are "
                              f"[{format_names(shapes)}].")

    def _mapped(self, delta: SparseDelta, shapes: Mapping[str, tuple[int, ...]], *,
                reverse: bool) -> SparseDelta:
        """Trace ``delta``'s entries through the conversions of the tensors in ``shapes``."""
        offsets, start = {}, 0
        for name, e in delta.items():
            offsets[name] = start
            start += e.nnz
        traces = {n: Trace.of((n,), s, delta[n].indices.cpu(),
                              torch.arange(offsets[n], offsets[n] + delta[n].nnz))
                  if n in delta else Trace.of((n,), s, _EMPTY, _EMPTY)
                  for n, s in shapes.items()}
        out, _ = self._run(traces, reverse=reverse)
        entries = {}
        for name, t in out.items():
            parts = [n for n in t.sources if n in delta]
            if parts:
                entries[name] = _gather(name, t, delta, {n: offsets[n] for n in parts})
        return SparseDelta._trusted(entries, delta.metadata)

    def checkpoint_tensors(self, params: Mapping[str, Tensor] | None = None,
                           names: Iterable[str] | None = None) -> Mapping[str, Tensor]:
        """Checkpoint name -> tensor, as ``save_pretrained`` would write them (lazily).

        Parameters (tied weights once) and persistent buffers, as in the state dict that
        ``save_pretrained`` writes (:func:`state_tensors`). A converted tensor is computed
        when asked for, one conversion group at a time (one layer's experts, say), so
        memory stays bounded by a group; the others are the model's tensors themselves.

        Args:
            params: Model name -> tensor (default: :func:`state_tensors` of the model);
                a lazy mapping works (only the needed names are read).
            names: Only these checkpoint names (default: all).
        """
        params = state_tensors(self.model) if params is None else params
        return _Converted(self, params, self.checkpoint_shapes if names is None else names,
                          to_model=False)

    def model_tensors(self, checkpoint: Mapping[str, Tensor],
                      names: Iterable[str] | None = None) -> Mapping[str, Tensor]:
        """Model name -> tensor built from checkpoint tensors, as loading does (lazily).

        Args:
            checkpoint: Checkpoint name -> tensor; a lazy mapping works.
            names: Only these model names (default: all).
        """
        return _Converted(self, checkpoint, self.model_shapes if names is None else names,
                          to_model=True)


class _Converted(Mapping[str, Tensor]):
    """Name -> tensor converted from ``source`` on access, one conversion group at a time.

    Iterating in name order (as the fingerprint does) computes each group once: a group's
    other outputs wait in ``_pending`` until asked for.
    """

    def __init__(self, layout: CheckpointLayout, source: Mapping[str, Tensor],
                 names: Iterable[str], *, to_model: bool) -> None:
        self._layout, self._source, self._to_model = layout, source, to_model
        self._names = sorted(set(names))
        as_is = {c: s[0] for c, s in layout.sources.items()
                 if c not in layout.converted and len(s) == 1}
        self._as_is = {m: c for c, m in as_is.items()} if to_model else as_is
        self._pending: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name in self._as_is:
            return self._source[self._as_is[name]]
        if name not in self._pending:
            model_names, ckpt_names = self._layout._group_of([name], model=self._to_model)
            inputs = ckpt_names if self._to_model else model_names
            with torch.no_grad():
                out = self._layout._run({n: self._source[n] for n in inputs},
                                        reverse=not self._to_model)[0]
            if name not in out:
                raise KeyError(name)
            self._pending.update(out)
        return self._pending.pop(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _gather(name: str, trace: Trace, delta: SparseDelta, offsets: Mapping[str, int]) -> DeltaTensor:
    """The entry of ``trace`` (sorted flat indices) with values fetched by id from ``delta``."""
    flat = trace.flat_indices()
    order = torch.argsort(flat)
    flat, ids = flat[order], trace.ids[order]
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise LayoutError(f"{name!r}: the conversion maps two delta entries onto one position; "
                          "the delta cannot be expressed in this layout.")
    dtype = delta[next(iter(offsets))].values.dtype
    for n in offsets:
        dtype = torch.promote_types(dtype, delta[n].values.dtype)
    values = torch.empty(flat.numel(), dtype=dtype)
    for n, lo in offsets.items():
        hit = (ids >= lo) & (ids < lo + delta[n].nnz)
        values[hit] = delta[n].values.cpu()[ids[hit] - lo].to(dtype)
    device = delta[next(iter(offsets))].indices.device
    return DeltaTensor(tuple(trace.shape), flat.to(device), values.to(device))

