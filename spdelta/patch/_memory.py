"""Exact patches of tensors in memory: ``diff`` two state dicts, ``apply_`` one in place."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from spdelta._replace import Entry, Patch, ReplaceTensor, bit_view, changed_positions, storable
from spdelta.errors import BaseMismatchError, KeyMismatchError, ShapeError, format_names
from spdelta.format._chain import chain_keys, is_chain
from spdelta.format.constants import KEY_FINGERPRINT, KEY_RESULT_FINGERPRINT
from spdelta.format.fingerprint import check_fingerprint, fingerprint_tensors
from spdelta.hf._layout import checkpoint_tensors
from spdelta.hf.model import legacy_fingerprint
from spdelta.ops.sequence import sequence_tensor
from spdelta.rules import accumulate_dtype

__all__ = ["apply_", "compose_patches", "diff", "diff_tensor"]

Target = TypeVar("Target", nn.Module, MutableMapping[str, Tensor])


def _tensors(source: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint name -> tensor of a model (tied tensors once), or the mapping itself."""
    if isinstance(source, nn.Module):
        return dict(checkpoint_tensors(source))
    return dict(source)


def _same_layout(name: str, old: Tensor, new: Tensor) -> None:
    if tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
        raise ShapeError(
            f"{name!r}: the two sides hold {old.dtype}{list(old.shape)} and "
            f"{new.dtype}{list(new.shape)}; a patch keeps each tensor's shape and dtype. "
            "Diff checkpoints of one architecture, saved in one dtype.")
    if not storable(new.dtype):
        raise ShapeError(f"{name!r}: dtype {new.dtype} cannot be stored in a patch (it holds "
                         "dtypes of whole bytes that safetensors knows).")


def diff_tensor(name: str, old: Tensor, new: Tensor) -> ReplaceTensor:
    """The replacement entry of every element whose bits differ between ``old`` and ``new``.

    Args:
        name: Tensor name (for messages).
        old: The tensor before, any storable dtype and device.
        new: The tensor after: same shape and dtype.

    Returns:
        A ``ReplaceTensor`` on ``new``'s device: sorted positions and ``new``'s values there
        (its bits: NaN payloads, ``-0.0``, subnormals and infinities included).

    Raises:
        ShapeError: Shapes or dtypes differ, or the dtype cannot be stored.

    Example:
        >>> e = diff_tensor("w", torch.tensor([0.0, 1.0, 2.0]), torch.tensor([-0.0, 1.0, 3.0]))
        >>> e.indices.tolist(), e.values.tolist()
        ([0, 2], [-0.0, 3.0])
    """
    _same_layout(name, old, new)
    a, b = old.detach().reshape(-1), new.detach().reshape(-1)
    idx = changed_positions(a, b)
    return ReplaceTensor(tuple(new.shape), idx, b[idx])


