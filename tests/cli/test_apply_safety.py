"""``spdelta apply`` never deletes an input, never turns a file into a directory, no litter."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from spdelta import SparseDelta
from spdelta.cli import main
from spdelta.format import save_delta
from spdelta.hf import checkpoint_shards

Capsys = pytest.CaptureFixture[str]
pytestmark = pytest.mark.hf


@pytest.fixture
def work(tiny_llama_dir: str, tmp_path: Path) -> Path:
    """``work/base`` (a checkpoint) and ``work/d.st`` (a delta for it)."""
    shutil.copytree(tiny_llama_dir, tmp_path / "work" / "base")
    delta = SparseDelta({"model.norm.weight": ((32,), torch.tensor([0, 31]), torch.ones(2))})
    save_delta(delta, tmp_path / "work" / "d.st")
    return tmp_path / "work"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _apply(capsys: Capsys, base: Path, delta: Path, out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["apply", "--base", str(base), "--delta", str(delta), "-o", str(out), *extra])
    err = capsys.readouterr().err
    if code:
        assert err.count("\n") == 1 and err.startswith("spdelta apply: error: "), err
    return code, err


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("out", [".", "base", "base/sub"])
def test_an_output_overlapping_an_input_is_refused(work: Path, capsys: Capsys, out: str,
                                                   force: list[str]) -> None:
    before = _files(work)
    code, err = _apply(capsys, work / "base", work / "d.st", work / out, *force)
    assert code == 1 and "outside the inputs" in err
    assert _files(work) == before  # the base and the delta are intact; no hidden copy


def test_a_delta_inside_the_output_is_refused(work: Path, capsys: Capsys) -> None:
    (work / "out").mkdir()
    shutil.move(work / "d.st", work / "out" / "d.st")
    code, err = _apply(capsys, work / "base", work / "out" / "d.st", work / "out", "--force")
    assert code == 1 and "delta" in err and (work / "out" / "d.st").is_file()


def test_force_does_not_turn_a_file_into_a_directory(work: Path, capsys: Capsys) -> None:
    (work / "out").write_bytes(b"a file")
    code, err = _apply(capsys, work / "base", work / "d.st", work / "out", "--force")
    assert code == 1 and "is a file" in err
    assert (work / "out").read_bytes() == b"a file"
    assert sorted(os.listdir(work)) == ["base", "d.st", "out"]


def test_stale_leftovers_do_not_break_force_and_are_collected(work: Path, capsys: Capsys
                                                              ) -> None:
    assert _apply(capsys, work / "base", work / "d.st", work / "out")[0] == 0
    for name in (".out.old", ".out.k2j4x_9a.tmp", ".out.0123456789ab.tmp"):
        (work / name).mkdir()
        (work / name / "model.safetensors").write_bytes(b"x" * 1000)  # a killed run's litter
    code, err = _apply(capsys, work / "base", work / "d.st", work / "out", "--force")
    assert code == 0, err
    assert sorted(os.listdir(work)) == ["base", "d.st", "out"]
    assert set(checkpoint_shards(work / "out")) == set(checkpoint_shards(work / "base"))


def test_output_directory_mode_follows_the_umask(work: Path, capsys: Capsys) -> None:
    old = os.umask(0o022)
    try:
        assert _apply(capsys, work / "base", work / "d.st", work / "out")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((work / "out").stat().st_mode) == 0o755


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory where creating a file fails, also for root (who ignores modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/sys/kernel")):
        try:
            fd = os.open(candidate / ".probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(candidate / ".probe")
    pytest.skip("no directory refuses writes here")


@pytest.mark.parametrize("command", ["apply", "merge"])
def test_a_read_only_directory_error_names_the_users_path(work: Path, tmp_path: Path,
                                                          capsys: Capsys, command: str) -> None:
    out = _read_only_dir(tmp_path) / "out"
    argv = (["apply", "--base", str(work / "base"), "--delta", str(work / "d.st")]
            if command == "apply" else ["merge", str(work / "d.st"), str(work / "d.st")])
    capsys.readouterr()
    assert main([*argv, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{str(out)!r}" in err, err
    assert ".tmp" not in err and ".lock" not in err, err
