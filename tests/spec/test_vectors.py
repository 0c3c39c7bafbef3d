"""The committed test vectors of spec/format.md §10 decode (or fail) exactly as described."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open

from spdelta import errors
from spdelta.format import (
    load_delta,
    load_patch,
    load_quantized,
    read_header,
    save_delta,
    validate_file,
)
from spdelta.format.constants import (
    ENCODINGS,
    KEY_TENSORS,
    KEY_VERSION,
    MINOR,
    TORCH_DTYPES,
    VALUE_ENCODINGS,
)
from spdelta.ops import unpack_int4
from spdelta.patch import ReplaceTensor, bit_view

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "spec" / "vectors"
VALID = sorted(p.stem for p in (VECTORS / "valid").glob("*.safetensors"))
INVALID = sorted(p.stem for p in (VECTORS / "invalid").glob("*.safetensors"))
RULES = [f"V{i}" for i in range(1, 11)]


def _gen_vectors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_vectors", ROOT / "tools" / "gen_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_vectors", module)
    spec.loader.exec_module(module)
    return module


def _expected(kind: str, case: str) -> dict:
    return json.loads((VECTORS / kind / f"{case}.json").read_text("utf-8"))


def _loaded_metadata(meta: dict[str, str], newer: bool) -> dict[str, str]:
    """What load_delta returns: no structural keys, and no unknown reserved keys if newer."""
    known = {
        "spdelta.base_model",
        "spdelta.base_model.revision",
        "spdelta.base_model.fingerprint",
        "spdelta.result.fingerprint",
        "spdelta.producer",
        "spdelta.provenance",
        "spdelta.training",
    }
    out = {k: v for k, v in meta.items() if k not in (KEY_VERSION, KEY_TENSORS)}
    if newer:
        out = {
            k: v
            for k, v in out.items()
            if not k.startswith("spdelta.") or k.startswith("spdelta.ext.") or k in known
        }
    return out


def _replaced(case: str) -> bool:
    tensors = _expected("valid", case)["tensors"].values()
    return any(t.get("value_encoding") == "replace" for t in tensors)


def _unsigned(values: torch.Tensor) -> list[int]:
    """Each value's bits as an unsigned integer (the ``bits`` of a replacement vector)."""
    b = bit_view(values).long()
    return (b & (2 ** (8 * values.element_size()) - 1) if values.element_size() < 8 else b).tolist()


@pytest.mark.parametrize("case", [c for c in VALID if _replaced(c)])
def test_replacement_vector_decodes_bit_for_bit(case: str) -> None:
    path = VECTORS / "valid" / f"{case}.safetensors"
    exp = _expected("valid", case)
    assert validate_file(path) == []
    patch = load_patch(path)
    assert patch.keys() == sorted(exp["tensors"])
    for name, t in exp["tensors"].items():
        e = patch[name]
        assert e.shape == tuple(t["shape"]) and e.indices.tolist() == t["indices"]
        assert e.values.dtype == TORCH_DTYPES[t["value_dtype"]]
        if t.get("value_encoding") == "replace":
            assert isinstance(e, ReplaceTensor)
            bits = _unsigned(e.values)
            assert [b % 2**64 for b in bits] == t["bits"]
        else:
            assert e.values.double().tolist() == t["values"]
    assert patch.metadata == _loaded_metadata(exp["metadata"], False)
    with pytest.raises(errors.ParameterError, match="load_patch"):
        load_delta(path)


@pytest.mark.parametrize("case", [c for c in VALID if not _replaced(c)])
def test_valid_vector_decodes(case: str) -> None:
    path = VECTORS / "valid" / f"{case}.safetensors"
    exp = _expected("valid", case)
    assert validate_file(path) == []
    delta = load_delta(path)
    assert delta.keys() == sorted(exp["tensors"])
    for name, t in exp["tensors"].items():
        e = delta[name]
        assert e.shape == tuple(t["shape"]) and e.indices.dtype == torch.int64
        assert e.indices.tolist() == t["indices"]
        quantized = t.get("value_encoding", "raw") != "raw"
        want = torch.float32 if quantized else TORCH_DTYPES[t["value_dtype"]]
        assert e.values.dtype == want
        assert e.values.double().tolist() == t["values"]
        if quantized:
            q = load_quantized(path)[name]
            codes = q.codes if q.bits == 8 else unpack_int4(q.codes, q.nnz)
            assert codes.tolist() == t["codes"] and q.scales.tolist() == t["scales"]
            assert q.block_size == t["block_size"] and q.indices.tolist() == t["indices"]
    version = exp["metadata"][KEY_VERSION]
    newer = int(version.split(".")[1]) > MINOR
    assert delta.metadata == _loaded_metadata(exp["metadata"], newer)
    meta, infos = read_header(path)
    assert meta == exp["metadata"]
    assert {n: i.index_encoding for n, i in infos.items()} == {
        n: t["index_encoding"] for n, t in exp["tensors"].items()
    }


