"""peft SHiRA adapters: import one as a ``SparseDelta``, export a ``SparseDelta`` as one.

A SHiRA adapter (peft ``tuners/shira``) is a directory holding ``adapter_config.json``
(``peft_type: "SHIRA"``, ``r``, ``target_modules``, ...) and ``adapter_model.safetensors``
with, for each adapted ``nn.Linear`` ``<module>`` of the wrapped model:

- ``base_model.model.<module>.shira_indices``: ``(2, N)`` int32 ``(row, col)`` positions
  in the ``(out_features, in_features)`` weight (float32 when saved on Windows);
- ``base_model.model.<module>.shira_weight``: ``(N,)`` values, added at those positions.

peft fixes ``N = r * (in_features + out_features)`` for every adapted layer, with one ``r``
per adapter and ``N <= in_features * out_features``; it regenerates a random mask of that
size on load, then replaces it by the stored indices. The adapter scale is 1 on load, so
the adapted weight is exactly ``W + delta``. SHiRA adapts ``nn.Linear`` weights only: a
delta on biases, norms or embeddings cannot be exported.

References:
    Bhardwaj et al., "Sparse High Rank Adapters", 2024. https://arxiv.org/abs/2406.13175
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from spdelta._version import __version__
from spdelta.delta import DeltaTensor, SparseDelta
from spdelta.errors import ParameterError, ShapeError, SpdeltaError, format_names
from spdelta.format import file_sha256
from spdelta.format.constants import KEY_BASE_MODEL, KEY_PROVENANCE, KEY_REVISION
from spdelta.hf._names import resolve_names
from spdelta.hf.checkpoint import _atomic_dir, _meta_model, _tied_aliases, checkpoint_shards
from spdelta.hf.model import model_prefixes, tied_aliases

__all__ = ["AdapterError", "export_shira", "import_shira"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Key prefix of a ``PeftModel`` without a task type: ``PeftModel.base_model.model``.
PEFT_PREFIX = "base_model.model."
_INDICES, _WEIGHT, _SUFFIX = ".shira_indices", ".shira_weight", ".weight"
#: safetensors metadata key where :func:`export_shira` keeps the delta's metadata (JSON).
META_KEY = "spdelta_metadata"

#: Where :func:`import_shira` takes the dense shapes from: a model, a checkpoint
#: directory, or name -> tensor or shape.
Base = nn.Module | str | os.PathLike[str] | Mapping[str, Tensor | Sequence[int]]


class AdapterError(SpdeltaError):
    """A peft adapter directory is missing, unreadable, or not a SHiRA adapter spdelta reads."""


# ----------------------------------------------------------------------------- import
def _base_shapes(base: Base) -> tuple[dict[str, tuple[int, ...]], list[str], dict[str, str]]:
    """Name -> shape of the base tensors, the name prefixes and the tied aliases."""
    if isinstance(base, nn.Module):
        shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
        return shapes, model_prefixes(base), tied_aliases(base)
    if isinstance(base, (str, os.PathLike)):
        root = Path(base)
        shapes = {}
        for shard, names in checkpoint_shards(root).items():
            with safe_open(str(root / shard), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in names})
        aliases, prefixes = _tied_aliases(_meta_model(root), set(shapes))
        return shapes, prefixes, aliases
    shapes = {
        n: tuple(v.shape) if isinstance(v, Tensor) else tuple(int(s) for s in v)
        for n, v in base.items()
    }
    return shapes, [], {}


def _read_config(root: Path) -> dict[str, Any]:
    path = root / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(
            f"{str(path)!r}: cannot read the adapter config ({exc}); pass the directory "
            "written by PeftModel.save_pretrained."
        ) from exc
    if not isinstance(config, dict) or config.get("peft_type") != "SHIRA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(
            f"{str(path)!r}: expected peft_type 'SHIRA'; found {found!r}. "
            "Only SHiRA adapters hold sparse deltas."
        )
    if config.get("fan_in_fan_out"):
        raise AdapterError(
            f"{str(path)!r}: fan_in_fan_out=true (transposed Conv1D weights) is not supported; "
            "SHiRA adapts nn.Linear layers only."
        )
    return config


def _read_weights(root: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = root / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(
            f"{str(path)!r}: not found; save the adapter with safe_serialization=True "
            "(pickled adapter_model.bin files are not read)."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise AdapterError(f"{str(path)!r}: not a readable safetensors file ({exc}).") from exc


def _pairs(tensors: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Module name -> ``(indices, weight)``; every key must be one of a pair."""
    modules = {
        k[len(PEFT_PREFIX) : -len(s)]
        for k in tensors
        for s in (_INDICES, _WEIGHT)
        if k.startswith(PEFT_PREFIX) and k.endswith(s)
    }
    expected = {PEFT_PREFIX + m + s for m in modules for s in (_INDICES, _WEIGHT)}
    if set(tensors) != expected:
        raise AdapterError(
            f"{ADAPTER_WEIGHTS}: expected pairs '{PEFT_PREFIX}<module>{_INDICES}' and "
            f"'...{_WEIGHT}'; unexpected [{format_names(set(tensors) - expected)}], missing "
            f"[{format_names(expected - set(tensors))}]. modules_to_save, task-specific "
            "heads and multi-adapter files are not supported."
        )
    return {
        m: (tensors[PEFT_PREFIX + m + _INDICES], tensors[PEFT_PREFIX + m + _WEIGHT])
        for m in sorted(modules)
    }


