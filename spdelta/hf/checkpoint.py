"""Streaming, shard-by-shard apply and extract on Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from spdelta._io import check_regular, claim, make_temp_dir, refuse_overlap, user_os_error
from spdelta._progress import tqdm
from spdelta._replace import refuse_patch
from spdelta.delta import SparseDelta
from spdelta.errors import (
    BaseMismatchError,
    ContainerError,
    KeyMismatchError,
    NotRegularFileError,
    OutputExistsError,
    ParameterError,
    ShapeError,
    SpdeltaError,
)
from spdelta.format.constants import KEY_FINGERPRINT
from spdelta.format.fingerprint import (
    check_fingerprint,
    combine_records,
    file_records,
    legacy_combine,
    legacy_file_sample,
)
from spdelta.functional import add_at
from spdelta.hf._names import resolve_names
from spdelta.hf.layout import CheckpointLayout
from spdelta.hf.model import (
    check_alpha,
    check_overflow,
    legacy_fingerprint,
    model_delta,
    model_prefixes,
    resolve_delta,
)

__all__ = [
    "CheckpointError",
    "apply_to_checkpoint",
    "checkpoint_fingerprint",
    "checkpoint_shards",
    "legacy_checkpoint_fingerprint",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(SpdeltaError):
    """A checkpoint directory is missing, unreadable or not safetensors."""


def checkpoint_shards(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Shard file name -> tensor names of the safetensors checkpoint in ``path``.

    Reads ``model.safetensors.index.json`` when present, else ``model.safetensors``.

    Raises:
        CheckpointError: No safetensors weights in ``path``, or an unreadable index.

    Example:
        >>> checkpoint_shards("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spdelta.hf.checkpoint.CheckpointError: '/nonexistent': ...
    """
    root = Path(path)
    index = root / INDEX_FILE
    for name in (INDEX_FILE, SINGLE_FILE):  # a FIFO here would hang the read below
        if (root / name).exists() and not (root / name).is_file():
            check_regular(root / name, f"a {name} file")
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards: dict[str, list[str]] = {}
            for name, shard in sorted(weight_map.items()):
                shards.setdefault(shard, []).append(name)
            for shard in shards:
                if (root / shard).exists():  # a missing shard fails later, naming itself
                    check_regular(root / shard, "a safetensors shard")
            return shards
        if (root / SINGLE_FILE).is_file():
            with safe_open(str(root / SINGLE_FILE), framework="pt") as f:
                return {SINGLE_FILE: sorted(f.keys())}
    except NotRegularFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{str(path)!r}: cannot read the checkpoint index ({exc}); "
            "is it a Hugging Face safetensors checkpoint?"
        ) from exc
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(
            f"{str(path)!r}: not a readable safetensors checkpoint ({exc})."
        ) from exc
    raise CheckpointError(
        f"{str(path)!r}: expected {SINGLE_FILE} or {INDEX_FILE}; found neither. "
        "Save the model with save_pretrained(safe_serialization=True)."
    )


def _meta_model(path: Path) -> nn.Module | None:
    """The model of ``path``'s config on the ``meta`` device (no weights), or ``None``.

    The config's own architecture class first (``T5ForConditionalGeneration`` has the
    ``lm_head`` alias that ``T5Model`` lacks), then a causal LM, then the base model.
    """
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(path))
        named = [getattr(transformers, a, None) for a in getattr(config, "architectures", None)
                 or []]
    except Exception:  # no or unknown config: names must then match the keys exactly
        return None
    builders = [*(c for c in named if c is not None), transformers.AutoModelForCausalLM.from_config,
                transformers.AutoModel.from_config]
    with torch.device("meta"):
        for build in builders:
            try:
                return build(config)  # type: ignore[no-any-return]
            except Exception:  # not this class for this config: try the next
                continue
    return None


def _tied_aliases(model: nn.Module | None, keys: set[str]) -> tuple[dict[str, str], list[str]]:
    """Tied aliases (mapped onto the names stored on disk) and prefixes of ``model``."""
    if model is None:
        return {}, []
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    aliases = {}
    for names in groups.values():
        stored = [n for n in names if n in keys]
        for n in names:
            if stored and n != stored[0]:
                aliases[n] = stored[0]
    return aliases, model_prefixes(model)


