"""``spdelta train`` killed with SIGKILL at random points, then resumed: the same delta bytes.

Each run is a fresh process (one, or ``torchrun`` with two and gloo) killed as a group at
a random moment: during start-up, training, a checkpoint write, or while the outputs are
written. The same command with ``--resume`` continues; after the kills, an uninterrupted
last run must finish and leave a delta file byte-identical to a run that was never
interrupted, and nothing else: no checkpoint, no temp file, no lock.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spdelta.cli.main import main

pytestmark = [pytest.mark.hf,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                 reason="needs SIGKILL and /proc (Linux)")]
ROOT = Path(__file__).resolve().parents[2]


def _command(model: str, data: Path, nproc: int, method: str) -> list[str]:
    train = ["train", "--model", model, "--data", str(data), "-o", "d.st", "--batch-size", "4",
             "--max-length", "24", "--calibration-examples", "4", "--density", "0.05",
             "--lr", "0.01", "--steps", "16", "--checkpoint-every", "1", "--method", method,
             "--update-every", "3", "--accumulate-steps", "2", "--no-progress", "--resume"]
    if nproc == 1:
        return [sys.executable, "-m", "spdelta", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "spdelta", *train, "--device", "cpu"]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts each worker in its own
    session, so killing torchrun's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once, as a machine or scheduler would."""
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


class _Run:
    """One process group; ``ready`` is set when the model and data are loaded."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1"}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.ready, self.lines = threading.Event(), []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("model "):
                self.ready.set()
        self.ready.set()

    def _close(self) -> None:
        self.reader.join(timeout=60)  # EOF once every process of the group is gone
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def kill_after(self, seconds: float) -> bool:
        """SIGKILL the whole group after ``seconds``; False if it had ended by then."""
        try:
            self.proc.wait(timeout=seconds)
            killed = False
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc.pid)
            self.proc.wait(timeout=60)
            killed = True
        self._close()
        return killed

    def finish(self, timeout: float = 600.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._close()
        return code


def _reference(cmd: list[str], where: Path, nproc: int) -> tuple[bytes, float, float]:
    """An uninterrupted run: the delta bytes, the start-up time and the training time.

    One process runs in this process (saving a start-up), on one thread as the
    subprocesses (``OMP_NUM_THREADS=1``) so that the sums are the same.
    """
    where.mkdir()
    if nproc > 1:
        run = _Run(cmd, where)
        run.ready.wait(timeout=600)
        ready = time.monotonic() - run.t0
        assert run.finish() == 0, "".join(run.lines[-30:])
        return (where / "d.st").read_bytes(), ready, time.monotonic() - run.t0 - ready
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(where)
    try:
        t0 = time.monotonic()
        assert main(cmd[cmd.index("train"):]) == 0
        train = time.monotonic() - t0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return (where / "d.st").read_bytes(), 5.0, train


def _kill_and_resume(cmd: list[str], where: Path, kills: list[str], seed: int, ready: float,
                     train: float) -> list[str]:
    """Kill one run per entry of ``kills`` ("random", or "delta": once the delta file is
    written, while the log and loss curve are), resuming each time; then a last run."""
    where.mkdir()
    rng, history = random.Random(seed), []
    for when in kills:
        run = _Run(cmd, where)
        if when == "delta":
            while not (where / "d.st").exists() and run.proc.poll() is None:
                time.sleep(0.001)
            delay, phase = 0.0, "the delta appeared"
        elif rng.random() < 0.25:  # during start-up (imports, claims, loading)
            delay, phase = rng.uniform(0, ready), "start"
        else:  # during training, a checkpoint write, or while the outputs are written
            run.ready.wait(timeout=600)
            delay, phase = rng.uniform(0, train * 1.2), "ready"
        killed = run.kill_after(delay)
        history.append(f"{'killed' if killed else 'ended'} {delay:.2f}s after {phase}")
        if not killed:
            assert run.proc.returncode == 0, "".join(run.lines[-30:])
    last = _Run(cmd, where)
    code = last.finish()
    history.append(f"last run: exit {code}")
    assert code == 0, "\n".join(history) + "".join(last.lines[-30:])
    return history


def _check_same(reference: bytes, where: Path, history: list[str]) -> None:
    assert (where / "d.st").read_bytes() == reference, "\n".join(history)
    assert sorted(os.listdir(where)) == ["d.st", "d.st.log.json", "d.st.loss.png"], (
        sorted(os.listdir(where)), history)


@pytest.fixture
def data(tmp_path: Path, sums_file: Callable[[Path, int], Path]) -> Path:
    return sums_file(tmp_path / "sums.jsonl", 32)


def test_sigkill_at_random_points_then_resume_gives_the_same_bytes(
    tiny_lm_dir: str, data: Path, tmp_path: Path
) -> None:
    cmd = _command(tiny_lm_dir, data, 1, "spiel")
    reference, ready, train = _reference(cmd, tmp_path / "ref", 1)
    history = _kill_and_resume(cmd, tmp_path / "killed", ["random", "delta"], seed=0,
                               ready=ready, train=train)
    _check_same(reference, tmp_path / "killed", history)


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "method", "kills", "seed"), [
    (1, "spiel", 8, 1), (1, "speft", 6, 2), (2, "spiel", 4, 3), (2, "speft", 3, 4)])
# Random kills, then one while the outputs are written.
def test_many_sigkills_one_and_two_processes(tiny_lm_dir: str, data: Path, tmp_path: Path,
                                             nproc: int, method: str, kills: int,
                                             seed: int) -> None:
    cmd = _command(tiny_lm_dir, data, nproc, method)
    reference, ready, train = _reference(cmd, tmp_path / "ref", nproc)
    history = _kill_and_resume(cmd, tmp_path / "killed", ["random"] * kills + ["delta"],
                               seed=seed, ready=ready, train=train)
    _check_same(reference, tmp_path / "killed", history)
