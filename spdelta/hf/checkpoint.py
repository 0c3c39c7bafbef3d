"""Streaming, shard-by-shard apply and extract on Hugging Face safetensors checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from spdelta._replace import refuse_patch
from spdelta.delta import SparseDelta
from spdelta.errors import (
    BaseMismatchError,
    ContainerError,
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
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards: dict[str, list[str]] = {}
            for name, shard in sorted(weight_map.items()):
                shards.setdefault(shard, []).append(name)
            return shards
        if (root / SINGLE_FILE).is_file():
            with safe_open(str(root / SINGLE_FILE), framework="pt") as f:
                return {SINGLE_FILE: sorted(f.keys())}
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


def _tied_aliases(path: Path, keys: set[str]) -> tuple[dict[str, str], list[str]]:
    """Tied aliases (mapped onto the names stored on disk) and prefixes, from the config."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except Exception:  # no or unknown config: names must then match the keys exactly
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
    prefix = getattr(model, "base_model_prefix", "")
    return aliases, [prefix + "."] if prefix else []


@contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temp dir beside ``out``, renamed to ``out`` on success and removed on failure."""
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{str(out)!r} exists; pass overwrite=True (--force) to replace it."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
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
    return add_at(t, e.indices, e.values, alpha)


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
        delta: The sparse delta; names may omit or carry the model prefix, and may
            name either tensor of a tied pair.
        out: Output directory.
        alpha: Scale of the delta.
        overwrite: Replace ``out`` if it exists.
        check_base: Refuse when the delta's fingerprint does not match ``base``.
        progress: Show a tqdm progress bar over the shards.

    Raises:
        CheckpointError, KeyMismatchError, ShapeError, BaseMismatchError, OutputExistsError.

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
    root, out_path = Path(base), Path(out)
    shards = checkpoint_shards(root)
    keys = {k for names in shards.values() for k in names}
    aliases, prefixes = _tied_aliases(root, keys)
    mapping = resolve_names(delta.keys(), keys, prefixes=prefixes, aliases=aliases)
    by_key = {key: name for name, key in mapping.items()}
    if check_base:  # before any work: it reads a few KiB per tensor
        _check_fingerprint(root, delta, mapping)
    with _atomic_dir(out_path, overwrite) as tmp:
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


def _check_fingerprint(root: Path, delta: SparseDelta, mapping: dict[str, str]) -> None:
    expected = delta.metadata.get(KEY_FINGERPRINT)
    found = check_fingerprint(expected, current=lambda: checkpoint_fingerprint(root),
                              legacy=lambda: legacy_checkpoint_fingerprint(root, mapping))
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
