"""Merge sparse deltas: a registry of methods (TIES, DARE, breadcrumbs, ...) and ``merge``.

Every method is a per-tensor kernel with the signature::

    kernel(indices, values, *, numel, weights, densities, generator=None, **params)
        -> (indices, values)

where ``indices``/``values`` hold one sorted 1-D int64 index tensor and one 1-D float
value tensor per input delta (empty for an input without that tensor), ``numel`` is the
number of elements of the dense tensor, ``weights``/``densities`` hold one float per
input, and ``generator`` is a ``torch.Generator`` (used by the random methods only).
:data:`MERGE_METHODS` maps each name to a :class:`MergeMethod` wrapping its kernel;
:func:`merge` runs one over whole deltas and :func:`merge_tensor` over one tensor (for
streaming tools). Sums run in fp32 (fp64 for fp64 inputs); each output tensor takes the
promoted dtype of the values of the inputs that have it (promotion is per tensor).

The output support of a tensor is the union of the inputs' surviving entries (after
trimming or dropping). Entries whose merged value is exactly 0 (cancellation, or a TIES
entry where no input agrees with the elected sign) are kept, so supports are
predictable; :func:`spdelta.ops.drop_zeros` removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from spdelta.delta import DeltaTensor, SparseDelta, numel_of
from spdelta.errors import ParameterError
from spdelta.ops._common import check_finite_result, check_shapes, per_input, tensor_seed
from spdelta.ops.merge_kernels import (
    breadcrumbs_tensor,
    dare_tensor,
    dare_ties_tensor,
    magnitude_tensor,
    task_arithmetic_tensor,
    ties_tensor,
)

__all__ = ["MERGE_METHODS", "MergeMethod", "merge", "merge_tensor"]

Pair = tuple[Tensor, Tensor]
MergeKernel = Callable[..., Pair]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: a per-tensor kernel and what it accepts.

    Attributes:
        name: Registry name, e.g. ``"ties"``.
        kernel: ``kernel(indices, values, *, numel, weights, densities, generator, **params)``.
        uses_density: Whether ``density`` means something for this method.
        random: Whether the method draws random numbers (then ``seed`` is required).
        params: Extra keyword parameters and their defaults, e.g. ``{"gamma": 0.01}``.
        reference: Paper link.
    """

    name: str
    kernel: MergeKernel
    uses_density: bool
    random: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""

    def __post_init__(self) -> None:
        # Registry entries are shared: keep their defaults read-only.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __call__(self, indices: Sequence[Tensor], values: Sequence[Tensor], **kwargs: Any) -> Pair:
        """Run the kernel on one tensor (no validation; see :func:`merge_tensor`)."""
        return self.kernel(indices, values, **kwargs)


_T = MergeMethod
#: Name -> :class:`MergeMethod`, read-only.
MERGE_METHODS: Mapping[str, MergeMethod] = MappingProxyType({
    "breadcrumbs": _T("breadcrumbs", breadcrumbs_tensor, True, False, {"gamma": 0.01},
                      "https://arxiv.org/abs/2312.06795"),
    "dare": _T("dare", dare_tensor, True, True, {}, "https://arxiv.org/abs/2311.03099"),
    "dare_ties": _T("dare_ties", dare_ties_tensor, True, True, {"normalize": True},
                    "https://arxiv.org/abs/2311.03099"),
    "magnitude": _T("magnitude", magnitude_tensor, True, False, {},
                    "https://arxiv.org/abs/1506.02626"),
    "task_arithmetic": _T("task_arithmetic", task_arithmetic_tensor, False, False, {},
                          "https://arxiv.org/abs/2212.04089"),
    "ties": _T("ties", ties_tensor, True, False, {"normalize": True},
               "https://arxiv.org/abs/2306.01708"),
})
del _T


class _Plan(NamedTuple):
    method: MergeMethod
    weights: list[float]
    densities: list[float]
    seed: int | None
    params: dict[str, Any]


