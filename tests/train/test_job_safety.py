"""``spdelta train`` never deletes what it did not write and claims its outputs at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spdelta.cli.main import main
from spdelta.errors import OutputExistsError
from spdelta.format import load_delta
from spdelta.recipes.job import TrainConfig, train_job

pytestmark = pytest.mark.hf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path: Path, sums_file: Callable[[Path, int], Path]) -> Path:
    return sums_file(tmp_path / "sums.jsonl", 16)


def _args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", str(data), "-o", str(out), "--batch-size", "4",
            "--max-length", "16", "--calibration-examples", "4", "--density", "0.05",
            "--no-progress", *extra]


def _one_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("spdelta train: error: "), err
    return err


def test_checkpoint_dir_holding_a_foreign_file_is_refused_and_the_file_survives(
    tiny_lm_dir: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("keep me")
    for every in ("0", "1"):
        code = main(_args(tiny_lm_dir, data, tmp_path / "d.st", "--steps", "2",
                          "--checkpoint-dir", str(ckpt), "--checkpoint-every", every))
        assert code == 1
        assert "notes.txt" in _one_error(capsys.readouterr().err)
        assert (ckpt / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "d.st").exists()


def test_checkpoint_dir_dot_is_refused(tiny_lm_dir: str, data: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(_args(tiny_lm_dir, Path("sums.jsonl"), Path("d.st"), "--steps", "2",
                      "--checkpoint-dir", "."))
    assert code == 1 and "did not write" in _one_error(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["sums.jsonl"]


@pytest.mark.parametrize("existing", [False, True])
def test_only_what_spdelta_wrote_is_removed(tiny_lm_dir: str, data: Path, tmp_path: Path,
                                            existing: bool) -> None:
    ckpt = tmp_path / "ck"
    if existing:
        ckpt.mkdir()  # an empty directory of the user's: used, then left (empty)
    assert main(_args(tiny_lm_dir, data, tmp_path / "d.st", "--steps", "3",
                      "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1")) == 0
    assert ckpt.exists() == existing
    if existing:
        assert os.listdir(ckpt) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["sums.jsonl", "d.st", "d.st.log.json", "d.st.loss.png"] + (["ck"] if existing else []))


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "spdelta", *argv], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the first run ended early (rc={proc.returncode}): "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)


@pytest.mark.parametrize("shared", ["output", "checkpoint-dir"])
def test_a_second_run_on_the_same_output_fails_at_once(
    tiny_lm_dir: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    shared: str
) -> None:
    first = _spawn(_args(tiny_lm_dir, data, tmp_path / "a.st", "--steps", "100000",
                         "--checkpoint-dir", str(tmp_path / "ck")))
    _wait_for(tmp_path / ".a.st.lock", first)
    _wait_for(tmp_path / ".ck.lock", first)
    second = tmp_path / ("a.st" if shared == "output" else "b.st")
    try:
        t0 = time.monotonic()
        code = main(_args(tiny_lm_dir, data, second, "--steps", "2",
                          "--checkpoint-dir", str(tmp_path / "ck")))
        elapsed = time.monotonic() - t0
    finally:
        first.send_signal(signal.SIGKILL)  # a killed run holds no claim afterwards
        first.wait(timeout=60)
        assert first.stderr is not None
        first.stderr.close()
    assert code == 1 and elapsed < 5.0, elapsed
    assert "another spdelta run" in _one_error(capsys.readouterr().err)
    # Leftovers of the killed run's naming, beside any of its outputs, are collected by
    # the next run on that output.
    stale = [tmp_path / f".a.st{s}.0123456789ab.tmp" for s in ("", ".log.json", ".loss.png")]
    for path in stale:
        path.write_bytes(b"partial")
    assert main(_args(tiny_lm_dir, data, tmp_path / "a.st", "--steps", "2",
                      "--checkpoint-dir", str(tmp_path / "ck"))) == 0
    assert load_delta(tmp_path / "a.st").nnz > 0
    assert not any(p.exists() for p in stale) and not (tmp_path / ".a.st.lock").exists()


def test_an_output_that_appears_during_the_run_is_not_replaced(
    tiny_lm_dir: str, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "d.st"

    def say(line: str) -> None:  # another program writes the output while this run trains
        if line.startswith("model ") and not out.exists():
            out.write_bytes(b"theirs")

    cfg = TrainConfig(model=tiny_lm_dir, data=str(data), output=str(out), steps=2, batch_size=4,
                      max_length=16, calibration_examples=4, density=0.05, progress=False)
    with pytest.raises(OutputExistsError, match="--force"):
        train_job(cfg, say=say)
    assert out.read_bytes() == b"theirs"


@pytest.mark.parametrize("suffix", ["", ".log.json", ".loss.png"])
def test_existing_outputs_are_refused_before_training(
    tiny_lm_dir: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    suffix: str
) -> None:
    (tmp_path / f"d.st{suffix}").write_bytes(b"mine")
    assert main(_args(tiny_lm_dir, data, tmp_path / "d.st", "--steps", "2")) == 1
    assert "--force" in _one_error(capsys.readouterr().err)
    assert (tmp_path / f"d.st{suffix}").read_bytes() == b"mine"