def _flat_entry(name: str, indices: Tensor, weight: Tensor, shape: tuple[int, ...]) -> DeltaTensor:
    """``(2, N)`` ``(row, col)`` indices and ``(N,)`` values -> sorted flat entry of ``shape``."""
    if len(shape) != 2:
        raise ShapeError(
            f"{name!r}: SHiRA adapts 2-D nn.Linear weights; the base tensor has shape "
            f"{list(shape)}. Use the base model the adapter was trained on."
        )
    rows, cols = shape
    ok = indices.dim() == 2 and indices.shape[0] == 2 and weight.dim() == 1
    ok = ok and indices.shape[1] == weight.numel() and weight.dtype.is_floating_point
    if ok and indices.dtype.is_floating_point:  # peft stores float32 indices on Windows
        ok = bool((indices == indices.round()).all())
    idx = indices.long() if ok else indices
    if ok and idx.numel():
        ok = bool((idx >= 0).all() and (idx[0] < rows).all() and (idx[1] < cols).all())
    if not ok:
        raise AdapterError(
            f"{name!r}: expected (2, N) integer (row, col) indices inside {list(shape)} and "
            f"(N,) float values; found indices {list(indices.shape)} {indices.dtype}, values "
            f"{list(weight.shape)} {weight.dtype}. The adapter does not fit this base model."
        )
    flat = idx[0] * cols + idx[1]
    flat, order = torch.sort(flat, stable=True)
    if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
        raise AdapterError(
            f"{name!r}: {int((flat[1:] == flat[:-1]).sum())} (row, col) positions repeat; "
            "a SHiRA mask names each position once."
        )
    return DeltaTensor(shape, flat, weight[order])


def _import_metadata(
    root: Path, config: Mapping[str, Any], file_meta: Mapping[str, str]
) -> dict[str, str]:
    """The metadata :func:`export_shira` kept in the file, else base model and provenance."""
    if META_KEY in file_meta:
        try:
            meta = json.loads(file_meta[META_KEY])
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise AdapterError(
                f"{ADAPTER_WEIGHTS}: metadata {META_KEY!r} must be a JSON object of strings; "
                "re-export the adapter or remove the key."
            )
        return meta
    meta = {}
    for key, field in ((KEY_BASE_MODEL, "base_model_name_or_path"), (KEY_REVISION, "revision")):
        if isinstance(config.get(field), str):
            meta[key] = config[field]
    record = {
        "inputs": [{"file": ADAPTER_WEIGHTS, "sha256": file_sha256(root / ADAPTER_WEIGHTS)}],
        "operation": "import_shira",
        "parameters": {"r": config.get("r")},
        "spdelta_version": __version__,
    }
    meta[KEY_PROVENANCE] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return meta


