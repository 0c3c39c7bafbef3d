"""Resolve which weights to fine-tune: a regex, a list of suffixes, or ``"all-linear"``.

A target is any floating weight of a module: a 2-D ``*.weight`` (a linear layer, GPT-2's
``Conv1D``, an embedding, a router), a norm's 1-D weight when named, or a fused 3-D
parameter of a mixture-of-experts block (transformers 5 stores Mixtral's and Qwen-MoE's
routed experts as ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from spdelta.errors import KeyMismatchError, SpdeltaError, format_names

__all__ = ["ALL_LINEAR", "TargetSpec", "left_out", "resolve_targets"]

#: The target spec meaning "every linear weight (experts included) except the output layer".
ALL_LINEAR = "all-linear"

#: A regex over module names, a sequence of module-name suffixes, or ``"all-linear"``.
TargetSpec = str | Sequence[str]

_OUTPUT_NAMES = ("lm_head",)
# Dict form only (no module types): name parts of embedding tables inside numbered blocks.
_EMBEDDING_PARTS = ("embed", "wte", "wpe", "relative_attention_bias")
_ROUTER_NAMES = ("gate", "router")


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 style ``Conv1D`` is a linear layer with a transposed weight; match it by name so
    # that resolving targets never imports transformers.
    cls = type(module)
    return isinstance(module, nn.Linear) or (
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"))


def _is_weight(name: str, t: Tensor) -> bool:
    """A weight (not a bias): ``*.weight``, or a 2-D+ floating parameter without "bias"."""
    last = name.rsplit(".", 1)[-1]
    return (last == "weight" or (t.dim() >= 2 and "bias" not in last)) and t.is_floating_point()


def _module_of(name: str) -> str:
    """The module of a weight: ``a.b.weight`` -> ``a.b``, ``a.experts.w`` -> ``a.experts``."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _keys(name: str) -> tuple[str, ...]:
    """Names a target spec matches for weight ``name``: its module's; its own if not ``weight``."""
    if name == "weight" or name.endswith(".weight"):
        return (name[: -len(".weight")] if name != "weight" else "",)
    return (name, _module_of(name))


def _is_expert(name: str, t: Tensor) -> bool:
    """A fused expert tensor: a 3-D weight of a module named ``*experts``."""
    return t.dim() == 3 and _module_of(name).rsplit(".", 1)[-1].endswith("experts")


def _is_router(name: str, names: set[str]) -> bool:
    """A 2-D weight of a ``gate``/``router``/``*_gate`` module beside an ``experts`` module."""
    module = _module_of(name)
    parent, _, last = module.rpartition(".")
    if not (last in _ROUTER_NAMES or last.endswith("_gate")):
        return False
    prefix = f"{parent}.experts." if parent else "experts."
    return any(n.startswith(prefix) for n in names)


def _weights(model_or_params: nn.Module | Mapping[str, Tensor]) -> dict[str, str]:
    """Every weight name (tied aliases included) -> its canonical name."""
    if not isinstance(model_or_params, nn.Module):
        return {n: n for n, t in model_or_params.items() if _is_weight(n, t)}
    canonical = {id(p): n for n, p in model_or_params.named_parameters()}
    return {n: canonical[id(p)] for n, p in model_or_params.named_parameters(remove_duplicate=False)
            if _is_weight(n, p)}


def _classify(model_or_params: nn.Module | Mapping[str, Tensor]) -> dict[str, str]:
    """Canonical weight name -> its kind (see :func:`left_out`)."""
    tensors: dict[str, Tensor]
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        tensors = dict(model.named_parameters())
        get_out = getattr(model, "get_output_embeddings", None)
        out_emb = get_out() if callable(get_out) else None
        output = {id(getattr(out_emb, "weight", None))} if isinstance(out_emb, nn.Module) else set()
        owners = {n: m for mod, m in model.named_modules() for n, _ in m.named_parameters(
            prefix=mod, recurse=False)}
    else:
        tensors, output, owners = dict(model_or_params), set(), {}
    names = set(tensors)
    kinds = {}
    for name, t in tensors.items():
        if _is_weight(name, t):
            kinds[name] = _kind(name, t, owners.get(name), id(t) in output, names)
    return kinds


def _kind(name: str, t: Tensor, owner: nn.Module | None, is_output: bool, names: set[str]) -> str:
    module = _module_of(name)
    if _is_expert(name, t):
        return "expert"
    if t.dim() != 2:
        return "norm" if t.dim() == 1 else "other"
    if isinstance(owner, nn.Embedding) or (owner is None and any(
            p in module for p in _EMBEDDING_PARTS)):
        return "embedding"
    if is_output or module.rsplit(".", 1)[-1] in _OUTPUT_NAMES:
        return "output"
    if _is_router(name, names):
        return "router"
    if owner is not None:
        return "linear" if _is_linear(owner) else "other"
    return "linear" if any(part.isdigit() for part in name.split(".")) else "other"


