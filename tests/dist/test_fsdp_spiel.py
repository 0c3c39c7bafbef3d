"""FSDP2 SpIEL-AG under torchrun (gloo, CPU) must equal single-process ``make_spiel_step``.

One module fixture runs ``_fsdp_spiel_worker.py``: the whole run at world size 2 (saving
a DCP checkpoint inside an AG window), then the resume from it at world size 1.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from spdelta.errors import ParameterError
from spdelta.optim import adamw, sm3
from spdelta.train.spiel import SpielState

pytestmark = pytest.mark.hf
WORKER = Path(__file__).with_name("_fsdp_spiel_worker.py")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FW = _load(WORKER, "_spdelta_fsdp_spiel_worker")
W = FW.W


def _torchrun(task: str, out: Path, nproc: int) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(WORKER), task, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"{task}_rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """``(dir, {"train": 2 rank results, "resume": 1 rank result})``."""
    out = tmp_path_factory.mktemp("fsdp_spiel")
    train = _torchrun("train", out, 2)
    return out, {"train": train, "resume": _torchrun("resume", out, 1)}


@pytest.fixture(scope="module")
def reference() -> tuple[SpielState, list[float]]:
    torch.set_num_threads(1)
    return W.single_spiel("ag")  # type: ignore[no-any-return]



def test_fsdp_spiel_ag_equals_single_process(job: Any, reference: Any) -> None:
    ranks = job[1]["train"]
    ref, ref_losses = reference
    start, _ = W.spiel_start("ag", W.base_of(W.make_model()))
    assert any(not torch.equal(ref.support[n], start.support[n]) for n in ref.support)
    for r in ranks:
        W.assert_equal_tree(r["support"], ref.support)  # the same supports, exactly, on every rank
        W.assert_equal_tree(r["delta_support"], ref.support)  # fsdp_delta reads the SpIEL supports
        W.assert_close_tree(r["values"], ref.values)
        assert r["buffers_match"] and r["sharded"] and r["grad_acc_sharded"]
        W.assert_losses_close(r["losses"], ref_losses)
        assert [m > 0 for m in r["regrown"]] == [False, True, False, True, False, False]
    total = sum(v.numel() for v in ref.values.values())
    assert 0 < ranks[0]["local_numel"] < total  # values (and their AdamW state) are sharded
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == total


def test_fsdp_spiel_checkpoint_resumes_at_world_size_1(job: Any, reference: Any) -> None:
    ref, ref_losses = reference
    (r,) = job[1]["resume"]  # world size 2 -> 1 under FSDP, template from fsdp_spiel_init
    assert r["step"] == W.SPIEL["total_steps"] and r["buffers_match"]
    W.assert_equal_tree(r["support"], ref.support)
    W.assert_close_tree(r["values"], ref.values)
    W.assert_losses_close(r["losses"], ref_losses[FW.SAVE_AT:])


def test_fsdp_spiel_checkpoint_loads_whole_for_one_process(job: Any, reference: Any) -> None:
    from spdelta.dist import load_checkpoint

    ref, _ = reference
    part, _ = W.single_spiel("ag", stop=FW.SAVE_AT)
    loaded = load_checkpoint(job[0] / FW.CKPT)  # no template: whole tensors
    assert isinstance(loaded, SpielState) and loaded.step == FW.SAVE_AT
    W.assert_equal_tree(loaded.support, part.support)
    W.assert_close_tree(loaded.values, part.values)
    W.assert_equal_tree(loaded.opt_state.steps, part.opt_state.steps)
    W.assert_close_tree(loaded.opt_state.mu, part.opt_state.mu)
    W.assert_close_tree(loaded.opt_state.nu, part.opt_state.nu)
    base = W.base_of(W.make_model())
    assert all(g.shape == base[n].shape for n, g in loaded.grad_acc.items())  # (out, in)
    flat = loaded._replace(grad_acc={n: g.reshape(-1) for n, g in loaded.grad_acc.items()})
    W.assert_close_tree(flat.grad_acc, part.grad_acc)
    resumed, _ = W.single_spiel("ag", state=flat, start=FW.SAVE_AT)  # make_spiel_step
    W.assert_equal_tree(resumed.support, ref.support)
    W.assert_close_tree(resumed.values, ref.values)


def test_fsdp_spiel_rejects_ma_and_bad_hyperparameters() -> None:
    from spdelta.dist import make_fsdp_spiel_step

    model = nn.Linear(2, 2)
    opt = sm3(0.1, support={"weight": torch.tensor([0])}, shapes={"weight": (2, 2)})
    with pytest.raises(ParameterError, match="regrowth='ma' is not supported under FSDP"):
        make_fsdp_spiel_step(model, opt, total_steps=4, regrowth="ma")
    with pytest.raises(ParameterError, match="accumulate_steps"):
        make_fsdp_spiel_step(model, adamw(0.1), total_steps=4, update_every=2, accumulate_steps=3)
