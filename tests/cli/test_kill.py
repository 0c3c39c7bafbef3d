"""A writer killed with SIGKILL leaves the old output (or none), never a partial file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spdelta import SparseDelta
from spdelta.format import load_delta, save_delta, validate_file

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# A child that writes 20 tensors with DeltaWriter. PHASE=spool sleeps between tensors
# (before close); PHASE=publish slows the copy into the temp output file.
CHILD = r"""
import sys, time, torch
from spdelta import DeltaTensor
from spdelta.format import stream
path, phase = sys.argv[1], sys.argv[2]
if phase == "publish":
    real = stream._copy_range
    def slow(*args):
        real(*args)
        time.sleep(0.2)
    stream._copy_range = slow
with stream.DeltaWriter(path) as w:
    for i in range(20):
        w.write(f"t{i:02d}", DeltaTensor((1000,), torch.arange(0, 1000, 7),
                                        torch.full((143,), float(i))))
        print("wrote", i, flush=True)
        if phase == "spool":
            time.sleep(0.2)
"""

OLD = SparseDelta({"old": ((4,), torch.tensor([1]), torch.tensor([1.0]))})


def _kill_when(proc: subprocess.Popen[str], ready: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child ended or timed out before the kill point (rc={proc.returncode})")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("phase", "old"),
    [
        ("publish", True),
        ("spool", False),
        pytest.param("publish", False, marks=pytest.mark.slow),
        pytest.param("spool", True, marks=pytest.mark.slow),
    ],
)
def test_sigkill_leaves_old_file_or_none(tmp_path: Path, phase: str, old: bool) -> None:
    out = tmp_path / "out.safetensors"
    if old:
        save_delta(OLD, out)
    before = out.read_bytes() if old else None
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), phase], stdout=subprocess.PIPE, text=True
    )
    if phase == "spool":  # killed between tensors: nothing but the spool exists, unnamed
        assert proc.stdout is not None
        _kill_when(proc, lambda: proc.stdout.readline().startswith("wrote 5"))  # type: ignore[union-attr]
        assert _temps(tmp_path) == []
    else:  # killed while the temp output is being filled
        _kill_when(proc, lambda: bool(_temps(tmp_path)))
        temps = _temps(tmp_path)
        assert len(temps) == 1 and validate_file(temps[0])  # partial, and never named `out`
    assert proc.stdout is not None
    proc.stdout.close()
    if old:
        assert out.read_bytes() == before and load_delta(out) == OLD
    else:
        assert not out.exists()
    outputs = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert outputs == ([out] if old else [])


def test_the_next_write_collects_what_a_killed_writer_left(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), "publish"], stdout=subprocess.PIPE, text=True
    )
    _kill_when(proc, lambda: bool(_temps(tmp_path)))
    assert proc.stdout is not None
    proc.stdout.close()
    assert len(_temps(tmp_path)) == 1  # the killed run's partial temp file
    save_delta(OLD, tmp_path / "in.safetensors")
    from spdelta.cli import main

    assert main(["convert", str(tmp_path / "in.safetensors"), "-o", str(out)]) == 0
    assert _temps(tmp_path) == [] and load_delta(out) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]
