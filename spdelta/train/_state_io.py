"""Training states on disk as safetensors plus JSON: nothing in the file can run code.

A state (``TrainState`` or ``SpielState``: tensors in dicts, lists, ints, an optimizer
state) is stored as one safetensors file. Its tensors are stored by their path in the
state (``s::fields::values::<name>``); its structure is a JSON document in the file's
metadata, under ``spdelta.state``:
``{"format": "spdelta.train_state/2", "kind": "SpielState", "tree": <skeleton>}``,
where a tensor is ``{"__tensor__": "<key>"}``, a dict ``{"__dict__": {...}}``, a list
``{"__list__": [...]}`` and numbers, strings, booleans and ``null`` are themselves.
Reading parses JSON and raw little-endian numbers only (safetensors); it never
unpickles. The tensors are written one at a time (``fetch(key)`` may gather a sharded
tensor), so memory is bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from spdelta._io import atomic_write
from spdelta.errors import SpdeltaError
from spdelta.format._container import encode_header
from spdelta.format.constants import SAFETENSORS_DTYPES
from spdelta.optim.reset import state_from_tree, state_to_tree

__all__ = ["FORMAT", "decode_state", "encode_state", "read_state", "write_state"]

FORMAT = "spdelta.train_state/2"
META_KEY = "spdelta.state"
_SEP = "::"  # never occurs in a state-dict name (spec §4), so keys are unambiguous


def _flatten(tree: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """Tensors go to ``out[path]``; the returned skeleton holds JSON-able placeholders."""
    if isinstance(tree, Tensor):
        out[prefix] = tree
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": {k: _flatten(v, f"{prefix}{_SEP}{k}", out) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}{_SEP}#{i}", out) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise SpdeltaError(f"save: cannot store a {type(tree).__name__} at {prefix!r}.")


def _unflatten(skel: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(skel, dict) and set(skel) == {"__tensor__"}:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and set(skel) == {"__dict__"} and isinstance(skel["__dict__"], dict):
        return {k: _unflatten(v, tensors) for k, v in skel["__dict__"].items()}
    if isinstance(skel, dict) and set(skel) == {"__list__"} and isinstance(skel["__list__"], list):
        return [_unflatten(v, tensors) for v in skel["__list__"]]
    if skel is None or isinstance(skel, (bool, int, float, str)):
        return skel
    raise SpdeltaError(f"unexpected node in a training state: {str(skel)[:60]!r}.")


def encode_state(state: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON document and the flat tensors of a ``TrainState`` / ``SpielState``.

    Raises:
        SpdeltaError: ``state`` is another type or holds something that is not data.

    Example:
        >>> from spdelta.train import TrainState
        >>> doc, tensors = encode_state(TrainState({"w": torch.ones(2)}, None, 3))
        >>> doc["kind"], sorted(tensors)
        ('TrainState', ['s::values::w'])
    """
    kind = type(state).__name__
    if kind not in ("TrainState", "SpielState"):
        raise SpdeltaError(f"save: expected a TrainState or SpielState; found {kind}.")
    fields = state._asdict()
    fields["opt_state"] = state_to_tree(fields["opt_state"])
    tensors: dict[str, Tensor] = {}
    tree = _flatten(fields, "s", tensors)
    return {"format": FORMAT, "kind": kind, "tree": tree}, tensors


def decode_state(doc: Mapping[str, Any], tensors: Mapping[str, Tensor],
                 kinds: Mapping[str, type]) -> Any:
    """Rebuild the state of :func:`encode_state` (only the classes in ``kinds``).

    Raises:
        SpdeltaError: The document is not such a state, or names a missing tensor.
    """
    kind = doc.get("kind")
    if doc.get("format") != FORMAT or kind not in kinds:
        raise SpdeltaError(f"expected a {' or '.join(sorted(kinds))} of format {FORMAT!r}; "
                           f"found {doc.get('kind')!r} of format {doc.get('format')!r}.")
    try:
        fields = _unflatten(doc["tree"], tensors)
        fields["opt_state"] = state_from_tree(fields["opt_state"])
        return kinds[str(kind)](**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise SpdeltaError(f"malformed training state ({type(e).__name__}: {e}).") from e


def write_state(path: str | os.PathLike[str], doc: Mapping[str, Any],
                specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                fetch: Callable[[str], Tensor], *, write: bool = True) -> None:
    """Stream a state file: the header from ``specs``, then ``fetch(key)`` one at a time.

    Args:
        path: The file, written atomically.
        doc: The JSON document (``spdelta.state`` metadata).
        specs: ``(key, dtype, shape)`` of every tensor, in the order they are written.
        fetch: The whole tensor of a key (called once per key, in order, also when
            ``write`` is false: it may be a collective, e.g. a DTensor's ``full_tensor``).
        write: Write the file (false on ranks that only take part in the gathers).
    """
    entries = [(k, SAFETENSORS_DTYPES[d], list(s), _nbytes(d, s)) for k, d, s in specs]
    meta = {META_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))}
    if not write:
        for key, _, _ in specs:
            fetch(key)
        return
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


def read_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """Open a state file: its JSON document and a reader with ``keys()`` and ``get_tensor(k)``.

    Raises:
        SpdeltaError: Not a readable state file of this format.
    """
    name = os.fspath(path)
    try:
        f = safe_open(name, framework="pt")
        text = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # OSError, or safetensors' own SafetensorError (header problems)
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        raise SpdeltaError(f"{name!r}: not a readable spdelta training state ({e}).") from e
    if text is None:
        raise SpdeltaError(f"{name!r}: a safetensors file, but not a spdelta training state "
                           f"(no {META_KEY!r} metadata).")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SpdeltaError(f"{name!r}: malformed training state document ({e}).") from e
    if not isinstance(doc, dict):
        raise SpdeltaError(f"{name!r}: malformed training state document.")
    return doc, f
