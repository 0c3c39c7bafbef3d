"""CUDA: every device-sensitive path computes on the GPU what it computes on the CPU.

Each test runs the same computation on both devices, in float64 where it can, and
compares: a tensor left on the wrong device fails with an error, and a kernel with
other semantics on the GPU (``sampled_addmm``, ``index_add``, NF4) fails the
comparison. Kernel tests compare to 1e-10. Whole-model tests use an fp32-level
tolerance (rtol 1e-4, atol 1e-6 of the largest entry) even in float64: Llama's
RMSNorm and rotary embeddings compute in fp32 whatever the model dtype, and the two
devices round fp32 differently. CI has no GPU, so these are skipped there; on a GPU
machine run ``pytest tests/gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._pytree import tree_map_only

from spdelta.functional import add_at, make_loss_fn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (CI has none); run `pytest tests/gpu` on one"),
]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F64 = torch.float64


def to(tree: Any, device: torch.device) -> Any:
    """Every tensor in ``tree`` moved to ``device``."""
    return tree_map_only(Tensor, lambda t: t.to(device), tree)


def close(got: Any, want: Any, **tol: float) -> None:
    """``got`` (any device) equals ``want`` to ``tol`` (default float64-tight), leaf by leaf."""
    tol = tol or {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(to(got, CPU), to(want, CPU), **tol)


def model_close(got: dict[str, Tensor], want: dict[str, Tensor], per_tensor: bool = True) -> None:
    """Whole-model results: fp32-level agreement (see the module docstring).

    ``atol`` is 1e-6 of the largest entry of each tensor, or with ``per_tensor=False``
    of all tensors (salience scores are ranked globally).
    """
    top = max(float(w.abs().max()) for w in want.values() if w.numel())
    for n, w in want.items():
        scale = float(w.abs().max()) if per_tensor and w.numel() else top
        close(got[n], w, rtol=1e-4, atol=1e-6 * scale + 1e-30)


def _linear_grads(x: Tensor, w: Tensor, b: Tensor | None, idx: Tensor, v: Tensor,
                  fast: bool) -> tuple[Tensor, ...]:
    from spdelta.kernels import sparse_delta_linear

    x, v = x.clone().requires_grad_(), v.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = sparse_delta_linear(x, w, b, idx, v) if fast else F.linear(x, add_at(w, idx, v), b)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)
     ).sum().backward()
    return (y.detach(), x.grad, v.grad) + (() if b is None else (b.grad,))  # type: ignore[operator]


@settings(max_examples=30, deadline=None)
@given(out_f=st.integers(1, 48), in_f=st.integers(1, 48), tokens=st.integers(1, 40),
       fraction=st.sampled_from([0.0, 0.05, 0.5, 1.0]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sparse_delta_linear_on_cuda_equals_cpu(out_f: int, in_f: int, tokens: int,
                                                fraction: float, bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    numel = out_f * in_f
    idx = torch.randperm(numel, generator=gen)[:round(fraction * numel)].sort().values
    case = (torch.randn(2, tokens, in_f, generator=gen, dtype=F64),
            torch.randn(out_f, in_f, generator=gen, dtype=F64),
            torch.randn(out_f, generator=gen, dtype=F64) if bias else None, idx,
            torch.randn(len(idx), generator=gen, dtype=F64))
    want = _linear_grads(*case, fast=False)  # the reference, on the CPU
    close(_linear_grads(*to(case, CUDA), fast=True), want)
    close(_linear_grads(*to(case, CUDA), fast=False), want)


def test_sampled_grad_at_benchmark_size_in_fp32() -> None:
    """The issue's SDDMM case (1536 x 576, 1024 tokens, 1 %) against the dense product."""
    from spdelta.kernels import sampled_grad, sampled_grad_dense

    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(1024, 1536, generator=gen), torch.randn(1024, 576, generator=gen)
    idx = torch.randperm(1536 * 576, generator=gen)[:8847].sort().values
    want = sampled_grad_dense(g.double(), x.double(), idx)
    close(sampled_grad(g.cuda(), x.cuda(), idx.cuda(), (1536, 576)), want.float(),
          rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_in_low_precision_matches_the_float64_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 64, 96, generator=gen), torch.randn(128, 96, generator=gen) / 10
    idx = torch.randperm(128 * 96, generator=gen)[:500].sort().values
    v = torch.randn(500, generator=gen) / 10
    want = _linear_grads(x.double(), w.double(), None, idx, v.double(), fast=False)
    got = _linear_grads(x.to(CUDA, dtype), w.to(CUDA, dtype), None, idx.cuda(), v.cuda(),
                        fast=True)
    tol = {"rtol": 2e-2, "atol": 2e-1} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-3}
    close([t.double() for t in got], list(want), **tol)