@pytest.mark.parametrize("case", VALID)
def test_valid_vector_reads_with_safetensors(case: str) -> None:
    path = VECTORS / "valid" / f"{case}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == _expected("valid", case)["metadata"]
        names = set(f.keys())
    tensors = _expected("valid", case)["tensors"]
    assert names == {f"{n}::{p}" for n in tensors for p in ("idx", "val")} | {
        f"{n}::scale" for n, t in tensors.items() if t.get("value_encoding") in ("int8", "int4")
    }


def _one_encoding(case: str) -> str | None:
    """The single index encoding a canonical vector uses, else None."""
    exp = _expected("valid", case)
    encodings = {t["index_encoding"] for t in exp["tensors"].values()} or {"gap8"}
    return encodings.pop() if exp["canonical"] and len(encodings) == 1 else None


@pytest.mark.parametrize("case", [c for c in VALID if _one_encoding(c)])
def test_canonical_vector_equals_save_delta_output(case: str, tmp_path: Path) -> None:
    src = VECTORS / "valid" / f"{case}.safetensors"
    quantized = any(
        t.get("value_encoding") in ("int8", "int4")
        for t in _expected("valid", case)["tensors"].values()
    )
    delta = load_quantized(src) if quantized else load_patch(src)
    out = tmp_path / "out.safetensors"
    save_delta(
        delta,
        out,
        index_encoding=str(_one_encoding(case)),
        metadata={"spdelta.producer": delta.metadata["spdelta.producer"]},
    )
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("case", INVALID)
def test_invalid_vector_raises_its_rule(case: str) -> None:
    path = VECTORS / "invalid" / f"{case}.safetensors"
    exp = _expected("invalid", case)
    cls = getattr(errors, exp["error"])
    with pytest.raises(cls, match=f"spec §7 {exp['rule']}\\b") as info:
        load_delta(path)
    assert type(info.value) is cls and info.value.rule == exp["rule"]
    problems = validate_file(path)
    assert problems and (problems[0].rule, problems[0].error) == (exp["rule"], exp["error"])


def test_every_rule_has_an_invalid_vector() -> None:
    covered = {_expected("invalid", c)["rule"] for c in INVALID}
    assert covered == set(RULES)
    assert sum(_expected("invalid", c)["rule"] == "V1" for c in INVALID) >= 4
    quantized = {
        _expected("invalid", c)["rule"]
        for c in INVALID
        if "scale" in c or "int" in c or "block" in c or "code" in c
    }
    assert quantized >= {"V4", "V5", "V6", "V7", "V10"}  # format 1.1 details have vectors
    replace = {_expected("invalid", c)["rule"] for c in INVALID if "replace" in c or "result" in c}
    assert replace >= {"V4", "V5", "V6", "V7"}  # format 1.3 details have vectors


def test_vectors_are_tiny() -> None:
    total = sum(p.stat().st_size for p in VECTORS.rglob("*") if p.is_file())
    assert total < 100_000


def test_gen_vectors_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert _gen_vectors().main(["--check", "--out", str(VECTORS)]) == 0


def test_gen_vectors_check_detects_a_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = _gen_vectors()
    gen.main(["--out", str(tmp_path)])
    victim = tmp_path / "valid" / "scalar.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    (tmp_path / "invalid" / "extra.json").write_text("{}")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "valid/scalar.safetensors" in err and "invalid/extra.json" in err


def test_schema_matches_constants() -> None:
    schema = json.loads((ROOT / "spec" / "schema.json").read_text("utf-8"))
    entry = schema["$defs"]["tensor_entry"]["properties"]
    assert tuple(entry["index_encoding"]["enum"]) == ENCODINGS
    assert tuple(entry["value_encoding"]["enum"]) == VALUE_ENCODINGS
    assert "block_size" in entry
    assert set(schema["properties"]) >= {KEY_VERSION, KEY_TENSORS, "spdelta.result.fingerprint"}
    assert f"format 1.{MINOR}" in schema["title"]


def test_older_versions_still_read() -> None:
    """Files labelled 1.0, 1.1 and 1.2 are among the vectors and read with this reader."""
    versions = {_expected("valid", c)["metadata"][KEY_VERSION] for c in VALID}
    assert versions >= {"1.0", "1.1", "1.2", "1.3"}
