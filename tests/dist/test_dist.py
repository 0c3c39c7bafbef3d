"""Two-process (gloo, CPU) runs under torchrun must equal single-process training.

One ``torchrun --nproc_per_node=2`` job (module fixture) runs every scenario of
``_worker.py``; each test compares its part with the single-process reference.
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

from spdelta.train import TrainState
from spdelta.train.spiel import SpielState

pytestmark = pytest.mark.hf
WORKER = Path(__file__).with_name("_worker.py")


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_spdelta_dist_worker", WORKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _load_worker()


def _torchrun(task: str, out: Path, nproc: int = 2) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(WORKER), task, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """``(dir, per-rank results)`` of one 2-process run; ``dir/ckpt_w1`` is saved first."""
    from spdelta.dist import save_checkpoint

    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    part, _ = W.single_spiel("ag", stop=3)
    save_checkpoint(part, out / "ckpt_w1")
    return out, _torchrun("all", out)



def test_ddp_static_equals_single_process(job: tuple[Path, list[dict[str, Any]]]) -> None:
    ranks = [r["static"] for r in job[1]]
    ref, ref_losses = W.single_static()
    W.assert_equal_tree(ranks[0]["values"], ranks[1]["values"])  # replicas stay bit-identical
    W.assert_close_tree(ranks[0]["values"], ref.values)
    assert all(v.abs().max() > 0 for v in ref.values.values())
    W.assert_losses_close(ranks[0]["losses"], ref_losses)
    assert all(r["divergence_caught"] for r in ranks)  # assert_replicated sees a difference


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_ddp_spiel_supports_global_and_identical(
        job: tuple[Path, list[dict[str, Any]]], regrowth: str) -> None:
    ranks = [r["spiel"][regrowth] for r in job[1]]
    ref, ref_losses = W.single_spiel(regrowth)
    start, _ = W.spiel_start(regrowth, W.base_of(W.make_model()))
    W.assert_equal_tree(ranks[0]["support"], ranks[1]["support"])
    W.assert_equal_tree(ranks[0]["support"], ref.support)
    assert any(not torch.equal(ref.support[n], start.support[n]) for n in ref.support)
    W.assert_close_tree(ranks[0]["values"], ref.values)
    W.assert_losses_close(ranks[0]["losses"], ref_losses)


def test_fsdp2_equals_single_process(job: tuple[Path, list[dict[str, Any]]]) -> None:
    from spdelta.dist import load_checkpoint

    ranks = [r["fsdp"] for r in job[1]]
    ref, ref_losses = W.single_static()
    support = W.support_of(W.base_of(W.make_model()))
    for r in ranks:
        W.assert_equal_tree(r["support"], support)
        W.assert_close_tree(r["values"], ref.values)
    W.assert_losses_close(ranks[0]["losses"], ref_losses)
    # Loaded into the FSDP layout (template): each rank gets back its own shards.
    assert all(r["resharded_equal"] for r in ranks)
    total = sum(v.numel() for v in ref.values.values())
    assert 0 < ranks[0]["local_numel"] < total
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == total
    # The sharded (DTensor) values and AdamW state load whole at world size 1.
    loaded = load_checkpoint(job[0] / "ckpt_fsdp")
    assert isinstance(loaded, TrainState) and loaded.step == W.STEPS
    W.assert_close_tree(loaded.values, ref.values)
    W.assert_equal_tree(loaded.opt_state.steps, ref.opt_state.steps)
    W.assert_close_tree(loaded.opt_state.mu, ref.opt_state.mu)
    W.assert_close_tree(loaded.opt_state.nu, ref.opt_state.nu)


@pytest.mark.parametrize("metric", ["gradient", "snip", "fisher"])
def test_distributed_salience_selects_the_global_support(
        job: tuple[Path, list[dict[str, Any]]], metric: str) -> None:
    ranks = [r["score"][metric] for r in job[1]]
    ref = W.single_score(metric)
    W.assert_equal_tree(ranks[0]["scores"], ranks[1]["scores"])
    W.assert_close_tree(ranks[0]["scores"], ref["scores"])
    for r in ranks:
        W.assert_equal_tree(r["support"], ref["support"])


def test_dcp_checkpoint_resumes_across_world_sizes(job: tuple[Path, list[dict[str, Any]]]
                                                   ) -> None:
    from spdelta.dist import load_checkpoint

    out, results = job
    ref, _ = W.single_spiel("ag")
    part, _ = W.single_spiel("ag", stop=3)
    assert part.grad_acc  # saved inside an AG window: the accumulators must survive too
    for r in results:  # saved at world size 1, resumed at 2
        W.assert_equal_tree(r["ckpt"]["support"], ref.support)
        W.assert_close_tree(r["ckpt"]["values"], ref.values)
    loaded = load_checkpoint(out / "ckpt_w2")  # saved at world size 2, resumed at 1
    assert isinstance(loaded, SpielState) and loaded.rng_state is not None
    assert loaded.step == 3 and torch.equal(loaded.rng_state, part.rng_state)
    W.assert_close_tree(loaded.grad_acc, part.grad_acc)
    W.assert_close_tree(loaded.values, part.values)
    resumed, _ = W.single_spiel("ag", state=loaded, start=3)
    W.assert_equal_tree(resumed.support, ref.support)
    W.assert_close_tree(resumed.values, ref.values)