def test_nf4_base_on_cuda_equals_cpu() -> None:
    pytest.importorskip("torchao", reason="the NF4 base needs torchao (extra 'quant')")
    from spdelta.kernels import sparse_delta_linear
    from spdelta.quant import nf4_to_dense, to_nf4

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(256, 128, generator=gen, dtype=torch.bfloat16)
    x = torch.randn(3, 128, generator=gen, dtype=torch.bfloat16)
    idx = torch.randperm(256 * 128, generator=gen)[:300].sort().values
    v = torch.randn(300, generator=gen)
    on = {d: to_nf4({"w": w.to(d)}, ["w"])["w"] for d in (CPU, CUDA)}
    close(nf4_to_dense(on[CUDA]), nf4_to_dense(on[CPU]), rtol=0, atol=0)  # same codes and scales
    y = sparse_delta_linear(x.cuda(), on[CUDA], None, idx.cuda(), v.cuda())
    ref = F.linear(x.cuda(), add_at(nf4_to_dense(on[CUDA]), idx.cuda(), v.cuda()))
    close(y, ref, rtol=0, atol=0)


def _lm_batches(vocab: int, n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (3, 12), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.fixture
def llama_on(tiny_llama: Any) -> Any:
    """``device -> (model, base)``: a copy of the tiny float64 Llama with its parameters there."""
    import copy

    def on(device: torch.device) -> tuple[Any, dict[str, Tensor]]:
        m = copy.deepcopy(tiny_llama).to(device)
        return m, {n: p.detach() for n, p in m.named_parameters()}

    return on


@pytest.mark.parametrize("metric", ["gradient", "magnitude", "snip", "force", "taylor_fo",
                                    "fisher", "synflow", "grasp", "random"])
def test_salience_on_cuda_equals_cpu(llama_on: Any, metric: str) -> None:
    from spdelta.salience import score

    got = {}
    for d in (CPU, CUDA):
        model, base = llama_on(d)
        got[d] = score(model, base, to(_lm_batches(64, 2), d), metric=metric, num_examples=6,
                       generator=torch.Generator().manual_seed(0), progress=False)
    # SynFlow's all-ones input makes attention uniform whatever q and k are, so its q/k
    # scores are rounding noise (~1e-9 of the largest score) on either device.
    model_close(got[CUDA], got[CPU], per_tensor=False)


def test_speft_on_cuda_equals_cpu(llama_on: Any) -> None:
    from spdelta.train import speft

    deltas = {}
    for d in (CPU, CUDA):
        model, base = llama_on(d)
        delta, _ = speft(model, base, to(_lm_batches(64, 4), d), metric="gradient",
                         density=0.05, steps=4, lr=1e-2,
                         calibration_batches=to(_lm_batches(64, 2, seed=1), d),
                         calibration_examples=6, progress=False)
        deltas[d] = delta
    a, b = deltas[CPU], deltas[CUDA]
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].indices.cpu(), b[n].indices.cpu()), n
    model_close({n: b[n].values for n in b}, {n: a[n].values for n in a})


@pytest.mark.parametrize("regrowth", ["ag", "ma"])
def test_spiel_on_cuda_equals_cpu(llama_on: Any, regrowth: str) -> None:
    from spdelta.train import spiel

    deltas, logs = {}, {}
    for d in (CPU, CUDA):
        model, base = llama_on(d)
        deltas[d], logs[d] = spiel(model, base, to(_lm_batches(64, 8), d), density=0.1,
                                   targets="all-linear", steps=8, lr=1e-2, regrowth=regrowth,
                                   generator=torch.Generator().manual_seed(0), update_every=2,
                                   accumulate_steps=2, progress=False)
    assert sum(r["regrown"] for r in logs[CUDA]) > 0
    a, b = deltas[CPU], deltas[CUDA]
    for n in a:
        assert torch.equal(a[n].indices.cpu(), b[n].indices.cpu()), n
    model_close({n: b[n].values for n in b}, {n: a[n].values for n in a})
    close([r["loss"] for r in logs[CUDA]], [r["loss"] for r in logs[CPU]], rtol=1e-6, atol=0)


def test_fast_loss_equals_reference_loss_on_cuda(llama_on: Any) -> None:
    model, base = llama_on(CUDA)
    gen = torch.Generator().manual_seed(3)
    names = [n for n in base if n.endswith("proj.weight")]
    support = {n: torch.randperm(base[n].numel(), generator=gen)[:40].sort().values.cuda()
               for n in names}
    values = {n: torch.randn(40, generator=gen, dtype=F64).cuda() for n in names}
    batch = to(_lm_batches(64, 1)[0], CUDA)
    grads = {}
    for impl in ("fast", "reference"):
        loss_fn = make_loss_fn(model, impl=impl)
        grads[impl] = torch.func.grad_and_value(loss_fn)(values, base, support, batch)
    close(grads["fast"], grads["reference"])  # the same device: float64-tight


def test_apply_to_model_on_cuda(llama_on: Any) -> None:
    from spdelta import SparseDelta
    from spdelta.hf import apply_to_model, remove_from_model

    model, base = llama_on(CUDA)
    before = {n: t.clone() for n, t in base.items()}
    dense = {n: torch.zeros_like(t).cpu() for n, t in base.items() if n.endswith("proj.weight")}
    for t in dense.values():
        t.view(-1)[::7] = 0.5
    delta = SparseDelta.from_dense(dense)  # a CPU delta, as loaded from a file
    apply_to_model(model, delta)
    for n, t in dense.items():
        close(model.get_parameter(n), before[n] + t.cuda(), rtol=0, atol=0)
    remove_from_model(model, delta)
    close(dict(model.named_parameters()), before, rtol=0, atol=0)


