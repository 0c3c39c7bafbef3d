"""Every ```python block of the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code: str, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(code, str(README), "exec", dont_inherit=True), {"__name__": "__readme__"})  # noqa: S102
    assert capsys.readouterr().out  # every block prints what it shows


def test_training_block_lowers_loss(capsys: pytest.CaptureFixture[str]) -> None:
    code = next(b for b in BLOCKS if "adamw" in b)
    exec(compile(code, str(README), "exec", dont_inherit=True), {"__name__": "__readme__"})  # noqa: S102
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0]