def import_shira(adapter_dir: str | os.PathLike[str], *, base: Base) -> SparseDelta:
    """Read a peft SHiRA adapter directory as a ``SparseDelta`` on its Linear weights.

    Each adapted module ``<module>`` becomes the entry ``<module>.weight``: its
    ``(row, col)`` indices are flattened row-major against the base weight's
    ``(out_features, in_features)`` shape (the adapter file does not store shapes,
    hence ``base``) and sorted, with the values permuted alike and kept in their
    stored dtype. Every stored entry is kept, zeros included, so the delta's support
    is the adapter's mask. ``apply_to_model(base, delta)`` then equals the peft model.

    Metadata: an adapter written by :func:`export_shira` gives back the delta's
    metadata exactly; otherwise ``spdelta.base_model`` (and ``.revision``) come from the
    config's ``base_model_name_or_path`` (``revision``), plus a provenance record.

    Args:
        adapter_dir: Directory written by ``PeftModel.save_pretrained`` (or
            :func:`export_shira`) with ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        base: The base model (``nn.Module``), its checkpoint directory, or a mapping
            full parameter name -> tensor or shape (e.g. ``model.state_dict()``); only
            shapes are read. For a model or a directory, its names may omit or carry
            the ``base_model_prefix`` (``model.``).

    Returns:
        A ``SparseDelta`` with one entry per adapted Linear weight.

    Raises:
        AdapterError: Missing or unreadable files, not ``peft_type`` SHIRA, extra
            tensors (``modules_to_save``), or indices that do not fit the base.
        KeyMismatchError: An adapted module has no weight in ``base``.
        ShapeError: The base tensor of an adapted module is not 2-D.

    Example:
        >>> from spdelta.hf import apply_to_model
        >>> delta = import_shira("shira-adapter", base=model)  # doctest: +SKIP
        >>> apply_to_model(model, delta)  # doctest: +SKIP
    """
    root = Path(adapter_dir)
    config = _read_config(root)
    tensors, file_meta = _read_weights(root)
    pairs = _pairs(tensors)
    shapes, prefixes, aliases = _base_shapes(base)
    names = [m + _SUFFIX for m in pairs]
    mapping = resolve_names(names, shapes, prefixes=prefixes, aliases=aliases)
    entries = {
        m + _SUFFIX: _flat_entry(m + _SUFFIX, i, w, shapes[mapping[m + _SUFFIX]])
        for m, (i, w) in pairs.items()
    }
    return SparseDelta(entries, metadata=_import_metadata(root, config, file_meta))


# ----------------------------------------------------------------------------- export
def _linear_modules(delta: SparseDelta, model: nn.Module | None) -> dict[str, str]:
    """Delta name -> the name of the ``nn.Linear`` module it adapts (checked against ``model``)."""
    bad = [n for n, e in delta.items() if len(e.shape) != 2 or not n.endswith(_SUFFIX)]
    if bad:
        raise ParameterError(
            f"SHiRA adapts nn.Linear weights only (2-D '<module>.weight'); {len(bad)} "
            f"tensors are not: [{format_names(bad)}]. Drop them from the delta before export."
        )
    if model is None:
        return {n: n[: -len(_SUFFIX)] for n in delta}
    mapping = resolve_names(
        delta.keys(),
        dict(model.named_parameters()),
        prefixes=model_prefixes(model),
        aliases=tied_aliases(model),
    )
    tied = set(tied_aliases(model).values())
    params = dict(model.named_parameters())
    problems = []
    for name, target in mapping.items():
        module = target[: -len(_SUFFIX)]
        if target in tied:
            problems.append(f"{name!r} is tied to another weight (SHiRA would patch one copy)")
        elif not target.endswith(_SUFFIX) or not isinstance(model.get_submodule(module), nn.Linear):
            problems.append(f"{name!r} is not the weight of an nn.Linear")
        elif tuple(params[target].shape) != delta[name].shape:
            problems.append(
                f"{name!r} has shape {list(delta[name].shape)}, the model "
                f"{list(params[target].shape)}"
            )
    if problems:
        raise ParameterError(
            f"{len(problems)} delta tensors cannot be a SHiRA adapter of this model: "
            + "; ".join(problems[:10])
            + ". Drop them from the delta before export."
        )
    return {n: t[: -len(_SUFFIX)] for n, t in mapping.items()}


def _rank(delta: SparseDelta, r: int | None, pad: bool) -> int:
    """The one ``r`` with ``nnz == r * (m + n)`` (``<=`` with ``pad``) for every tensor."""
    sizes = {n: sum(e.shape) for n, e in delta.items()}
    if r is None:
        need = {n: math.ceil(delta[n].nnz / s) if s else 0 for n, s in sizes.items()}
        r = max([1, *need.values()])
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ParameterError(f"export_shira: r must be an int >= 1; found {r!r}.")
    bad = [
        n for n, s in sizes.items() if delta[n].nnz > r * s or (delta[n].nnz < r * s and not pad)
    ]
    if bad:
        detail = "; ".join(f"{n!r}: nnz {delta[n].nnz}, r*(m+n) {r * sizes[n]}" for n in bad[:10])
        raise ParameterError(
            f"SHiRA stores exactly r*(m+n) entries per layer with one r (here {r}); "
            f"{len(bad)} tensors do not fit: {detail}. Pass pad=True to fill with explicit "
            "zeros, or a larger r."
        )
    full = [n for n, s in sizes.items() if r * s > math.prod(delta[n].shape)]
    if full:
        raise ParameterError(
            f"SHiRA needs r*(m+n) <= m*n; r={r} is too large for [{format_names(full)}]. "
            "Export the tensors that need a larger r as a separate adapter."
        )
    return r


