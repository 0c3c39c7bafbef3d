"""``spdelta`` commands print nothing of their dependencies' start-up (issue 16).

transformers imports torchao whenever it is installed, and importing torchao prints
library-load failures ("Failed to load ... _C_mxfp8 ...") and ``torch.utils._pytree``
warnings. spdelta needs torchao only for ``--nf4``: without it, stderr stays empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.hf


_SCRIPT = """
import json, sys
from spdelta.cli.main import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(f"spdelta {argv[0]} failed")
    if "torchao" in sys.modules:
        sys.exit(f"spdelta {argv[0]} imported torchao")
"""


def test_inspect_apply_train_print_no_start_up_noise(tiny_lm_dir: str, tmp_path: Path,
                                                     sums_file: Callable[[Path, int], Path]
                                                     ) -> None:
    """One fresh process runs the three commands (each would import torchao first)."""
    delta = str(tmp_path / "d.st")
    data = str(sums_file(tmp_path / "s.jsonl", 8))
    commands = [
        ["train", "--model", tiny_lm_dir, "--data", data, "-o", delta, "--steps", "1",
         "--batch-size", "4", "--max-length", "24", "--calibration-examples", "4",
         "--no-progress"],
        ["inspect", delta],
        ["apply", "--base", tiny_lm_dir, "--delta", delta, "-o", str(tmp_path / "out")],
    ]
    run = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(commands)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr  # no torchao library-load lines, no pytree warnings
