"""Benchmark ways to add per-row sparse delta products to one linear layer's output.

The question ``spdelta.serve`` had to answer: for a batch of ``--rows`` rows spread
evenly over ``--deltas`` deltas of density ``--density``, what is the fastest pure-
PyTorch way to compute ``y[b] = x[b] W^T + x[b] D_{k(b)}^T`` for every row, at decode
(1 token a row) and at prefill (``--prefill`` tokens a row)? Each method below gets the
same inputs, is checked against a dense float64 reference, and is timed side by side
on every linear shape of one SmolLM2-135M block, the rounds interleaved. Both the median
and the best (minimum) time of each are reported; on a shared machine the best is the
least disturbed view of what a method costs, the median what a busy machine gives:

  base            ``F.linear(x, W)`` alone: the floor every method adds to.
  csr_blockdiag   what spdelta.serve uses: ONE ``torch.sparse.mm`` of the block-diagonal
                  CSR ``blockdiag(D_1..D_K)`` (int32 indices) with the rows' inputs grouped
                  by delta, then one ``index_add_`` back (spdelta.serve._plan.add_products).
  csr_per_delta   a CSR ``torch.sparse.mm`` per delta on its rows (K products).
  gather_index_add  ``index_select`` of the inputs at each entry's column, times the
                  values, ``index_add_`` at each entry's row (all deltas at once, grouped).
  gather_per_row  the same with each row's entries expanded (``gather``/``scatter_add_``
                  over ``rows x nnz``): no grouping, but every row reads its indices.
  coo             ``torch.sparse.mm`` of a block-diagonal COO matrix.
  dense_rows      each delta's touched rows and columns as a small dense matrix, one
                  ``F.linear`` per delta (a random 1 % support touches every row and column,
                  so these are the full dense ``D_k``: the best case for dense products).

Example:
    python tools/bench/serve_kernels.py --json
    python tools/bench/serve_kernels.py --json --threads 1 --prefill 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spdelta.serve._bank import Bank, block_matrix, part_from_indices
from spdelta.serve._plan import RowPlan, add_products

#: (out, in) of q, k, v, o, gate, up, down in one SmolLM2-135M block.
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = ["q", "k", "v", "o", "gate", "up", "down"]
Method = Callable[[], Tensor]


def make_layer(out_f: int, in_f: int, cfg: dict[str, Any], tokens: int,
               gen: torch.Generator) -> dict[str, Any]:
    """Weight, inputs, K deltas (sorted flat indices, values) and the row -> delta map."""
    k, rows = cfg["deltas"], cfg["rows"]
    nnz = round(cfg["density"] * out_f * in_f)
    idx = [torch.randperm(out_f * in_f, generator=gen)[:nnz].sort().values for _ in range(k)]
    return {"w": torch.randn(out_f, in_f, generator=gen) * 0.05,
            "x": torch.randn(rows, tokens, in_f, generator=gen),
            "idx": idx, "val": [torch.randn(nnz, generator=gen) * 1e-2 for _ in range(k)],
            "slot": [b % k for b in range(rows)], "out": out_f, "in": in_f}


def reference(lay: dict[str, Any]) -> Tensor:
    """float64 ``x (W + D_k)^T`` row by row."""
    y = torch.empty(lay["x"].shape[0], lay["x"].shape[1], lay["out"], dtype=torch.float64)
    for b, s in enumerate(lay["slot"]):
        d = torch.zeros(lay["out"] * lay["in"], dtype=torch.float64)
        d[lay["idx"][s]] = lay["val"][s].double()
        y[b] = lay["x"][b].double() @ (lay["w"].double() + d.view(lay["out"], lay["in"])).T
    return y


def methods(lay: dict[str, Any]) -> dict[str, Method]:
    """Every method as a closure over prepared data (preparation is not timed)."""
    x, w, out_f, in_f = lay["x"], lay["w"], lay["out"], lay["in"]
    parts = [part_from_indices(i, v, out_f, in_f, transposed=False, index_dtype=torch.int32)
             for i, v in zip(lay["idx"], lay["val"], strict=True)]
    bank = Bank(out_f, in_f, list(parts), dtype=torch.float32, device=x.device)
    plan = RowPlan(lay["slot"])
    k, g = len(plan.present), plan.groups
    src = plan.src
    rows = [torch.tensor([b for b, s in enumerate(lay["slot"]) if s == j]) for j in range(k)]
    rk = torch.cat([i // in_f + j * out_f for j, i in enumerate(lay["idx"])])
    ck = torch.cat([i % in_f + j * in_f for j, i in enumerate(lay["idx"])])
    vk = torch.cat(lay["val"])
    coo = torch.sparse_coo_tensor(torch.stack([rk, ck]), vk, (k * out_f, k * in_f),
                                  check_invariants=False).coalesce()
    per = [block_matrix([p], out_f, in_f) for p in parts]
    dense = [torch.zeros(out_f * in_f).index_put_((i,), v).view(out_f, in_f)
             for i, v in zip(lay["idx"], lay["val"], strict=True)]
    cap = rk.numel() // k
    r_rows = torch.stack([i // in_f for i in lay["idx"]])[torch.tensor(lay["slot"])]
    c_rows = torch.stack([i % in_f for i in lay["idx"]])[torch.tensor(lay["slot"])]
    v_rows = torch.stack(lay["val"])[torch.tensor(lay["slot"])]
    tokens = x.shape[1]

    def grouped(y: Tensor, ys: Tensor) -> Tensor:
        return y.index_add_(0, src, ys.view(g, tokens, k, out_f).transpose(1, 2)
                            .reshape(g * k, tokens, out_f))

    def gather_index_add() -> Tensor:
        xg = x.index_select(0, src).view(g, k, tokens, in_f).transpose(1, 2)
        xs = xg.reshape(g * tokens, k * in_f).index_select(1, ck).mul_(vk)
        ys = torch.zeros(g * tokens, k * out_f).index_add_(1, rk, xs)
        return grouped(F.linear(x, w), ys)

    def gather_per_row() -> Tensor:
        n = x.shape[0]
        xs = x.gather(2, c_rows[:, None].expand(n, tokens, cap)) * v_rows[:, None]
        return F.linear(x, w).scatter_add_(2, r_rows[:, None].expand(n, tokens, cap), xs)

    def csr_per_delta() -> Tensor:
        y = F.linear(x, w)
        for j in range(k):
            xj = x.index_select(0, rows[j]).reshape(-1, in_f)
            y.index_add_(0, rows[j], torch.sparse.mm(per[j], xj.t()).t()
                         .reshape(len(rows[j]), tokens, out_f))
        return y

    def coo_mm() -> Tensor:
        xt = x.index_select(0, src).view(g, k, tokens, in_f).permute(1, 3, 0, 2)
        yt = torch.sparse.mm(coo, xt.reshape(k * in_f, g * tokens))
        return F.linear(x, w).index_add_(0, src, yt.view(k, out_f, g, tokens)
                                         .permute(2, 0, 3, 1).reshape(g * k, tokens, out_f))

    def dense_rows() -> Tensor:
        y = F.linear(x, w)
        for j in range(k):
            y.index_add_(0, rows[j], F.linear(x.index_select(0, rows[j]), dense[j]))
        return y

    return {"base": lambda: F.linear(x, w),
            "csr_blockdiag": lambda: add_products(F.linear(x, w), x, plan.matrix(bank), plan),
            "csr_per_delta": csr_per_delta, "gather_index_add": gather_index_add,
            "gather_per_row": gather_per_row, "coo": coo_mm, "dense_rows": dense_rows}


def time_phase(cfg: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Median time of every method on every shape; sums over the block's seven linears."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    layers = [make_layer(o, i, cfg, tokens, gen) for o, i in SHAPES]
    fns = [methods(lay) for lay in layers]
    for lay, fn in zip(layers, fns, strict=True):  # every method computes the same thing
        want = reference(lay)
        for name, f in fn.items():
            if name != "base":
                torch.testing.assert_close(f().double(), want, rtol=1e-4, atol=1e-4)
    names = list(fns[0])
    times: dict[str, list[list[float]]] = {n: [[] for _ in SHAPES] for n in names}
    for _ in range(cfg["rounds"]):
        for s, fn in enumerate(fns):
            for n in names:
                for _ in range(cfg["reps"]):
                    start = time.perf_counter()
                    fn[n]()
                    times[n][s].append(time.perf_counter() - start)
    med = {n: [statistics.median(t) for t in times[n]] for n in names}
    best = {n: [min(t) for t in times[n]] for n in names}
    out: dict[str, Any] = {"tokens_per_row": tokens}
    for label, per in (("median", med), ("best", best)):
        block = {n: sum(v) for n, v in per.items()}
        out[label] = {
            "block_us": {n: v * 1e6 for n, v in block.items()},
            "delta_cost_over_base": {n: (v - block["base"]) / block["base"]
                                     for n, v in block.items() if n != "base"},
            "per_layer_us": {n: {f"{name} {o}x{i}": t * 1e6 for name, (o, i), t
                                 in zip(LAYERS, SHAPES, v, strict=True)}
                             for n, v in per.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the decode and prefill comparisons and print JSON."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("rows", 16), ("deltas", 8), ("prefill", 32), ("threads", 2),
                          ("rounds", 5), ("reps", 10), ("seed", 0)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    a = p.parse_args(argv)
    cfg = {k: getattr(a, k) for k in ("rows", "deltas", "prefill", "threads", "rounds", "reps",
                                      "seed", "density")}
    torch.set_num_threads(cfg["threads"])
    report = {"config": {**cfg, "torch": torch.__version__},
              "decode": time_phase(cfg, 1), "prefill": time_phase(cfg, cfg["prefill"])}
    if not a.json:
        for phase in ("decode", "prefill"):
            best = report[phase]["best"]["delta_cost_over_base"]
            median = report[phase]["median"]["delta_cost_over_base"]
            for n, v in sorted(best.items(), key=lambda t: t[1]):
                print(f"{phase:8s} {n:18s} +{v:7.1%} of base (best), +{median[n]:7.1%} (median)",
                      file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