def test_sentiment_accuracy_on_cuda_equals_cpu(tiny_chat_lm_dir: str) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spdelta.recipes.evaluate import sentiment_accuracy

    tok = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    rows = Dataset.from_dict({"text": ["a good film", "dull", "great fun", "bad", "ok"] * 3,
                              "label": [1, 0, 1, 0, 1] * 3})
    accs = {}
    for d in (CPU, CUDA):
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir, dtype=F64).to(d).eval()
        accs[d] = sentiment_accuracy(model, tok, rows, batch_size=4)
    assert accs[CUDA] == accs[CPU]


def _train(model: str, data: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "spdelta", "train", "--model", model, "--data", str(data),
           "-o", str(out), "--batch-size", "4", "--max-length", "32", "--density", "0.05",
           "--lr", "0.01", "--calibration-examples", "8", "--no-progress", *extra]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def sums(tmp_path_factory: pytest.TempPathFactory, sums_file: Any) -> Path:
    return sums_file(tmp_path_factory.mktemp("data") / "sums.jsonl", 40)


def _delta(path: Path) -> Any:
    from spdelta.format import load_delta

    return load_delta(path)


@pytest.mark.parametrize("method", [("--method", "speft", "--metric", "magnitude"),
                                    ("--method", "spiel", "--update-every", "2",
                                     "--accumulate-steps", "2")])
def test_train_job_on_cuda_matches_cpu(tiny_lm_dir: str, sums: Path, tmp_path: Path,
                                       method: tuple[str, ...]) -> None:
    args = ("--steps", "6", *method)
    _train(tiny_lm_dir, sums, tmp_path / "cpu.st", *args, "--device", "cpu")
    _train(tiny_lm_dir, sums, tmp_path / "gpu.st", *args)  # the default: the GPU
    a, b = _delta(tmp_path / "cpu.st"), _delta(tmp_path / "gpu.st")
    for n in a:
        assert torch.equal(a[n].indices, b[n].indices), n
        close(b[n].values, a[n].values, rtol=1e-3, atol=1e-5)  # fp32 on two devices
    summary = json.loads((tmp_path / "gpu.st.log.json").read_text())["summary"]
    assert summary["device"].startswith("cuda")


def test_train_job_resume_on_cuda_is_bit_identical(tiny_lm_dir: str, sums: Path,
                                                   tmp_path: Path) -> None:
    args = ("--steps", "8", "--checkpoint-every", "3", "--method", "spiel", "--update-every", "2",
            "--accumulate-steps", "2")
    _train(tiny_lm_dir, sums, tmp_path / "full.st", *args)
    _train(tiny_lm_dir, sums, tmp_path / "part.st", *args, "--stop-after", "5")
    _train(tiny_lm_dir, sums, tmp_path / "part.st", *args, "--resume")
    a, b = _delta(tmp_path / "full.st"), _delta(tmp_path / "part.st")
    for n in a:
        assert torch.equal(a[n].indices, b[n].indices) and torch.equal(a[n].values, b[n].values)


def test_train_job_nf4_on_cuda(tiny_lm_dir: str, sums: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason="the NF4 base needs torchao (extra 'quant')")
    _train(tiny_lm_dir, sums, tmp_path / "q.st", "--steps", "3", "--nf4")
    assert _delta(tmp_path / "q.st").nnz > 0


def test_train_job_under_torchrun_with_nccl(tiny_lm_dir: str, sums: Path, tmp_path: Path
                                            ) -> None:
    """One rank, a real NCCL process group: the job runs on that rank's GPU."""
    out = tmp_path / "d.st"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "1", "-m", "spdelta", "train", "--model", tiny_lm_dir, "--data", str(sums), "-o",
           str(out), "--steps", "3", "--batch-size", "4", "--max-length", "32",
           "--calibration-examples", "8", "--no-progress"]
    subprocess.run(cmd, check=True)
    summary = json.loads(out.with_name("d.st.log.json").read_text())["summary"]
    assert summary["device"] == "cuda:0"


def test_a_cpu_checkpoint_resumes_on_cuda(tiny_lm_dir: str, sums: Path, tmp_path: Path) -> None:
    args = ("--steps", "6", "--checkpoint-every", "3", "--method", "spiel", "--update-every", "2",
            "--accumulate-steps", "2")
    _train(tiny_lm_dir, sums, tmp_path / "cpu.st", *args, "--device", "cpu")
    _train(tiny_lm_dir, sums, tmp_path / "mixed.st", *args, "--device", "cpu", "--stop-after", "3")
    _train(tiny_lm_dir, sums, tmp_path / "mixed.st", *args, "--resume")  # on the GPU
    a, b = _delta(tmp_path / "cpu.st"), _delta(tmp_path / "mixed.st")
    for n in a:
        assert torch.equal(a[n].indices, b[n].indices), n
        close(b[n].values, a[n].values, rtol=1e-3, atol=1e-5)