def _same_names(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> None:
    if old.keys() != new.keys():
        raise KeyMismatchError(
            f"the two sides hold different tensors: only before [{format_names(old.keys() - new)}]"
            f", only after [{format_names(new.keys() - old)}]; a patch changes values, not the "
            "set of tensors.")


def diff(old: nn.Module | Mapping[str, Tensor], new: nn.Module | Mapping[str, Tensor], *,
         fingerprints: bool = True) -> Patch:
    """An exact patch from ``old`` to ``new``: every element whose bits differ.

    Works on any device (the patch's tensors stay there) and every storable dtype.
    Tensors that did not change get no entry. The patch records the fingerprint
    (spec §5.1) of ``old`` as its base and of ``new`` as its result, so that
    :func:`apply_` refuses the wrong step and checks what it produced.

    Args:
        old: The tensors before: a model (its checkpoint tensors, tied ones once) or a
            name -> tensor mapping.
        new: The tensors after: same names, shapes and dtypes.
        fingerprints: Record both fingerprints (1,024 elements read per tensor).

    Returns:
        A :class:`~spdelta.patch.Patch` of ``ReplaceTensor`` entries.

    Raises:
        KeyMismatchError: The two sides hold different names.
        ShapeError: A tensor's shape or dtype differs.

    Example:
        >>> old = {"w": torch.zeros(4, dtype=torch.bfloat16), "step": torch.tensor(7)}
        >>> new = {"w": torch.tensor([0, 1, 0, 0], dtype=torch.bfloat16), "step": torch.tensor(8)}
        >>> p = diff(old, new)
        >>> p.nnz, p["step"].values.tolist()
        (2, [8])
        >>> apply_(old, p)["w"].tolist()
        [0.0, 1.0, 0.0, 0.0]
    """
    a, b = _tensors(old), _tensors(new)
    _same_names(a, b)
    entries: dict[str, Entry] = {}
    for name in sorted(b):
        e = diff_tensor(name, a[name], b[name])
        if e.nnz:
            entries[name] = e
    meta = {}
    if fingerprints:
        meta[KEY_FINGERPRINT] = fingerprint_tensors(a)
        meta[KEY_RESULT_FINGERPRINT] = fingerprint_tensors(b)
    return Patch._trusted(entries, meta)


def _targets(target: nn.Module | Mapping[str, Tensor], patch: Patch) -> dict[str, Tensor]:
    """The tensor each entry writes to, checked for name, shape and dtype before any write."""
    tensors = _tensors(target)
    if isinstance(target, nn.Module):  # also accept state-dict aliases of tied tensors
        tensors = {**target.state_dict(), **tensors}
    missing = [n for n in patch.keys() if n not in tensors]
    if missing:
        raise KeyMismatchError(f"the patch names {len(missing)} tensors the target does not "
                               f"have: [{format_names(missing)}]; apply it to its base model.")
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    seen: dict[tuple[int, torch.dtype, tuple[int, ...]], str] = {}
    for name, e in patch.items():
        t = tensors[name]
        out[name] = t
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and seen.setdefault(key, name) != name:
            raise KeyMismatchError(f"{seen[key]!r} and {name!r} are one (tied) tensor; a patch "
                                   "names it once.")
        ok_dtype = (t.dtype == e.values.dtype if isinstance(e, ReplaceTensor)
                    else t.dtype.is_floating_point)
        if tuple(t.shape) != tuple(e.shape) or not ok_dtype:
            bad.append(f"{name!r}: patch {e.values.dtype}{list(e.shape)}, target "
                       f"{t.dtype}{list(t.shape)}")
    if bad:
        raise ShapeError(f"{len(bad)} entries do not fit the target: " + "; ".join(bad[:10])
                         + ". Apply the patch to the model it was made from.")
    return out


def _check_base(tensors: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                patch: Patch) -> None:
    expected = patch.metadata.get(KEY_FINGERPRINT)
    found = check_fingerprint(expected, current=lambda: fingerprint_tensors(tensors),
                              legacy=lambda: legacy_fingerprint(targets))
    if found is not None:
        done = found == patch.metadata.get(KEY_RESULT_FINGERPRINT)
        raise BaseMismatchError(
            f"wrong step: the patch applies to {expected}, the target is {found}"
            + (" (the patch's result: it is already applied)" if done else "")
            + "; apply the patches of a chain in order, or pass check=False.")


def _write(t: Tensor, e: Entry) -> None:
    """Apply one entry to ``t`` in place: copy bits (replace) or add at the entries (add)."""
    idx, values = e.indices.to(t.device), e.values.to(t.device)
    where: tuple[Tensor, ...] = (idx,)
    flat = t.view(-1) if t.is_contiguous() else t
    if not t.is_contiguous():  # write through the strides: no flat view exists
        where = torch.unravel_index(idx, tuple(t.shape))
    if isinstance(e, ReplaceTensor):
        bit_view(flat)[where] = bit_view(values)
    else:
        acc = accumulate_dtype(t.dtype)
        flat[where] = (flat[where].to(acc) + values.to(acc)).to(t.dtype)


def apply_(target: Target, patch: Patch, *, check: bool = True) -> Target:
    """Apply ``patch`` to ``target`` in place (a live model or a state dict), CPU or CUDA.

    Replacement entries copy their bits into the target's memory; additive entries add
    as spec §6.4 does (summed in fp32, or fp64 for fp64), touching only their entries.
    Everything is checked before the first write: names, shapes, dtypes and, with
    ``check``, the base fingerprint (the wrong step of a chain is refused, naming both
    fingerprints). With ``check``, the result's fingerprint is compared with the patch's
    ``spdelta.result.fingerprint`` afterwards; on a mismatch every written entry is
    restored bit for bit and ``BaseMismatchError`` is raised.

    Args:
        target: An ``nn.Module`` (its checkpoint tensors; a tied alias is accepted too) or a
            mutable name -> tensor mapping; modified in place.
        patch: The patch; its tensors may be on any device.
        check: Verify the base fingerprint before and the result fingerprint after.

    Returns:
        ``target``, patched.

    Raises:
        KeyMismatchError: A name is not in the target, or names a tied tensor twice.
        ShapeError: A shape or (for a replacement) dtype differs, or an additive entry
            targets a non-float tensor.
        BaseMismatchError: ``check`` and the target is not the patch's base, or the result
            is not the patch's result (the target is then restored).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> before = {k: v.clone() for k, v in lin.state_dict().items()}
        >>> with torch.no_grad():
        ...     lin.bias[0] = float("nan")
        >>> p = diff(before, lin.state_dict())
        >>> other = torch.nn.Linear(2, 2)
        >>> _ = other.load_state_dict(before)
        >>> apply_(other, p).bias.isnan().tolist()
        [True, False]
    """
    targets = _targets(target, patch)
    if check:
        _check_base(_tensors(target), targets, patch)
    result = patch.metadata.get(KEY_RESULT_FINGERPRINT) if check else None
    saved: dict[str, ReplaceTensor] = {}  # the bits a failed result check restores
    with torch.no_grad():
        for name, e in patch.items():
            t = targets[name]
            if result is not None:
                old = bit_view(t).reshape(-1)[e.indices.to(t.device)]
                saved[name] = ReplaceTensor(e.shape, e.indices, old.view(t.dtype))
            _write(t, e)
        if result is not None and fingerprint_tensors(_tensors(target)) != result:
            for name, e in saved.items():
                _write(targets[name], e)
            raise BaseMismatchError(
                f"the patched target is not the patch's result {result}: the target matched the "
                "patch's base only in the sampled elements. It was restored; diff against this "
                "target to make a patch for it.")
    return target


def compose_patches(*patches: Patch, allow_base_mismatch: bool = False) -> Patch:
    """One patch equal to applying ``patches`` in order (spec §6.5), with chain fingerprints.

    Each patch must apply to what the one before gives (its base fingerprint equals the
    previous result fingerprint, when both are known). The result applies to the first
    patch's base and gives the last one's result.

    Args:
        *patches: One or more patches, in application order.
        allow_base_mismatch: Accept a chain whose links do not match.

    Returns:
        The composed :class:`~spdelta.patch.Patch`.

    Raises:
        CompositionError: A tensor's composition depends on the base (spec §6.5).
        BaseMismatchError: The patches are not consecutive steps.
        ShapeError: A tensor has different shapes in two patches.

    Example:
        >>> c0 = {"w": torch.zeros(3)}
        >>> c1, c2 = {"w": torch.tensor([1.0, 0, 0])}, {"w": torch.tensor([1.0, 0, 2])}
        >>> both = compose_patches(diff(c0, c1), diff(c1, c2))
        >>> apply_({"w": torch.zeros(3)}, both)["w"].tolist()
        [1.0, 0.0, 2.0]
    """
    if not patches:
        raise ShapeError("compose_patches: pass at least one patch.")
    shapes: dict[str, tuple[int, ...]] = {}
    for p in patches:
        for name, e in p.items():
            if shapes.setdefault(name, tuple(e.shape)) != tuple(e.shape):
                raise ShapeError(f"{name!r}: shapes {list(shapes[name])} and {list(e.shape)} "
                                 "in two patches; compose patches of one model.")
    entries = {n: sequence_tensor(n, [p[n] if n in p else None for p in patches]) for n in shapes}
    labels = [(f"patch {i}", p.metadata) for i, p in enumerate(patches)]
    meta = {}
    if is_chain([p.metadata for p in patches]):
        meta = chain_keys(labels, allow_mismatch=allow_base_mismatch)
    return Patch._trusted(entries, meta)

