"""spdelta.files: the file tools return a typed FileReport that says what was done."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from spdelta import SparseDelta
from spdelta.files import FileReport, compose_files, convert_file, merge_files, quantize_file
from spdelta.format import load_delta, save_delta
from spdelta.ops import dequantize, merge, quantization_error, quantize


def _two(tmp_path: Path) -> tuple[Path, Path, SparseDelta, SparseDelta]:
    gen = torch.Generator().manual_seed(0)
    a = SparseDelta.from_dense({"w": torch.randn(8, 8, generator=gen)}, density=0.25)
    b = SparseDelta.from_dense({"w": torch.randn(8, 8, generator=gen)}, density=0.5)
    pa, pb = tmp_path / "a.st", tmp_path / "b.st"
    save_delta(a, pa)
    save_delta(b, pb)
    return pa, pb, a, b


def test_merge_report_is_typed_and_matches_the_file(tmp_path: Path) -> None:
    pa, pb, a, b = _two(tmp_path)
    dry = merge_files([pa, pb], tmp_path / "m.st", weights=[0.5, 0.5], dry_run=True)
    assert isinstance(dry, FileReport) and not dry.written and dry.nnz is None
    assert not (tmp_path / "m.st").exists()
    assert dry.input_bytes == pa.stat().st_size + pb.stat().st_size
    report = merge_files([pa, pb], tmp_path / "m.st", weights=[0.5, 0.5])
    want = merge([a, b], method="task_arithmetic", weights=[0.5, 0.5])
    assert report.written and report.tensors == 1 and report.nnz == want.nnz
    assert report.output_bytes == (tmp_path / "m.st").stat().st_size
    assert "max_abs_error" not in report.to_dict() and report.to_dict()["nnz"] == want.nnz
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.nnz = 0  # type: ignore[misc]


def test_quantize_and_convert_reports(tmp_path: Path) -> None:
    pa, pb, a, _ = _two(tmp_path)
    q = quantize_file(pa, tmp_path / "q.st", bits=4)
    err = quantization_error(a, quantize(a, bits=4))
    assert q.operation == "quantize" and q.max_abs_error == pytest.approx(err["max_abs_error"])
    assert q.relative_error == pytest.approx(err["relative_error"])
    assert load_delta(tmp_path / "q.st") == dequantize(quantize(a, bits=4))
    c = convert_file(pa, tmp_path / "c.st", index_encoding="abs64")
    assert c.operation == "convert" and c.written and c.max_abs_error is None
    s = compose_files([pa, pb], tmp_path / "s.st")
    assert s.operation == "compose" and s.inputs == [str(pa), str(pb)]