def _padded(e: DeltaTensor, count: int) -> DeltaTensor:
    """``e`` plus ``count`` explicit zeros at the lowest free positions (deterministic)."""
    if count == 0:
        return e
    free = torch.ones(math.prod(e.shape), dtype=torch.bool)
    free[e.indices.cpu()] = False
    extra = torch.nonzero(free).reshape(-1)[:count].to(e.indices.device)
    idx, order = torch.sort(torch.cat([e.indices, extra]))
    zeros = torch.zeros(count, dtype=e.values.dtype, device=e.values.device)
    return DeltaTensor(e.shape, idx, torch.cat([e.values, zeros])[order])


def _shira_config(
    r: int, modules: Sequence[str], base_model: str | None, revision: str | None
) -> dict[str, Any]:
    """The ``adapter_config.json`` of peft's ``ShiraConfig`` (peft fills ``peft_version``)."""
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "mask_type": "random",
        "modules_to_save": None,
        "peft_type": "SHIRA",
        "r": r,
        "random_seed": None,
        "revision": revision,
        "target_modules": sorted(modules),
        "task_type": None,
    }


def export_shira(
    delta: SparseDelta,
    out_dir: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    r: int | None = None,
    pad: bool = False,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``delta`` as a peft SHiRA adapter directory that ``PeftModel.from_pretrained`` loads.

    Each entry ``<module>.weight`` of shape ``(out_features, in_features)`` becomes
    ``base_model.model.<module>.shira_indices`` (``(2, nnz)`` int32 ``(row, col)``)
    and ``.shira_weight`` (the values, in their dtype); ``target_modules`` lists the
    modules by full name. peft then computes exactly ``W + delta`` for each one. The
    delta's metadata is kept as JSON under the safetensors metadata key
    ``spdelta_metadata`` (peft ignores it), so :func:`import_shira` gives it back.
    The directory appears atomically.

    Limits of the SHiRA format, refused with ``ParameterError``: only 2-D
    ``nn.Linear`` weights; every layer holds exactly ``r * (m + n)`` entries for one
    ``r`` (``pad=True`` adds explicit zeros at the lowest free positions, which
    change nothing but come back from :func:`import_shira`); ``r * (m + n) <= m * n``.

    Args:
        delta: The sparse delta; names are the full parameter names of the model peft
            will wrap (e.g. ``model.layers.0.self_attn.q_proj.weight``), unless ``model``
            is given.
        out_dir: Output directory.
        model: The base model: names are resolved against it (prefix, tied weights) and
            each must be an untied ``nn.Linear`` weight of the delta's shape.
        r: SHiRA ``r``; default the smallest that fits (``pad``) or the one implied.
        pad: Fill each layer up to ``r * (m + n)`` entries with explicit zeros.
        base_model_name_or_path: Written to the config; default ``spdelta.base_model``.
        revision: Written to the config; default ``spdelta.base_model.revision``.
        overwrite: Replace ``out_dir`` if it exists.

    Raises:
        ParameterError: A tensor SHiRA cannot hold, or no ``r`` fits every tensor.
        KeyMismatchError: With ``model``, a delta name matches no parameter.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.

    Example:
        >>> export_shira(delta, "shira-adapter", model=model, pad=True)  # doctest: +SKIP
        >>> peft_model = PeftModel.from_pretrained(model, "shira-adapter")  # doctest: +SKIP
    """
    if len(delta) == 0:
        raise ParameterError("export_shira: the delta is empty; a SHiRA adapter needs a layer.")
    modules = _linear_modules(delta, model)
    r = _rank(delta, r, pad)
    tensors = {}
    for name, e in delta.items():
        e = _padded(e, r * sum(e.shape) - e.nnz)
        cols = e.shape[1]
        rows_cols = torch.stack([e.indices // cols, e.indices % cols]).to("cpu", torch.int32)
        key = PEFT_PREFIX + modules[name]
        tensors[key + _INDICES] = rows_cols.contiguous()
        tensors[key + _WEIGHT] = e.values.detach().to("cpu").clone().contiguous()
    meta = delta.metadata
    config = _shira_config(
        r,
        list(modules.values()),
        base_model_name_or_path or meta.get(KEY_BASE_MODEL),
        revision or meta.get(KEY_REVISION),
    )
    with _atomic_dir(Path(out_dir), overwrite) as tmp:
        file_meta = {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=file_meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
