"""Training states on disk: safetensors plus JSON, nothing that runs code, at any world size.

One format (``spdelta.train_state/3``, ``spec/checkpoint.md``) for every training state:
a ``TrainState``, a ``SpielState``, and any optimizer state in them, stored generically
(a ``NamedTuple`` is its type name and its fields). The state's tensors are stored
whole, by their path in the state (``s::values::<name>``, ``s::opt_state::#1::mu::<name>``);
its structure is a JSON document in the file's metadata, under ``spdelta.state``:
``{"format": ..., "kind": "SpielState", "tree": T}`` where a tensor is
``{"__tensor__": key}``, a ``NamedTuple`` ``{"__state__": type, "fields": {...}}``, a
dict ``{"__dict__": {...}}``, a tuple ``{"__tuple__": [...]}``, a list
``{"__list__": [...]}``, and numbers, strings, booleans and ``null`` are themselves.
Reading parses JSON and raw little-endian numbers only; it never unpickles, and a type
is rebuilt only if it is a known state class (spdelta's, or one in the ``template``).
Sharded tensors (FSDP2 DTensors) are gathered one at a time while rank 0 writes, so
memory is bounded by the largest tensor; on load a template's DTensor takes its shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor
from torch.distributed.tensor import DTensor

from spdelta._io import atomic_write, claim, make_temp_dir
from spdelta._ranks import full_tensor, rank_and_world, shard_like
from spdelta.errors import SpdeltaError
from spdelta.format._container import encode_header
from spdelta.format.constants import SAFETENSORS_DTYPES
from spdelta.optim import AdamWState, SM3State
from spdelta.optim._base import is_state
from spdelta.train._loop import TrainState
from spdelta.train._spiel_core import SpielState

__all__ = ["FORMAT", "STATE_FILE", "load_checkpoint", "load_state", "save_checkpoint",
           "save_state"]

FORMAT = "spdelta.train_state/3"
#: The one file of a checkpoint directory (:func:`save_checkpoint`).
STATE_FILE = "state.safetensors"
_META_KEY = "spdelta.state"
_SEP = "::"  # never occurs in a state-dict name (spec §4), so keys are unambiguous
_KNOWN = (TrainState, SpielState, AdamWState, SM3State)


def _flatten(tree: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """Tensors go to ``out[path]``; the returned skeleton holds JSON-able placeholders."""
    if isinstance(tree, Tensor):
        out[prefix] = tree
        return {"__tensor__": prefix}
    if is_state(tree):
        return {"__state__": type(tree).__name__, "fields": {
            f: _flatten(getattr(tree, f), f"{prefix}{_SEP}{f}", out) for f in tree._fields}}
    if isinstance(tree, dict):
        return {"__dict__": {k: _flatten(v, f"{prefix}{_SEP}{k}", out) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        kind = "__tuple__" if isinstance(tree, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}{_SEP}#{i}", out) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise SpdeltaError(f"save: cannot store a {type(tree).__name__} at {prefix!r}.")


def _types_in(tree: Any, out: dict[str, type]) -> dict[str, type]:
    """The ``NamedTuple`` classes found in ``tree`` (a template state), by name."""
    if is_state(tree):
        out[type(tree).__name__] = type(tree)
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for v in tree:
            _types_in(v, out)
    return out


def _child(like: Any, key: Any) -> Any:
    """The template's node at ``key`` (a field, dict key or position), or ``None``."""
    if isinstance(key, str) and is_state(like):
        return getattr(like, key, None)
    if isinstance(key, str) and isinstance(like, dict):
        return like.get(key)
    if isinstance(key, int) and isinstance(like, (list, tuple)) and key < len(like):
        return like[key]
    return None


def _unflatten(skel: Any, read: Callable[[str, Any], Tensor], types: Mapping[str, type],
               like: Any = None) -> Any:
    """Rebuild a tree from its skeleton; ``like`` is the template's node at the same place."""
    if not isinstance(skel, dict):
        if skel is None or isinstance(skel, (bool, int, float, str)):
            return skel
        raise SpdeltaError(f"unexpected node in a training state: {str(skel)[:60]!r}.")
    if set(skel) == {"__tensor__"}:
        return read(skel["__tensor__"], like)
    if set(skel) == {"__state__", "fields"} and isinstance(skel["fields"], dict):
        cls = types.get(skel["__state__"])
        if cls is None:
            raise SpdeltaError(f"unknown state type {skel['__state__']!r} in a training state; "
                               "pass template= a state of the same optimizer (e.g. its init) so "
                               "its state classes are known.")
        return cls(**{f: _unflatten(v, read, types, _child(like, f))
                      for f, v in skel["fields"].items()})
    if set(skel) == {"__dict__"} and isinstance(skel["__dict__"], dict):
        return {k: _unflatten(v, read, types, _child(like, k)) for k, v in skel["__dict__"].items()}
    for kind, make in (("__tuple__", tuple), ("__list__", list)):
        if set(skel) == {kind} and isinstance(skel[kind], list):
            return make(_unflatten(v, read, types, _child(like, i))
                        for i, v in enumerate(skel[kind]))
    raise SpdeltaError(f"unexpected node in a training state: {str(skel)[:60]!r}.")


