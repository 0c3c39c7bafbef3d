"""``spdelta train`` under ``torchrun`` (2 processes, gloo) equals the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from spdelta.cli.main import main

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def sums(tmp_path_factory: pytest.TempPathFactory, sums_file: Any) -> Path:
    """Prompt/response rows whose responses all have 2 tokens (a digit and EOS), so the
    mean of the ranks' mean losses is the global batch's mean loss."""
    return sums_file(tmp_path_factory.mktemp("data") / "sums.jsonl", 32)


def _args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", str(data), "-o", str(out), "--batch-size", "4",
            "--max-length", "32", "--calibration-examples", "8", "--density", "0.05", "--lr",
            "0.01", "--steps", "6", "--no-progress", "--checkpoint-every", "0", *extra]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "spdelta", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _same_run(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.endswith("::idx"):
            assert torch.equal(ta[k], tb[k]), f"{k}: supports differ"
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize(("method", "fsdp"), [("speft", False), ("spiel", False),
                                              ("speft", True), ("spiel", True)])
def test_two_processes_equal_one(tiny_lm_dir: str, sums: Path, tmp_path: Path,
                                 method: str, fsdp: bool) -> None:
    extra = ["--method", method, "--update-every", "2", "--accumulate-steps", "2"]
    assert main(_args(tiny_lm_dir, sums, tmp_path / "one.st", *extra)) == 0
    _torchrun(_args(tiny_lm_dir, sums, tmp_path / "two.st", *extra, *(["--fsdp"] * fsdp)))
    _same_run(tmp_path / "one.st", tmp_path / "two.st")
    summary = json.loads((tmp_path / "two.st.log.json").read_text())["summary"]
    assert summary["world_size"] == 2


@pytest.mark.parametrize("fsdp", [False, True])
def test_checkpoint_from_two_processes_resumes_in_one(tiny_lm_dir: str, sums: Path,
                                                      tmp_path: Path, fsdp: bool) -> None:
    # Stopped at step 3, inside the AG window of the regrowth at step 4.
    extra = ["--method", "spiel", "--update-every", "2", "--accumulate-steps", "2"]
    assert main(_args(tiny_lm_dir, sums, tmp_path / "one.st", *extra)) == 0
    _torchrun(_args(tiny_lm_dir, sums, tmp_path / "two.st", *extra, "--stop-after", "3",
                    *(["--fsdp"] * fsdp)))
    assert not (tmp_path / "two.st").exists()
    assert main(_args(tiny_lm_dir, sums, tmp_path / "two.st", *extra, "--resume")) == 0
    _same_run(tmp_path / "one.st", tmp_path / "two.st")


@pytest.mark.parametrize("fsdp", [False, True])
def test_schedule_clipping_and_micro_batches_on_two_processes(tiny_lm_dir: str, sums: Path,
                                                               tmp_path: Path, fsdp: bool) -> None:
    """The schedule and the global-norm clipping (over DTensor shards under FSDP) match one
    process; data parallel also with micro-batches and held-out evaluation."""
    extra = ["--schedule", "cosine", "--warmup", "2", "--max-grad-norm", "0.05"]
    if not fsdp:
        extra += ["--micro-batch-size", "1", "--eval-fraction", "0.25", "--eval-every", "3"]
    assert main(_args(tiny_lm_dir, sums, tmp_path / "one.st", *extra)) == 0
    _torchrun(_args(tiny_lm_dir, sums, tmp_path / "two.st", *extra, *(["--fsdp"] * fsdp)))
    _same_run(tmp_path / "one.st", tmp_path / "two.st")
    one, two = (json.loads((tmp_path / f"{n}.st.log.json").read_text()) for n in ("one", "two"))
    assert [r["lr"] for r in one["log"]] == [r["lr"] for r in two["log"]]
    if not fsdp:
        assert two["summary"]["eval_loss"] == pytest.approx(one["summary"]["eval_loss"],
                                                            rel=1e-4)