def _resolve(method: str, n: int, weights: object, density: object, seed: object,
             params: Mapping[str, Any]) -> _Plan:
    """Validate every argument of a merge once; raise ``ParameterError`` naming the bad one."""
    spec = MERGE_METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise ParameterError(f"merge: unknown method {method!r}; choose one of "
                             f"{sorted(MERGE_METHODS)}.")
    where = f"merge(method={method!r})"
    if n < 1:
        raise ParameterError(f"{where}: pass at least one delta.")
    ws = [1.0] * n if weights is None else per_input(where, "weights", weights, n, fraction=False)
    if not spec.uses_density and density is not None:
        raise ParameterError(f"{where}: this method takes no density; found density={density!r}. "
                             "Drop it, or use method='magnitude' to prune first.")
    ds = [1.0] * n if density is None else per_input(where, "density", density, n, fraction=True)
    unknown = set(params) - set(spec.params)
    if unknown:
        raise ParameterError(f"{where}: unknown parameters {sorted(unknown)}; this method "
                             f"accepts {sorted(spec.params) or 'none'}.")
    extra = {**spec.params, **params}
    if "gamma" in extra:
        extra["gamma"] = per_input(where, "gamma", extra["gamma"], n, fraction=True)
    if "normalize" in extra:
        if not isinstance(extra["normalize"], bool):
            raise ParameterError(
                f"{where}: normalize must be a bool; found {extra['normalize']!r}.")
        if extra["normalize"] and any(w <= 0 for w in ws):
            raise ParameterError(f"{where}: with normalize=True every weight must be > 0; "
                                 f"found {ws}. Negate a delta instead of weighting it "
                                 "negatively, or pass normalize=False.")
    if spec.random and seed is None:
        raise ParameterError(f"{where}: this method draws random masks; pass seed=<int> "
                             "(e.g. seed=0) for a reproducible result.")
    if seed is not None:
        tensor_seed(seed, "")  # type: ignore[arg-type]  # validates the type
    return _Plan(spec, ws, ds, seed, extra)  # type: ignore[arg-type]


def _run(plan: _Plan, name: str, indices: Sequence[Tensor], values: Sequence[Tensor],
         numel: int) -> Pair:
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=values[0].device)
        generator.manual_seed(tensor_seed(plan.seed, name))  # type: ignore[arg-type]
    i, v = plan.method(list(indices), list(values), numel=numel, weights=plan.weights,
                       densities=plan.densities, generator=generator, **plan.params)
    check_finite_result(name, v, f"merge weights {list(plan.weights)}",
                        "use smaller weights (--weights)")
    return i, v


def merge_tensor(name: str, indices: Sequence[Tensor], values: Sequence[Tensor], *, numel: int,
                 method: str, weights: float | Sequence[float] | None = None,
                 density: float | Sequence[float] | None = None, seed: int | None = None,
                 **params: Any) -> Pair:
    """Merge one tensor: the per-tensor form of :func:`merge`, for streaming tools.

    The random methods seed a fresh generator with ``tensor_seed(seed, name)``, so a
    tensor merges the same way alone as inside :func:`merge`.

    Args:
        name: The tensor's state-dict name (seeds the random methods).
        indices: Per input, 1-D int64 sorted flat indices (empty when absent).
        values: Per input, matching 1-D float values.
        numel: Elements of the dense tensor.
        method: A name in :data:`MERGE_METHODS`.
        weights: As in :func:`merge`.
        density: As in :func:`merge`.
        seed: As in :func:`merge`.
        **params: As in :func:`merge`.

    Returns:
        ``(indices, values)`` of the merged tensor.

    Raises:
        ParameterError: An argument is invalid (see :func:`merge`).

    Example:
        >>> i, v = merge_tensor("w", [torch.tensor([1])], [torch.tensor([2.0])], numel=3,
        ...                     method="task_arithmetic", weights=[0.5])
        >>> i.tolist(), v.tolist()
        ([1], [1.0])
    """
    if len(indices) != len(values):
        raise ParameterError(f"merge_tensor({name!r}): {len(indices)} index tensors but "
                             f"{len(values)} value tensors; pass one of each per input.")
    plan = _resolve(method, len(values), weights, density, seed, params)
    return _run(plan, name, indices, values, numel)