def _encode(state: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON document and the flat tensors of a training state."""
    if not isinstance(state, (TrainState, SpielState)):
        raise SpdeltaError(f"save: expected a TrainState or SpielState; found "
                           f"{type(state).__name__}.")
    tensors: dict[str, Tensor] = {}
    tree = _flatten(state, "s", tensors)
    return {"format": FORMAT, "kind": type(state).__name__, "tree": tree}, tensors


def _upgrade_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """A ``spdelta.train_state/2`` document in this format's terms (the keys stay as stored).

    Version 2 wrote the optimizer state as a dict with a ``"type"`` (``"AdamWState"``,
    ``"SM3State"`` or ``"tuple"`` with ``"items"``), AdamW's update count as ``count``
    and SM3's accumulators as lists.
    """
    def opt(node: Any) -> Any:
        if node is None:
            return None
        tree = dict(node["__dict__"])
        kind = tree.pop("type")
        if kind == "tuple":
            return {"__tuple__": [opt(x) for x in tree["items"]["__list__"]]}
        if kind == "AdamWState":
            tree["num_updates"] = tree.pop("count")
        if kind == "SM3State":
            tree["accumulators"] = {"__dict__": {n: {"__tuple__": a["__list__"]} for n, a in
                                                 tree["accumulators"]["__dict__"].items()}}
        return {"__state__": kind, "fields": tree}

    fields = dict(doc["tree"]["__dict__"])
    fields["opt_state"] = opt(fields["opt_state"])
    return {**doc, "format": FORMAT, "tree": {"__state__": doc["kind"], "fields": fields}}


def _write_file(path: str, doc: Mapping[str, Any], specs: list[tuple[str, torch.dtype, tuple]],
                fetch: Callable[[str], Tensor]) -> None:
    """Stream a state file: the header from ``specs``, then each whole tensor in order."""
    entries = [(k, SAFETENSORS_DTYPES[d], list(s), _nbytes(d, s)) for k, d, s in specs]
    meta = {_META_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))}
    with atomic_write(path) as f:
        f.write(encode_header(meta, entries))
        for key, dtype, shape in specs:
            t = fetch(key).detach().to("cpu").contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise SpdeltaError(f"save: {key!r} changed while saving.")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty(0, dtype=dtype).element_size()


def _save(state: Any, group: dist.ProcessGroup | None,
          place: Callable[[Callable[[str], None]], None]) -> None:
    """Every rank joins the gathers of sharded tensors; rank 0 writes (``place`` picks where)."""
    doc, flat = _encode(state)
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in sorted(flat.items())]
    rank, world = rank_and_world(group)
    if world > 1:
        dist.barrier(group)
    if rank == 0:
        place(lambda file: _write_file(file, doc, specs, lambda k: full_tensor(flat[k])))
    else:
        for key, _, _ in specs:  # the same collectives, in the same order, as rank 0's writes
            full_tensor(flat[key])
    if world > 1:
        dist.barrier(group)


def save_state(state: TrainState | SpielState, path: str | os.PathLike[str], *,
               group: dist.ProcessGroup | None = None) -> None:
    """Write a training state to the file ``path`` atomically (temp file, fsync, ``os.replace``).

    Every tensor is stored exactly (a resumed run is bit-identical to an uninterrupted
    one) and nothing in the file can run code when read. Under ``torch.distributed``
    every rank calls it: sharded DTensors are gathered one at a time while rank 0 writes.

    Args:
        state: A :class:`~spdelta.train.TrainState` or :class:`~spdelta.train.SpielState`
            whose optimizer state is ``None``, a tuple or ``NamedTuple`` states.
        path: Destination file; replaced if it exists.
        group: Process group; ``None`` is the default group (or none at all).

    Raises:
        SpdeltaError: ``state`` is another type or holds something that is not data.

    Example:
        >>> import os, tempfile, torch
        >>> s = SpielState({"w": torch.ones(1)}, {"w": torch.tensor([2])}, None, 3, {}, None)
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> save_state(s, path)
        >>> load_state(path).step
        3
    """
    _save(state, group, lambda write: write(os.fspath(path)))


def save_checkpoint(state: TrainState | SpielState, path: str | os.PathLike[str], *,
                    group: dist.ProcessGroup | None = None) -> None:
    """:func:`save_state` into a directory ``path`` (its :data:`STATE_FILE`), replaced atomically.

    The directory is written beside ``path`` and renamed into place by rank 0, so a
    crash leaves the previous checkpoint. ``path`` must be on a file system the
    loading ranks see. :func:`load_state` reads it back.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> save_checkpoint(TrainState({"w": torch.ones(2)}, None, 3), path)
        >>> load_checkpoint(path).values["w"].tolist()
        [1.0, 1.0]
    """
    folder = os.fspath(path)

    def into_folder(write: Callable[[str], None]) -> None:
        with claim(folder):  # also removes temp dirs a killed save left beside it
            tmp = make_temp_dir(folder)
            try:
                write(os.path.join(tmp, STATE_FILE))
                _publish(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    _save(state, group, into_folder)


def _publish(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` goes, once the new one is in place."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    old = make_temp_dir(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _state_file(path: str) -> str:
    if not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.join(path, STATE_FILE)
    if os.path.isfile(os.path.join(path, ".metadata")):
        raise SpdeltaError(
            f"{path!r}: a torch.distributed.checkpoint directory (an earlier spdelta format, "
            "or another tool); its .metadata is a pickle, which can run code when read, so "
            "it is not read. Delete it and start over.")
    raise SpdeltaError(f"{path!r}: not a spdelta training checkpoint (no {STATE_FILE}); "
                       "save one with spdelta.dist.save_checkpoint.")


def _open(path: str) -> tuple[dict[str, Any], Any]:
    """The file's JSON document (in this format's terms) and a safetensors reader."""
    try:
        f = safe_open(path, framework="pt")
        text = (f.metadata() or {}).get(_META_KEY)
    except Exception as e:  # OSError, or safetensors' own SafetensorError (header problems)
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        raise SpdeltaError(f"{path!r}: not a readable spdelta training state ({e}).") from e
    if text is None:
        raise SpdeltaError(f"{path!r}: a safetensors file, but not a spdelta training state "
                           f"(no {_META_KEY!r} metadata).")
    try:
        doc = json.loads(text)
        if doc.get("format") == "spdelta.train_state/2":
            doc = _upgrade_v2(doc)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise SpdeltaError(f"{path!r}: malformed training state document ({e!r}).") from e
    if doc.get("format") != FORMAT or doc.get("kind") not in ("TrainState", "SpielState"):
        raise SpdeltaError(f"{path!r}: not a spdelta training state this version reads: expected "
                           f"a TrainState or SpielState of format {FORMAT!r} (or version 2); "
                           f"found {doc.get('kind')!r} of format {doc.get('format')!r}.")
    return doc, f


def load_state(path: str | os.PathLike[str], *, template: Any = None) -> Any:
    """Read a state written by :func:`save_state` or :func:`save_checkpoint` (no code runs).

    Plain tensors come back whole (on CPU), whatever the world size that saved them.
    Where ``template`` holds a DTensor at the same place (e.g. FSDP-sharded values and
    optimizer state), the tensor is loaded into the template's layout, this rank's
    shard only. State classes are rebuilt by name: spdelta's own, and those in
    ``template`` (needed for an optimizer defined outside spdelta).

    Args:
        path: A state file, or a checkpoint directory holding one.
        template: Optional state of the same structure (e.g. the run's step-0 state).

    Returns:
        The :class:`~spdelta.train.TrainState` or :class:`~spdelta.train.SpielState`.

    Raises:
        SpdeltaError: ``path`` is not such a state (a ``torch.distributed.checkpoint``
            directory, whose metadata is a pickle, is refused without being read), or
            it names a state class that is not known.

    Example:
        >>> import os, tempfile, torch
        >>> s = SpielState({}, {}, None, 0, {}, torch.Generator().get_state())
        >>> path = os.path.join(tempfile.mkdtemp(), "state.safetensors")
        >>> save_state(s, path)
        >>> torch.equal(load_state(path).rng_state, s.rng_state)
        True
    """
    doc, reader = _open(_state_file(os.fspath(path)))
    types = _types_in(template, {c.__name__: c for c in _KNOWN})
    stored = set(reader.keys())

    def read(key: str, like: Any) -> Tensor:
        if key not in stored:
            raise KeyError(f"no tensor {key!r} in the file")
        t = reader.get_tensor(key)
        if isinstance(like, DTensor) and tuple(like.shape) == tuple(t.shape):
            t = shard_like(t.to(like.device, like.dtype), like)
        return t

    try:
        state = _unflatten(doc["tree"], read, types, template)
        if type(state).__name__ != doc["kind"]:
            raise TypeError(f"the tree holds a {type(state).__name__}, the document says "
                            f"{doc['kind']}")
    except (KeyError, TypeError, ValueError) as e:
        raise SpdeltaError(f"{os.fspath(path)!r}: malformed training state "
                           f"({type(e).__name__}: {e}).") from e
    return state


#: :func:`load_state` under its ``spdelta.dist`` name: it reads a checkpoint directory too.
load_checkpoint = load_state
