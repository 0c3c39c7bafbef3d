"""The base fingerprint (spec §5.1): one value per base, on disk and in memory; legacy files."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from spdelta import SparseDelta
from spdelta.cli import main
from spdelta.errors import BaseMismatchError, SpdeltaWarning
from spdelta.format import load_delta, read_header, save_delta
from spdelta.format.fingerprint import (
    file_records,
    fingerprint_tensors,
    sample_positions,
    tensor_record,
)
from spdelta.hf import (
    apply_to_checkpoint,
    apply_to_model,
    checkpoint_fingerprint,
    checkpoint_tensors,
    extract_delta,
    fingerprint,
)
from tests.conftest import make_tiny_llama

KEY = "spdelta.base_model.fingerprint"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(1, 2048))
def test_sample_positions_are_the_exact_integer_rule(numel: int, k: int) -> None:
    pos = sample_positions(numel, k)
    m = min(k, numel)
    assert len(pos) == m
    if m >= 2:
        assert pos == [int(Fraction(i * (numel - 1), m - 1)) for i in range(m)]
        assert pos[0] == 0 and pos[-1] == numel - 1
        assert all(a < b for a, b in zip(pos, pos[1:], strict=False))
    elif m == 1:
        assert pos == [0]


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.uint8, torch.int8, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2]


@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (3, 1001), (70_000,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_disk_records_equal_memory_records(tmp_path: Path, dtype: torch.dtype,
                                           shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 50).to(dtype)
    save_file({"a.w": t, "b": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    got = file_records(tmp_path / "m.safetensors")
    assert got["a.w"] == tensor_record("a.w", t)
    head, data = got["a.w"].split(b"\n", 1)
    assert json.loads(head)["samples"] == min(1024, t.numel())
    assert len(data) == min(1024, t.numel()) * t.element_size()


def _tied_sharded(tmp_path: Path, dtype: torch.dtype) -> tuple[nn.Module, Path]:
    model = make_tiny_llama(tie=True, dtype=dtype)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_model_and_its_checkpoint_have_one_fingerprint(tmp_path: Path, tie: bool,
                                                       dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(tie=tie, dtype=dtype)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    fp = fingerprint(tmp_path / "ckpt")
    assert fp.startswith("base1:") and len(fp) == len("base1:") + 32
    assert fingerprint(model) == fp
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=dtype)
    assert fingerprint(reloaded) == fp
    names = set(checkpoint_tensors(model))
    assert ("lm_head.weight" in names) == (not tie)
    other = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", dtype=torch.float64)  # another dtype is another base
    assert fingerprint(other) != fp


def test_fingerprint_covers_every_tensor_name_dtype_and_shape() -> None:
    base = {"a": torch.arange(3000.0), "b": torch.zeros(4)}
    fp = fingerprint_tensors(base)
    changed = dict(base, b=torch.tensor([0.0, 0.0, 1e-30, 0.0]))  # a tensor no delta targets
    assert fingerprint_tensors(changed) != fp
    assert fingerprint_tensors(dict(base, b=torch.zeros(4, dtype=torch.float64))) != fp
    assert fingerprint_tensors(dict(base, b=torch.zeros(2, 2))) != fp
    assert fingerprint_tensors({"a": base["a"], "c": base["b"]}) != fp
    assert fingerprint_tensors(dict(base, extra=torch.zeros(0))) != fp
    moved = dict(base, a=base["a"].clone().index_put_((torch.tensor([1]),), torch.tensor(9.0)))
    assert fingerprint_tensors(moved) == fp  # position 1 is not sampled: 3000 > 1024


def _legacy(params: dict[str, torch.Tensor], names: list[str]) -> str:
    """The rule of spdelta before format 1.2, verbatim (float32 linspace over the targets)."""
    h = hashlib.sha256()
    for n in sorted(names):
        flat = params[n].detach().reshape(-1)
        pos = torch.linspace(0, max(flat.numel() - 1, 0), min(1024, flat.numel())).long()
        h.update(f"{n}:{list(params[n].shape)}:".encode()
                 + flat[pos].to("cpu", torch.float32).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _delta(params: dict[str, torch.Tensor], names: list[str]) -> SparseDelta:
    return SparseDelta({n: (tuple(params[n].shape), torch.tensor([0, 5]), torch.ones(2))
                        for n in names})


def test_old_deltas_still_verify(tmp_path: Path) -> None:
    model, ckpt = _tied_sharded(tmp_path, torch.float32)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    old = _delta(params, names).with_metadata({KEY: _legacy(params, names)})
    apply_to_checkpoint(ckpt, old, tmp_path / "out")
    wrong = old.with_metadata({KEY: _legacy(params, names[:1])})
    with pytest.raises(BaseMismatchError, match="sha256:"):
        apply_to_checkpoint(ckpt, wrong, tmp_path / "out2")
    apply_to_model(model, old)
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        apply_to_model(model, old)  # the model has changed since


def test_unknown_fingerprint_rule_warns_and_is_not_checked(tmp_path: Path) -> None:
    model, ckpt = _tied_sharded(tmp_path, torch.float32)
    params = dict(model.named_parameters())
    future = _delta(params, ["model.norm.weight"]).with_metadata({KEY: "blake3:00ff"})
    with pytest.warns(SpdeltaWarning, match="blake3:00ff.*not checked"):
        apply_to_checkpoint(ckpt, future, tmp_path / "out")


def test_a_mismatch_is_found_before_any_output_is_written(tmp_path: Path) -> None:
    _, ckpt = _tied_sharded(tmp_path, torch.float32)
    other = fingerprint({"x": torch.ones(1)})
    delta = SparseDelta({"model.norm.weight": ((32,), torch.tensor([0]), torch.ones(1))})
    with pytest.raises(BaseMismatchError, match=other):
        apply_to_checkpoint(ckpt, delta.with_metadata({KEY: other}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def base_and_tuned(tmp_path: Path) -> tuple[Path, Path]:
    model = make_tiny_llama(dtype=torch.float32)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    model.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def test_deltas_with_different_targets_share_the_fingerprint_and_merge(
    base_and_tuned: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, tuned = base_and_tuned
    mlp = extract_delta(base, tuned, density=0.05, targets=r"mlp\.")
    attn = extract_delta(base, tuned, density=0.05, targets=r"self_attn\.")
    assert set(mlp.keys()).isdisjoint(attn.keys())
    assert mlp.metadata[KEY] == attn.metadata[KEY] == checkpoint_fingerprint(base)
    save_delta(mlp, tmp_path / "mlp.st")
    save_delta(attn, tmp_path / "attn.st")
    assert main(["merge", str(tmp_path / "mlp.st"), str(tmp_path / "attn.st"),
                 "-o", str(tmp_path / "both.st")]) == 0, capsys.readouterr().err
    merged = load_delta(tmp_path / "both.st")
    assert merged.metadata[KEY] == checkpoint_fingerprint(base)
    assert main(["apply", "--base", str(base), "--delta", str(tmp_path / "both.st"),
                 "-o", str(tmp_path / "applied")]) == 0


def _stamped(tmp_path: Path, name: str, fp: str | None) -> Path:
    d = SparseDelta({"w": ((8,), torch.tensor([1, 4]), torch.tensor([0.5, -1.0]))})
    save_delta(d, tmp_path / name, metadata={KEY: fp} if fp else None)
    return tmp_path / name


def test_merging_with_an_unfingerprinted_delta_keeps_the_fingerprint_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fp = fingerprint({"w": torch.zeros(8)})
    a, b = _stamped(tmp_path, "a.st", fp), _stamped(tmp_path, "b.st", None)
    capsys.readouterr()
    assert main(["compose", str(a), str(b), "-o", str(tmp_path / "out.st")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("spdelta compose: warning: ") and "b.st" in err and fp in err, err
    assert err.count("\n") == 1, err
    assert load_delta(tmp_path / "out.st").metadata[KEY] == fp


def test_allow_base_mismatch_records_what_was_overridden(tmp_path: Path) -> None:
    fa, fb = fingerprint({"w": torch.zeros(8)}), fingerprint({"w": torch.ones(8)})
    a, b = _stamped(tmp_path, "a.st", fa), _stamped(tmp_path, "b.st", fb)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o.st")]) == 1
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "o.st"),
                 "--allow-base-mismatch"]) == 0
    meta, _ = read_header(tmp_path / "o.st")
    assert KEY not in meta and meta["spdelta.format_version"] == "1.2"
    record = json.loads(meta["spdelta.base_model.mismatch"])
    assert record == {KEY: {"a.st": fa, "b.st": fb}}
    # The record travels on through later merges.
    c = _stamped(tmp_path, "c.st", fa)
    assert main(["compose", str(tmp_path / "o.st"), str(c), "-o", str(tmp_path / "p.st")]) == 0
    meta, _ = read_header(tmp_path / "p.st")
    assert meta[KEY] == fa and json.loads(meta["spdelta.base_model.mismatch"]) == record