def left_out(model_or_params: nn.Module | Mapping[str, Tensor],
             selected: Sequence[str]) -> dict[str, list[str]]:
    """The weights that ``selected`` leaves out, by kind (what ``all-linear`` skips, say).

    Kinds: ``embedding``, ``output`` (the output layer), ``norm`` (1-D weights),
    ``router`` (a mixture-of-experts router or gate), ``linear``, ``expert`` and
    ``other``; kinds with nothing left out are omitted.

    Args:
        model_or_params: The model, or a flat dict name -> tensor.
        selected: Weight names, e.g. from :func:`resolve_targets`.

    Returns:
        Kind -> sorted weight names (canonical names: tied weights once).

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2))
        >>> left_out(m, resolve_targets(m, "all-linear"))
        {'embedding': ['0.weight']}
    """
    chosen = set(selected)
    out: dict[str, list[str]] = {}
    for name, kind in sorted(_classify(model_or_params).items()):
        if name not in chosen:
            out.setdefault(kind, []).append(name)
    return out


def resolve_targets(
    model_or_params: nn.Module | Mapping[str, Tensor], targets: TargetSpec
) -> list[str]:
    """Return the sorted weight names selected by ``targets``.

    Three forms are accepted:

    * ``"all-linear"``: the weight of every ``nn.Linear`` (and Hugging Face ``Conv1D``)
      module and every fused 3-D expert tensor (``...experts.gate_up_proj``), except the
      output layer (``model.get_output_embeddings()`` or a module named ``lm_head``) and
      mixture-of-experts routers (a ``gate``/``router``/``*_gate`` module beside an
      ``experts`` module). Embeddings and norms are not linear layers, so they are never
      included; :func:`left_out` lists what was skipped. Given a plain parameter dict
      (no module types), it means every 2-D ``*.weight`` whose name has a numbered
      component (a block of a ``ModuleList``), except embedding tables
      (``embed``/``wte``/``wpe``/``relative_attention_bias`` in the name), heads and
      routers, plus the 3-D expert tensors: on Hugging Face models the same names.
    * any other ``str``: a regular expression that must ``re.fullmatch`` a module name
      (the weight name without ``.weight``) or, for a fused expert tensor, its own name
      or its module's: ``r".*\\.(q|v)_proj"``, ``"lm_head"``, ``r".*experts"``,
      ``r".*\\.mlp\\.gate"`` (a router).
    * a sequence of ``str``: module-name suffixes; a module matches when its name
      equals a suffix or ends with ``"." + suffix``, e.g. ``["q_proj", "v_proj"]``,
      ``["experts"]``, ``["gate_up_proj"]``; full weight names
      (``"model.layers.0.mlp.up_proj.weight"``) match the same way.

    Only weights are returned (never biases). Tied weights appear once, under the name
    ``named_parameters()`` gives them, and either name selects them: ``"lm_head"`` on a
    model whose head is tied to the embeddings selects the shared embedding.

    Args:
        model_or_params: The model, or a flat dict name -> tensor (e.g. a state dict).
        targets: The target spec, as above.

    Returns:
        The selected weight names, sorted.

    Raises:
        KeyMismatchError: Nothing matches; the message lists some module names.
        SpdeltaError: ``targets`` is an invalid regex or an empty sequence.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> resolve_targets(mlp, "all-linear")
        ['0.weight', '2.weight']
        >>> resolve_targets(mlp, ["2"])
        ['2.weight']
    """
    weights = _weights(model_or_params)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        kinds = _classify(model_or_params)
        found = [n for n, kind in kinds.items() if kind in ("linear", "expert")]
        how = "'all-linear' (linear layers and experts other than the output layer)"
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise SpdeltaError(f"targets {targets!r}: not a valid regular expression ({err}); "
                               "pass a valid regex, a list of suffixes, or 'all-linear'.") from err
        found = [c for w, c in weights.items() if any(pattern.fullmatch(k) for k in _keys(w))]
        how = f"regex {targets!r} (re.fullmatch over module names)"
    else:
        suffixes = list(targets)
        if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
            raise SpdeltaError(f"targets: expected a non-empty list of module-name suffixes; "
                               f"found {targets!r}.")
        found = [c for w, c in weights.items()
                 if any(x == s or x.endswith("." + s) for s in suffixes for x in (*_keys(w), w))]
        how = f"suffixes {suffixes!r}"
    if not found:
        raise KeyMismatchError(
            f"targets: {how} matched no weight; module names with a weight are "
            f"[{format_names({k for w in weights for k in _keys(w)[:1]})}]. Use one of these "
            "names, a suffix of them, or 'all-linear'.")
    return sorted(set(found))
