"""Streaming merge vs plain safetensors read + write: peak memory and throughput.

Two synthetic deltas with the tensor shapes of Llama-2-7B (32 layers: q/k/v/o 4096x4096,
gate/up 11008x4096, down 4096x11008, two norms per layer; embed_tokens and lm_head
32000x4096; the final norm) at 1 % density with bf16 values are written once (streaming,
per tensor, seeded) to a temp dir. Then, each in a fresh subprocess:

- ``merge``: ``spdelta-merge a b -o out --force`` (``spdelta.cli.main.merge_main``, the
  console script's function), task arithmetic;
- ``plain``: per input file, ``safetensors.torch.load_file`` + ``save_file`` of the same
  tensors and metadata (reads and writes the same bytes, no maths);
- ``baseline``: the same interpreter importing torch and spdelta only.

Peak RSS is ``ru_maxrss`` of each subprocess minus the baseline's. Throughput is input
bytes / wall seconds (timed inside the subprocess, after imports). Medians over
``--repeats``. Targets: merge peak RSS <= 1.5 GB above the baseline; merge throughput >=
0.5x the plain read + write.

Example:
    python tools/bench/merge.py --scale 0.05          # 2 layers: a quick run
    nohup python tools/bench/merge.py --json > merge.log 2>&1 &   # full Llama-2-7B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from spdelta.delta import DeltaTensor
from spdelta.format import DeltaWriter

HIDDEN, INTER, VOCAB, LAYERS = 4096, 11008, 32000, 32
RSS_TARGET_BYTES = 1.5e9
RATIO_TARGET = 0.5

_CHILD = {
    "baseline": "pass",
    "merge": "from spdelta.cli.main import merge_main\n"
    "rc = merge_main([A, B, '-o', OUT, '--force'])\nassert rc == 0, rc",
    "plain": "from safetensors import safe_open\n"
    "from safetensors.torch import load_file, save_file\n"
    "for src, dst in ((A, OUT + '.a'), (B, OUT + '.b')):\n"
    "    with safe_open(src, 'pt') as f:\n"
    "        meta = f.metadata()\n"
    "    save_file(load_file(src), dst, metadata=meta)",
}
_PRELUDE = """
import json, resource, sys, time
import torch, spdelta.cli.main, safetensors.torch
A, B, OUT = sys.argv[1:4]
t0 = time.perf_counter()
{body}
wall = time.perf_counter() - t0
print(json.dumps({{"wall_s": wall,
                  "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def llama_shapes(scale: float, hidden: int = HIDDEN, inter: int = INTER,
                 vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """Llama-2-7B tensor names and shapes; ``scale`` < 1 keeps fewer decoder layers.

    ``hidden``, ``inter`` and ``vocab`` shrink the shapes for quick tests.
    """
    layers = max(1, round(LAYERS * scale))
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{m}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_delta(path: str, shapes: dict[str, tuple[int, ...]], density: float, seed: int) -> int:
    """Write a random delta tensor by tensor; return its nnz."""
    nnz = 0
    with DeltaWriter(path, metadata={"spdelta.base_model": "meta-llama/Llama-2-7b-hf"}) as w:
        for i, (name, shape) in enumerate(shapes.items()):
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            numel = 1
            for s in shape:
                numel *= s
            k = round(density * numel)
            idx = torch.unique(torch.randint(0, numel, (k,), generator=gen))
            values = (torch.randn(idx.numel(), generator=gen) * 1e-3).to(torch.bfloat16)
            w.write(name, DeltaTensor(shape, idx, values))
            nnz += idx.numel()
    return nnz


def run_child(kind: str, a: str, b: str, out: str) -> dict[str, float]:
    """Run one measurement in a fresh interpreter; return its wall time and peak RSS."""
    code = _PRELUDE.format(body=_CHILD[kind])
    done = subprocess.run(
        [sys.executable, "-c", code, a, b, out], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(a: str, b: str, out: str, repeats: int) -> dict[str, object]:
    """Median wall time and peak RSS of each kind, and the derived figures."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("baseline", "plain", "merge")}
    for _ in range(repeats):
        for kind in runs:  # interleaved, so drift hits both sides alike
            runs[kind].append(run_child(kind, a, b, out))
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "maxrss_bytes")}
        for k, v in runs.items()
    }
    in_bytes = os.path.getsize(a) + os.path.getsize(b)
    base = med["baseline"]["maxrss_bytes"]
    merge_rss = med["merge"]["maxrss_bytes"] - base
    merge_tp = in_bytes / med["merge"]["wall_s"]
    plain_tp = in_bytes / med["plain"]["wall_s"]
    return {
        "input_bytes": in_bytes,
        "output_bytes": os.path.getsize(out),
        "baseline_rss_bytes": base,
        "merge_wall_s": med["merge"]["wall_s"],
        "plain_wall_s": med["plain"]["wall_s"],
        "merge_rss_above_baseline_bytes": merge_rss,
        "plain_rss_above_baseline_bytes": med["plain"]["maxrss_bytes"] - base,
        "merge_throughput_bytes_per_s": merge_tp,
        "plain_throughput_bytes_per_s": plain_tp,
        "throughput_ratio": merge_tp / plain_tp,
        "rss_target_met": merge_rss <= RSS_TARGET_BYTES,
        "throughput_target_met": merge_tp / plain_tp >= RATIO_TARGET,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 32 layers")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="work folder (default: a temp dir, removed after)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        a, b, out = (os.path.join(tmp, n) for n in ("a.safetensors", "b.safetensors", "out.st"))
        shapes = llama_shapes(args.scale)
        t0 = time.perf_counter()
        nnz = [write_delta(p, shapes, args.density, seed) for seed, p in ((1, a), (2, b))]
        gen_s = time.perf_counter() - t0
        result = {
            "scale": args.scale,
            "density": args.density,
            "tensors": len(shapes),
            "nnz_per_input": nnz,
            "generate_s": gen_s,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            **measure(a, b, out, args.repeats),
        }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        gb = 1e9
        print(f"{len(shapes)} tensors, nnz {nnz}, inputs {result['input_bytes'] / gb:.3f} GB")
        print(
            f"merge: {result['merge_wall_s']:.2f} s, "
            f"{result['merge_throughput_bytes_per_s'] / 1e6:.1f} MB/s, peak RSS +"
            f"{result['merge_rss_above_baseline_bytes'] / gb:.3f} GB "
            f"(target <= 1.5: {result['rss_target_met']})"
        )
        print(
            f"plain safetensors read+write: {result['plain_wall_s']:.2f} s, "
            f"{result['plain_throughput_bytes_per_s'] / 1e6:.1f} MB/s, peak RSS +"
            f"{result['plain_rss_above_baseline_bytes'] / gb:.3f} GB"
        )
        print(
            f"throughput ratio {result['throughput_ratio']:.3f} "
            f"(target >= 0.5: {result['throughput_target_met']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