class _Disk(Mapping[str, Tensor]):
    """Checkpoint tensors by name, each read from its shard when asked for."""

    def __init__(self, root: Path, shards: dict[str, list[str]]) -> None:
        self.root, self.where = root, {k: s for s, ks in shards.items() for k in ks}

    def __getitem__(self, key: str) -> Tensor:
        with safe_open(str(self.root / self.where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _resolve_on_disk(root: Path, shards: dict[str, list[str]], delta: SparseDelta
                     ) -> tuple[SparseDelta, dict[str, str], Callable[[], str] | None]:
    """``delta`` in the layout the checkpoint stores, name -> key, and its legacy fingerprint.

    Names match the keys directly (prefixes and tied aliases resolved), or through the
    model's layout: a delta in the model's layout (fused experts) goes to a per-expert
    checkpoint, and one in checkpoint names to a fused checkpoint. The last item computes
    the legacy fingerprint of a delta whose layout had to change (else ``None``).
    """
    keys = {k for names in shards.values() for k in names}
    model = _meta_model(root)
    aliases, prefixes = _tied_aliases(model, keys)
    try:
        return delta, resolve_names(delta.keys(), keys, prefixes=prefixes, aliases=aliases), None
    except KeyMismatchError:
        if model is None:
            raise
    in_model = model_delta(model, delta)
    stored = in_model if set(in_model.keys()) <= keys else (  # the model's own layout, or
        CheckpointLayout(model).to_checkpoint(in_model))      # the checkpoint's
    mapping = resolve_names(stored.keys(), keys, prefixes=prefixes, aliases=aliases)
    return stored, mapping, partial(_legacy_in_layout, model, delta, _Disk(root, shards))


def _legacy_in_layout(model: nn.Module, delta: SparseDelta, disk: Mapping[str, Tensor]) -> str:
    """The legacy fingerprint of ``delta``'s base tensors, in its own layout, built from disk."""
    layout = CheckpointLayout(model)
    mapping = resolve_delta(model, delta.keys())[0]
    by_model = {t: n for n, t in mapping.items() if t in layout.model_shapes}
    by_ckpt = {t: n for n, t in mapping.items() if t not in layout.model_shapes}
    if set(by_model) <= set(disk):  # stored as the model: checkpoint tensors are converted
        got = {**{by_model[m]: disk[m] for m in by_model},
               **{by_ckpt[c]: t for c, t in layout.checkpoint_tensors(disk, by_ckpt).items()}}
    else:
        got = {**{by_ckpt[c]: disk[c] for c in by_ckpt},
               **{by_model[m]: t for m, t in layout.model_tensors(disk, by_model).items()}}
    return legacy_fingerprint(got)


@contextmanager
def _atomic_dir(out: Path, overwrite: bool,
                inputs: Mapping[str, str | os.PathLike[str]] | None = None) -> Iterator[Path]:
    """A temp dir beside ``out``, renamed to ``out`` on success and removed on failure.

    Everything that could refuse is checked before the work: ``out`` overlapping an
    input (role -> path), ``out`` being a file, ``out`` existing without ``overwrite``, another run
    writing it (:func:`spdelta._io.claim`).
    """
    refuse_overlap(out, dict(inputs or {}))
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{str(out)!r} is a file, and the output is a checkpoint "
                                "directory; remove it or choose another output.")
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{str(out)!r} exists; pass overwrite=True (--force) to replace it."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise user_os_error(out, e) from e
    with claim(out):
        tmp = Path(make_temp_dir(out))
        try:
            yield tmp
            if out.exists():
                old = Path(make_temp_dir(out, "old"))
                os.replace(out, old)  # onto an empty dir of our own: always allowed
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _patched(t: Tensor, key: str, name: str, delta: SparseDelta, alpha: float) -> Tensor:
    """``t`` plus ``alpha`` times the delta entry ``name``, summed in fp32 (fp64)."""
    e = delta[name]
    if tuple(t.shape) != e.shape:
        raise ShapeError(
            f"{name!r}: the delta is for shape {list(e.shape)} but the "
            f"checkpoint's {key!r} has {list(t.shape)}; use the right base."
        )
    out = add_at(t, e.indices, e.values, alpha)
    check_overflow(name, t.reshape(-1)[e.indices], out.reshape(-1)[e.indices], alpha)
    return out


def apply_to_checkpoint(
    base: str | os.PathLike[str],
    delta: SparseDelta,
    out: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    overwrite: bool = False,
    check_base: bool = True,
    progress: bool = False,
) -> None:
    """Write ``base + alpha * delta`` as a new checkpoint directory, one shard at a time.

    Each shard is read, patched and written before the next is opened, so memory is
    bounded by the largest shard plus the delta. Dtypes, shard layout and
    ``model.safetensors.index.json`` are kept; every other file (config, tokenizer,
    ...) is copied unchanged. The output appears atomically: it is built in a temp
    directory beside ``out`` and renamed into place.

    Args:
        base: Directory of a safetensors checkpoint (single file or sharded).
        delta: The sparse delta; names may omit or carry the model prefix, may
            name either tensor of a tied pair, and may be in the model's layout or
            the checkpoint's (fused or per-expert MoE weights; see
            :class:`spdelta.hf.layout.CheckpointLayout`): entries are mapped onto the
            tensors the directory stores.
        out: Output directory.
        alpha: Scale of the delta.
        overwrite: Replace ``out`` if it exists.
        check_base: Refuse when the delta's fingerprint does not match ``base``.
        progress: Show a tqdm progress bar over the shards.

    Raises:
        CheckpointError, KeyMismatchError, ShapeError, BaseMismatchError, OutputExistsError.
        ParameterError: ``alpha`` is not finite, or ``alpha * delta`` overflows a weight's
            dtype (checked before the shard is written).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp() + "/out"
        >>> save_file({"w": torch.zeros(2)}, src + "/model.safetensors")
        >>> d = SparseDelta({"w": ((2,), torch.tensor([1]), torch.ones(1))})
        >>> apply_to_checkpoint(src, d, dst)
        >>> from safetensors.torch import load_file
        >>> load_file(dst + "/model.safetensors")["w"].tolist()
        [0.0, 1.0]
    """
    refuse_patch(delta, "apply_to_checkpoint", "spdelta.patch.apply_patch")
    check_alpha(alpha)
    root, out_path = Path(base), Path(out)
    shards = checkpoint_shards(root)
    delta, mapping, legacy = _resolve_on_disk(root, shards, delta)
    by_key = {key: name for name, key in mapping.items()}
    if check_base:  # before any work: it reads a few KiB per tensor
        _check_fingerprint(root, delta, mapping, legacy)
    with _atomic_dir(out_path, overwrite, {"base": root}) as tmp:
        for shard, names in tqdm(shards.items(), desc="apply", unit="shard", disable=not progress):
            tensors = {}
            with safe_open(str(root / shard), framework="pt") as f:
                meta = f.metadata()
                for key in names:
                    t = f.get_tensor(key)
                    if key in by_key:
                        t = _patched(t, key, by_key[key], delta, alpha)
                    tensors[key] = t
            (tmp / shard).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp / shard), metadata=meta)
        _copy_other_files(root, tmp, set(shards))


