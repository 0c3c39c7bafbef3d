"""``DeltaModel``: one base model, many sparse deltas, a delta per row of a batch, hot-swap."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spdelta.errors import KeyMismatchError, ShapeError, format_names
from spdelta.quant.nf4 import is_nf4
from spdelta.rules import accumulate_dtype
from spdelta.serve._bank import Bank, Part
from spdelta.serve._load import (
    DeltaSource,
    ServeError,
    delta_parts,
    linear_targets,
    read_delta,
    trim_heap,
)
from spdelta.serve._plan import RowPlan, add_products

__all__ = ["DeltaModel"]

_Record = tuple[Tensor, Tensor, Tensor]  # (flat weight view, flat indices, displaced entries)


class DeltaModel:
    """Serve many sparse deltas from one copy of a base model.

    The base weights are held once and never copied. Each delta is checked against the
    base (names, shapes, the file's base fingerprint) and stored per linear layer in one
    block-diagonal CSR matrix over all loaded deltas (about 8 bytes per entry: an int32
    column and an fp32 value). A forward hook on each delta'd linear adds, to the base
    output computed once for the whole batch, every row group's sparse product
    ``y[rows] += x[rows] @ D_k^T`` in one sparse matrix product; no dense ``W + D_k``
    is built. Rows that use no delta keep the base output exactly. The hooks do
    nothing outside :meth:`use` (or ``forward``/``generate`` with ``deltas=``).

    :meth:`activate` merges one delta into the weights in place (fastest single-task
    serving) and :meth:`deactivate` puts the displaced entries back, bit for bit; both
    take time proportional to the delta's nnz. The weight tensors stay the same
    objects, so a ``torch.compile``-d model does not recompile when deltas are switched.

    One request at a time: the row layout lives on this object during a call.

    Args:
        model: A model whose deltas target ``nn.Linear`` (or ``Conv1D``) weights, e.g. a
            Hugging Face causal LM. fp32, bf16 and fp64 weights, and NF4 weights (see
            :func:`quantize_nf4`), on any device.
        deltas: Name -> delta file path (or ``SparseDelta``) to load now.
        check_base: Refuse a delta whose base fingerprint differs from ``model``'s.

    Raises:
        See :meth:`add`.

    Example:
        >>> import torch
        >>> from spdelta import SparseDelta
        >>> base = torch.nn.Linear(2, 2, bias=False)
        >>> d = SparseDelta({"weight": ((2, 2), torch.tensor([1]), torch.tensor([1.0]))})
        >>> dm = DeltaModel(base, {"up": d})
        >>> x = torch.ones(2, 2)
        >>> with torch.no_grad():
        ...     y = dm(x, deltas=["up", None])
        >>> (y - base(x)).tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """

    def __init__(self, model: nn.Module, deltas: Mapping[str, DeltaSource] | None = None,
                 *, check_base: bool = True) -> None:
        self.model = model
        self._targets = linear_targets(model)
        self._names: list[str] = []
        self._banks: dict[str, Bank] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        self._plan: RowPlan | None = None
        self._active: tuple[str, list[_Record]] | None = None
        # delta name -> its (layer, flat indices, values) per layer, made by the first
        # activate and kept until the banks are rebuilt: a swap is then 3 ops a layer
        self._merges: dict[str, list[tuple[str, Tensor, Tensor]]] = {}
        if deltas:
            self.add(deltas, check_base=check_base)

    @property
    def names(self) -> list[str]:
        """The loaded deltas' names, in loading order."""
        return list(self._names)

    @property
    def active(self) -> str | None:
        """The delta merged into the weights by :meth:`activate`, or ``None``."""
        return None if self._active is None else self._active[0]

    def nbytes(self) -> int:
        """Bytes held for the loaded deltas (their per-layer matrices)."""
        total = 0
        for bank in self._banks.values():
            m = bank.matrix
            for t in (m.crow_indices(), m.col_indices(), m.values()):
                total += t.numel() * t.element_size()
        return total

    def add(self, deltas: Mapping[str, DeltaSource], *, check_base: bool = True) -> None:
        """Load more deltas; all of them are checked before any is added.

        Args:
            deltas: Name -> delta file path or ``SparseDelta``.
            check_base: Refuse a delta whose base fingerprint differs from the model's.

        Raises:
            ServeError: A name is taken or empty, a delta is active, or a delta tensor
                is not the weight of an untied linear layer.
            KeyMismatchError: A delta names a tensor the model does not have.
            ShapeError: A delta's shape differs from the model's tensor.
            BaseMismatchError: ``check_base`` and the delta was made for another base.
            FormatError: A delta file is invalid (a subclass naming the rule).
        """
        clash = [n for n in deltas if n in self._names or not isinstance(n, str) or not n]
        if clash:
            raise ServeError(f"delta names must be new, non-empty strings; taken or empty: "
                             f"[{format_names(map(str, clash))}]. Remove the old one first.")
        if self._active is not None:
            raise ServeError(f"delta {self.active!r} is merged into the weights; deactivate() "
                             "before loading more, so they are checked against the base.")
        new = {n: delta_parts(self.model, n, read_delta(src), self._targets, check=check_base)
               for n, src in deltas.items()}
        self._rebuild(keep=list(range(len(self._names))), new=list(new.values()))
        self._names += list(new)
        del new
        trim_heap()  # the per-layer parts are freed; return their heap pages

    def remove(self, name: str) -> None:
        """Unload delta ``name`` (deactivating it first if it is active).

        Raises:
            KeyMismatchError: No delta of that name is loaded.
        """
        slot = self._slot(name)
        if self.active == name:
            self.deactivate()
        self._rebuild(keep=[k for k in range(len(self._names)) if k != slot], new=[])
        del self._names[slot]

    def _rebuild(self, keep: list[int], new: list[dict[str, Part]]) -> None:
        """Rebuild each layer's matrix from the kept slots of the old one plus ``new``."""
        self._merges.clear()  # its values are views of the old matrices
        layers = set(self._banks).union(*new)
        for name in sorted(layers):
            old = self._banks.get(name)
            parts: list[Part | None] = [old.part(k) if old and old.nnz[k] else None for k in keep]
            parts += [p.pop(name, None) for p in new]
            if all(p is None for p in parts):
                self._banks.pop(name, None)
                self._hooks.pop(name).remove()
                continue
            t = self._targets[name]
            weight = t.weight
            acc = accumulate_dtype(weight.dtype)
            self._banks[name] = Bank(t.out_features, t.in_features, parts, dtype=acc,
                                     device=weight.device)
            if name not in self._hooks:
                self._hooks[name] = t.module.register_forward_hook(_Hook(self, name))

    def _on_linear(self, name: str, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        plan = self._plan
        if plan is None:
            return None
        plan = plan.for_rows(args[0].shape[0])
        matrix = plan.matrix(self._banks[name])
        if matrix is None:
            return None
        return add_products(output, args[0], matrix, plan)

    def _slot(self, name: str) -> int:
        if name not in self._names:
            raise KeyMismatchError(f"no delta named {name!r} is loaded; loaded: "
                                   f"[{format_names(self._names)}].")
        return self._names.index(name)

    @contextmanager
    def use(self, deltas: Sequence[str | None]) -> Iterator[None]:
        """While open, row ``b`` of every batch that reaches the model uses ``deltas[b]``.

        ``None`` means the base model for that row. A batch of ``m * len(deltas)`` rows
        (``num_return_sequences=m`` or beam search in ``generate``) repeats each row's
        delta ``m`` times.

        Raises:
            KeyMismatchError: A name is not loaded.
            ServeError: A delta is active (merged), or ``use`` is already open.
        """
        slots = [None if d is None else self._slot(d) for d in deltas]
        if self._plan is not None:
            raise ServeError("DeltaModel.use is already open; serve one request at a time.")
        if self._active is not None and any(s is not None for s in slots):
            raise ServeError(f"delta {self.active!r} is merged into the weights; deactivate() "
                             "before serving deltas per row.")
        self._plan = RowPlan(slots) if any(s is not None for s in slots) else None
        try:
            yield
        finally:
            self._plan = None

    def __call__(self, *args: Any, deltas: Sequence[str | None] | None = None,
                 **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with row ``b`` using ``deltas[b]``; see :meth:`forward`."""
        return self.forward(*args, deltas=deltas, **kwargs)

    def forward(self, *args: Any, deltas: Sequence[str | None] | None = None,
                **kwargs: Any) -> Any:
        """Run the model with one delta (or ``None``) per row of the batch.

        Args:
            *args: Positional arguments of the model (e.g. ``input_ids``, batch first).
            deltas: One loaded delta name or ``None`` per row; ``None`` (the default)
                runs the model as it is.
            **kwargs: Keyword arguments of the model (``attention_mask``, ``past_key_values``...).

        Returns:
            What the model returns.

        Raises:
            ShapeError: ``len(deltas)`` differs from the batch size.
            KeyMismatchError: A name is not loaded.
        """
        if deltas is None:
            return self.model(*args, **kwargs)
        _check_rows(deltas, args, kwargs)
        with self.use(deltas):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, deltas: Sequence[str | None] | None = None,
                 **kwargs: Any) -> Any:
        """``model.generate(...)`` with row ``b`` of the batch using ``deltas[b]`` throughout.

        Prefill and every decoding step (with the KV cache) use the same rows' deltas;
        left-padded batches work as with the plain model.

        Raises:
            ShapeError: ``len(deltas)`` differs from the batch size.
            KeyMismatchError: A name is not loaded.
        """
        if deltas is None:
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]
        _check_rows(deltas, args, kwargs)
        with self.use(deltas):
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def activate(self, name: str) -> None:
        """Merge delta ``name`` into the weights in place (deactivating another one first).

        Each touched entry becomes ``cast(acc(w) + acc(v))`` as in
        :func:`spdelta.hf.apply_to_model`, and the entries it displaces are kept, so
        :meth:`deactivate` restores the base bit for bit. Cost: O(nnz of the delta).

        Raises:
            KeyMismatchError: No delta of that name is loaded.
            ServeError: A target weight is NF4 (4-bit weights cannot hold a merge
                exactly: serve that delta per row instead), or a call is in progress.
        """
        slot = self._slot(name)
        if self._plan is not None:
            raise ServeError("cannot activate a delta while DeltaModel.use is open.")
        if self.active == name:
            return
        layers = [(n, b) for n, b in self._banks.items() if b.nnz[slot]]
        nf4 = [n for n, _ in layers if is_nf4(self._targets[n].weight)]
        if nf4:
            raise ServeError(f"delta {name!r}: cannot merge into NF4 weights "
                             f"[{format_names(nf4)}]; serve it per row (deltas=[...]) instead.")
        if self._active is not None:
            self.deactivate()
        if name not in self._merges:
            self._merges[name] = [
                (n, *b.flat_entries(slot, transposed=self._targets[n].transposed))
                for n, b in layers]
        records = []
        with torch.no_grad():
            for lname, indices, values in self._merges[name]:
                flat = self._targets[lname].weight.detach().view(-1)  # the weight as it is now
                displaced = flat.index_select(0, indices)
                if flat.dtype == values.dtype:  # w + v in the weight's own dtype
                    flat.index_add_(0, indices, values)
                else:  # cast(acc(w) + v), as apply_to_model
                    merged = (displaced.to(values.dtype) + values).to(flat.dtype)
                    flat.index_copy_(0, indices, merged)
                records.append((flat, indices, displaced))
        self._active = (name, records)

    def deactivate(self) -> None:
        """Put back the entries :meth:`activate` displaced, bit for bit (no-op if none is)."""
        if self._active is None:
            return
        with torch.no_grad():
            for flat, indices, displaced in reversed(self._active[1]):
                flat.index_copy_(0, indices, displaced)
        self._active = None

    def close(self) -> None:
        """Deactivate any active delta and remove the hooks: ``model`` is the base again."""
        self.deactivate()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._banks.clear()
        self._names.clear()

    def __repr__(self) -> str:
        size = self.nbytes()
        held = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        return (f"DeltaModel({len(self._names)} deltas on {len(self._banks)} layers, "
                f"active={self.active!r}, {held})")


class _Hook:
    """The forward hook of one delta'd linear: it holds its ``DeltaModel`` weakly.

    So a model outlives a dropped ``DeltaModel`` (its hooks then do nothing), and
    ``copy.deepcopy(model)`` does not try to copy the sparse matrices.
    """

    def __init__(self, owner: DeltaModel, name: str) -> None:
        self.owner, self.name = weakref.ref(owner), name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Any:
        owner = self.owner()
        return None if owner is None else owner._on_linear(self.name, args, output)


def _check_rows(deltas: Sequence[str | None], args: tuple[Any, ...],
                kwargs: Mapping[str, Any]) -> None:
    """``len(deltas)`` must equal the batch size of ``input_ids`` / ``inputs_embeds``."""
    if isinstance(deltas, str):
        raise ShapeError(f"deltas must be one name (or None) per row, e.g. [{deltas!r}, None]; "
                         f"found the string {deltas!r}.")
    first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if isinstance(first, Tensor) and first.dim() >= 2 and first.shape[0] != len(deltas):
        raise ShapeError(f"deltas names {len(deltas)} rows but the batch has {first.shape[0]}; "
                         "pass one delta name (or None) per row.")
