"""Inputs that are not regular files fail at once; output is safe on a terminal; CLI words."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from spdelta import SparseDelta
from spdelta.cli import main
from spdelta.errors import NotRegularFileError
from spdelta.format import DeltaReader, load_delta, save_delta

Capsys = pytest.CaptureFixture[str]
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def _delta(path: Path, name: str = "model.norm.weight", **meta: str) -> Path:
    save_delta(SparseDelta({name: ((32,), torch.tensor([1, 4]), torch.tensor([0.5, -1.0]))}),
               path, metadata=meta or None)
    return path


def _timed(fifo: Path, call: Callable[[], object]) -> tuple[float, object]:
    """Run ``call``; if it blocks on ``fifo``, a writer unblocks it after 5 s (no hang)."""
    done = threading.Event()

    def unblock() -> None:
        if not done.wait(5.0):
            with open(fifo, "wb"):  # pairs with a blocked reader; EOF when closed
                pass

    threading.Thread(target=unblock, daemon=True).start()
    t0 = time.monotonic()
    try:
        result: object = call()
    except Exception as e:  # noqa: BLE001 - returned for the caller to check
        result = e
    finally:
        done.set()
    return time.monotonic() - t0, result


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.st"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("argv", [
    ["validate", "{fifo}"], ["inspect", "{fifo}"], ["merge", "{fifo}", "{ok}", "-o", "{out}"],
    ["compose", "{ok}", "{fifo}", "-o", "{out}"], ["quantize", "{fifo}", "-o", "{out}"],
    ["convert", "{fifo}", "-o", "{out}", "--value-dtype", "bf16"],
    ["apply", "--base", "{base}", "--delta", "{fifo}", "-o", "{out}"],
])
def test_a_fifo_input_fails_within_a_second(argv: list[str], fifo: Path, tmp_path: Path,
                                            tiny_llama_dir: str, capsys: Capsys) -> None:
    ok = _delta(tmp_path / "ok.st")
    args = [a.format(fifo=fifo, ok=ok, out=tmp_path / "out", base=tiny_llama_dir) for a in argv]
    capsys.readouterr()
    elapsed, code = _timed(fifo, lambda: main(args))
    err = capsys.readouterr().err
    assert elapsed < 1.0 and code == 1, (elapsed, code, err)
    assert "is a FIFO (named pipe), not a regular file" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("reader", [load_delta, DeltaReader])
def test_library_readers_refuse_a_fifo_at_once(fifo: Path, reader: Callable[[Path], object]
                                               ) -> None:
    elapsed, result = _timed(fifo, lambda: reader(fifo))
    assert elapsed < 1.0 and isinstance(result, NotRegularFileError), (elapsed, result)


def test_a_fifo_shard_or_data_file_fails_at_once(fifo: Path, tmp_path: Path,
                                                 tiny_llama_dir: str, tiny_lm_dir: str,
                                                 capsys: Capsys) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    os.unlink(base / "model.safetensors")
    os.mkfifo(base / "model.safetensors")
    delta = _delta(tmp_path / "d.st")
    elapsed, code = _timed(base / "model.safetensors", lambda: main(
        ["apply", "--base", str(base), "--delta", str(delta), "-o", str(tmp_path / "o")]))
    assert elapsed < 1.0 and code == 1 and "FIFO" in capsys.readouterr().err
    elapsed, code = _timed(fifo, lambda: main(
        ["train", "--model", tiny_lm_dir, "--data", str(fifo), "-o", str(tmp_path / "t.st"),
         "--steps", "1", "--no-progress"]))
    assert elapsed < 15.0 and code == 1  # the model loads first; the data never blocks
    assert "FIFO, socket or device" in capsys.readouterr().err


def test_sockets_and_devices_are_refused(tmp_path: Path, capsys: Capsys) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.st"))
        assert main(["validate", str(tmp_path / "s.st")]) == 1
        assert "is a socket" in capsys.readouterr().err
    finally:
        sock.close()
    assert main(["inspect", "/dev/zero"]) == 1
    err = capsys.readouterr().err
    assert "is a character device" in err and "0 bytes" not in err, err


def test_inspect_and_validate_escape_terminal_control_characters(tmp_path: Path,
                                                                 capsys: Capsys) -> None:
    evil = "w\x1b[2J\x1b]0;owned\x07\u202eevil"
    path = _delta(tmp_path / "d.st", name=evil, **{"note\x1b[31m": "red\x9bvalue"})
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    assert "w\\x1b[2J\\x1b]0;owned\\x07\\u202eevil" in out and "note\\x1b[31m" in out
    with open(path, "r+b") as f:  # break it: validate prints the name in its problems
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err


def test_errors_use_the_command_lines_words(tmp_path: Path, tiny_llama_dir: str,
                                            capsys: Capsys) -> None:
    a = _delta(tmp_path / "a.st")
    _delta(tmp_path / "o.st")
    capsys.readouterr()
    assert main(["compose", str(a), str(a), "-o", str(tmp_path / "o.st")]) == 1
    err = capsys.readouterr().err
    assert "pass --force" in err and "overwrite=" not in err, err
    stamped = _delta(tmp_path / "s.st", **{"spdelta.base_model.fingerprint": "base1:" + "0" * 32})
    assert main(["apply", "--base", tiny_llama_dir, "--delta", str(stamped), "-o",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--allow-base-mismatch" in err and "check_base" not in err, err


def test_a_killed_writers_temp_file_is_collected_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "o.st"
    stale = [tmp_path / ".o.st.0123456789ab.tmp", tmp_path / ".o.st.lock"]
    for p in stale:
        p.write_bytes(b"x" * 4096)
    keep = tmp_path / ".o.st.notes"  # not of spdelta's naming: left alone
    keep.write_text("mine")
    a = _delta(tmp_path / "a.st")
    assert main(["compose", str(a), str(a), "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.st.notes", "a.st", "o.st"]
