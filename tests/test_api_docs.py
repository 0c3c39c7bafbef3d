"""Every public symbol is documented; every error class is a ValueError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import spdelta
from spdelta import errors


def public_modules() -> list[str]:
    names = ["spdelta"]
    for info in pkgutil.walk_packages(spdelta.__path__, "spdelta."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def test_every_exported_symbol_has_a_docstring() -> None:
    undocumented = []
    for mod_name in public_modules():
        module = importlib.import_module(mod_name)
        assert module.__doc__, f"module {mod_name} has no docstring"
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                undocumented.append(f"{mod_name}.{name}")
    assert not undocumented, f"undocumented public symbols: {undocumented}"


def test_top_level_functions_have_examples() -> None:
    missing = [
        n
        for n in spdelta.__all__
        if inspect.isfunction(getattr(spdelta, n))
        and "Example" not in (inspect.getdoc(getattr(spdelta, n)) or "")
    ]
    assert not missing, f"public functions without an Example section: {missing}"


def test_all_is_sorted_and_complete() -> None:
    for mod_name in public_modules():
        module = importlib.import_module(mod_name)
        exported = getattr(module, "__all__", None)
        if exported is not None:
            assert list(exported) == sorted(exported), f"{mod_name}.__all__ is not sorted"
            assert all(hasattr(module, n) for n in exported), (
                f"{mod_name}.__all__ names a missing symbol"
            )


def test_error_classes_are_value_errors() -> None:
    classes = [getattr(errors, n) for n in errors.__all__ if inspect.isclass(getattr(errors, n))
               and not issubclass(getattr(errors, n), Warning)]
    assert classes and issubclass(errors.SpdeltaWarning, UserWarning)
    for cls in classes:
        assert issubclass(cls, errors.SpdeltaError) and issubclass(cls, ValueError), cls
    rules = sorted(int(c.rule[1:]) for c in classes if issubclass(c, errors.FormatError) and c.rule)
    assert rules == list(range(1, 11))
