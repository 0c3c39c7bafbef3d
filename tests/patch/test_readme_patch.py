"""The README's `spdelta diff` / apply / compose block runs as written, with what it claims."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spdelta.cli import main
from tests.patch.test_files import assert_bitwise, save_checkpoint, step, weights

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(marker: str) -> list[str]:
    """The lines of the fenced block right after ``<!-- marker -->``."""
    found = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert found, f"README has no block marked {marker}"
    return [line for line in found.group(1).splitlines() if line.strip()]


def test_patch_cli_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for i in range(3):  # three consecutive steps of a run, sharded
        save_checkpoint(step(i), tmp_path / f"step-{100 + i}")
    lines = _block("test:patch-cli")
    assert len(lines) >= 5
    claims = 0
    for line in lines:
        command, _, comment = line.partition("#")
        argv = shlex.split(command)
        assert argv[0] == "spdelta", line
        out = Path(argv[argv.index("-o") + 1])
        code = main(argv[1:])
        err = capsys.readouterr().err
        if comment.strip().startswith("refused"):
            assert code == 1 and "wrong base" in err and not out.exists(), line
            continue
        assert code == 0, (line, err)
        claim = re.search(r"bitwise equal to (\S+)", comment)
        if claim:
            assert_bitwise(weights(out), weights(Path(claim.group(1))))
            claims += 1
    assert claims >= 3