def _check_fingerprint(root: Path, delta: SparseDelta, mapping: dict[str, str],
                       legacy: Callable[[], str] | None = None) -> None:
    expected = delta.metadata.get(KEY_FINGERPRINT)
    found = check_fingerprint(
        expected, current=lambda: checkpoint_fingerprint(root),
        legacy=legacy or (lambda: legacy_checkpoint_fingerprint(root, mapping)))
    if found is not None:
        raise BaseMismatchError(
            f"base model fingerprint: the delta was made for {expected}, the checkpoint is "
            f"{found}; use the right base, or pass check_base=False "
            "(--allow-base-mismatch)."
        )


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """The fingerprint of the safetensors checkpoint in directory ``path``.

    Reads each shard's header and the 1,024 sampled elements of each tensor (a few
    KiB per tensor), never a whole tensor.

    Raises:
        CheckpointError: ``path`` holds no readable safetensors checkpoint.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": torch.ones(3)}, d + "/model.safetensors")
        >>> checkpoint_fingerprint(d)[:6]
        'base1:'
    """
    root = Path(path)
    records: dict[str, bytes] = {}
    for shard, names in checkpoint_shards(root).items():
        try:
            records.update(file_records(root / shard, names))
        except (OSError, ContainerError, KeyError) as e:
            raise CheckpointError(f"{str(root / shard)!r}: cannot read the shard to fingerprint "
                                  f"it ({e}); is the checkpoint complete?") from e
    return combine_records(records)


def legacy_checkpoint_fingerprint(path: str | os.PathLike[str], mapping: Mapping[str, str]
                                  ) -> str:
    """The legacy ``sha256:`` fingerprint (before format 1.2) of a delta's tensors on disk.

    Args:
        path: The checkpoint directory.
        mapping: Delta name -> checkpoint key, for the delta's tensors.

    Raises:
        CheckpointError: A shard cannot be read.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": torch.ones(3)}, d + "/model.safetensors")
        >>> legacy_checkpoint_fingerprint(d, {"w": "w"})[:7]
        'sha256:'
    """
    root = Path(path)
    where = {k: s for s, ks in checkpoint_shards(root).items() for k in ks}
    samples = {}
    for name, key in mapping.items():
        try:
            samples[name] = legacy_file_sample(root / where[key], key, name)
        except (OSError, ContainerError, KeyError, ParameterError) as e:
            raise CheckpointError(f"{str(root)!r}: cannot read {key!r} to fingerprint it "
                                  f"({e}).") from e
    return legacy_combine(samples)


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> None:
    for item in src.iterdir():
        if item.name in skip:
            continue
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
