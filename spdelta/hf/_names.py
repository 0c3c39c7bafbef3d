"""Map delta tensor names onto model / checkpoint names: prefixes and tied aliases."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from spdelta.errors import KeyMismatchError, format_names

__all__ = ["candidates", "resolve_names"]


def candidates(name: str, prefixes: Iterable[str]) -> list[str]:
    """``name``, and ``name`` with each prefix added or (when present) removed.

    Example:
        >>> candidates("layers.0.w", ["model."])
        ['layers.0.w', 'model.layers.0.w']
    """
    out = [name]
    for prefix in prefixes:
        out.append(prefix + name)
        if name.startswith(prefix):
            out.append(name[len(prefix) :])
    return out


def resolve_names(
    names: Iterable[str],
    targets: Collection[str],
    *,
    prefixes: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
    hint: str = "Use the base model the delta was made for.",
) -> dict[str, str]:
    """Map each delta name to the one target name it addresses.

    A name matches itself, itself with a prefix added (``layers.0...`` ->
    ``model.layers.0...``) or removed, and a tied alias (``lm_head.weight`` ->
    ``model.embed_tokens.weight``) through ``aliases``.

    Args:
        names: Tensor names of the delta.
        targets: Names of the tensors that exist (model parameters, checkpoint keys).
        prefixes: Prefixes to try, e.g. ``("model.",)`` (HF ``base_model_prefix`` + ".").
        aliases: Alias name -> canonical target name, for tied weights.
        hint: The last sentence of the error message (what the names should be).

    Returns:
        Delta name -> target name.

    Raises:
        KeyMismatchError: A name matches nothing or more than one target, or two
            delta names land on the same (tied) target.

    Example:
        >>> resolve_names(["layers.0.w", "lm_head.weight"], ["model.layers.0.w", "model.emb"],
        ...               prefixes=["model."], aliases={"lm_head.weight": "model.emb"})
        {'layers.0.w': 'model.layers.0.w', 'lm_head.weight': 'model.emb'}
    """
    aliases = aliases or {}
    prefixes = list(prefixes)
    out: dict[str, str] = {}
    unmatched: list[str] = []
    ambiguous: list[str] = []
    for name in names:
        found = {aliases.get(c, c) for c in candidates(name, prefixes)}
        found = {c for c in found if c in targets}
        if len(found) == 1:
            out[name] = found.pop()
        else:
            (ambiguous if found else unmatched).append(name)
    if unmatched or ambiguous:
        raise KeyMismatchError(
            f"delta tensors do not match the model: {len(unmatched)} unmatched "
            f"[{format_names(unmatched)}], {len(ambiguous)} ambiguous [{format_names(ambiguous)}]. "
            + hint
        )
    seen: dict[str, str] = {}
    for name, target in out.items():
        if target in seen:
            raise KeyMismatchError(
                f"delta tensors {seen[target]!r} and {name!r} both address {target!r} "
                "(tied or prefixed names); a delta must name each tensor once (spec §6). "
                "Compose them into one entry."
            )
        seen[target] = name
    return out