def merge(deltas: Sequence[SparseDelta], *, method: str,
          weights: float | Sequence[float] | None = None,
          density: float | Sequence[float] | None = None, seed: int | None = None,
          **params: Any) -> SparseDelta:
    """Merge several deltas of one base model with a method of :data:`MERGE_METHODS`.

    Methods (formulas in each kernel's docstring; ``numel`` is the dense tensor size):

    - ``task_arithmetic``: ``sum_i w_i delta_i``; takes no density.
    - ``magnitude``: keep the top ``density * numel`` entries of each input by ``|value|``,
      then task arithmetic.
    - ``ties``: magnitude trim, sign election by total mass, disjoint (weighted) mean;
      ``normalize=True``.
    - ``dare``: drop each stored entry with probability ``1 - density``, rescale survivors
      by ``1 / density``, then task arithmetic; needs ``seed``.
    - ``dare_ties``: DARE drop and rescale, then TIES election and disjoint mean; needs
      ``seed``; ``normalize=True``.
    - ``breadcrumbs``: drop the top ``gamma * numel`` (default ``gamma=0.01``) and the
      smallest entries so that ``density * numel`` remain, then task arithmetic.

    A tensor absent from an input counts as zeros there. The output support is the union
    of the surviving entries; merged values of exactly 0 are kept. The result has no
    metadata.

    Args:
        deltas: One or more deltas; a shared name must have one shape.
        method: The method name.
        weights: One weight per delta (or one for all); default 1 each.
        density: Fraction in ``[0, 1]`` per delta (or one for all): of ``numel`` for
            ``magnitude``/``ties``/``breadcrumbs``, the keep probability for DARE;
            default 1 (nothing removed).
        seed: Int seed of the random methods; each tensor gets a generator seeded with
            :func:`~spdelta.ops.tensor_seed` ``(seed, name)``.
        **params: Method parameters: ``gamma`` (breadcrumbs), ``normalize`` (ties, dare_ties).

    Returns:
        The merged ``SparseDelta``.

    Raises:
        ParameterError: Unknown method or parameter, wrong number of weights/densities,
            a value out of range, a density for ``task_arithmetic``, non-positive weights
            with ``normalize=True``, or no ``seed`` for a random method.
        ShapeError: Two deltas give one tensor name different shapes.

    Example:
        >>> a = SparseDelta({"w": ((3,), torch.tensor([0, 1]), torch.tensor([1.0, -2.0]))})
        >>> b = SparseDelta({"w": ((3,), torch.tensor([1, 2]), torch.tensor([1.0, 4.0]))})
        >>> merge([a, b], method="ties").to_dense("w").tolist()
        [1.0, -2.0, 4.0]

    References:
        Ilharco et al. 2023, https://arxiv.org/abs/2212.04089; Yadav et al. 2023,
        https://arxiv.org/abs/2306.01708; Yu et al. 2024, https://arxiv.org/abs/2311.03099;
        Davari & Belilovsky 2024, https://arxiv.org/abs/2312.06795
    """
    if isinstance(deltas, SparseDelta):
        raise ParameterError("merge: pass a list of deltas, e.g. merge([a, b], method=...).")
    deltas = list(deltas)
    plan = _resolve(method, len(deltas), weights, density, seed, params)
    shapes = check_shapes("merge", deltas)
    entries = {}
    for name, shape in shapes.items():
        present = [d[name].values for d in deltas if name in d]
        empty_v = torch.zeros(0, dtype=present[0].dtype, device=present[0].device)
        empty_i = torch.zeros(0, dtype=torch.long, device=present[0].device)
        idx = [d[name].indices if name in d else empty_i for d in deltas]
        val = [d[name].values if name in d else empty_v for d in deltas]
        i, v = _run(plan, name, idx, val, numel_of(shape))
        entries[name] = DeltaTensor(shape, i, v)
    return SparseDelta._trusted(entries, {})
