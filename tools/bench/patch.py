"""Exact patches: a real fine-tune's diff, and diff/apply throughput vs plain read + write.

(a) ``finetune``: SmolLM2-135M-Instruct (``spdelta.recipes.assets``, offline) is trained for
``--steps`` AdamW steps at ``--lr`` (fp32 master weights, as trainers keep them) on Rotten
Tomatoes sentiment prompts; the bf16 casts of the weights (what a trainer ships to an
inference server) are saved before training, after step ``steps - 1`` and after step
``steps``. ``spdelta diff`` of step 0 -> ``steps`` (a published fine-tune) and of step
``steps - 1`` -> ``steps`` (one RL sync) gives: the changed fraction of elements, patch
bytes per changed entry, the patch size against the checkpoint and against the
``(int32 index, bf16 value)`` layout (6 bytes per entry). Applying each patch is checked
to reproduce the tuned checkpoint bit for bit.

(b) ``synthetic``: a Llama-2-7B-shaped bf16 checkpoint (q/k/v/o 4096x4096, gate/up
11008x4096, down 4096x11008, norms, embed_tokens and lm_head 32000x4096; ``--layers`` of
the 32 decoder layers, sharded at ``--shard-gb``) and a tuned copy in which a fraction
(``--fractions``, default 1 % and 10 %) of the elements changed by one unit in the last
place, at uniformly random positions. Each measurement runs in a fresh interpreter,
interleaved over ``--repeats`` rounds, with its output removed beforehand:

- ``plain``: per shard of the base, ``safetensors.torch.load_file`` + ``save_file`` (the
  same bytes read and written, no maths);
- ``diff``: ``spdelta diff BASE TUNED -o patch.st``;
- ``apply``: ``spdelta apply --base BASE --delta patch.st -o OUT``;
- ``baseline``: the same interpreter importing torch, safetensors and spdelta only.

Throughput is the checkpoint's tensor bytes over the wall time measured inside the child
after its imports (medians), beside its CPU time (user + system: a run whose CPU time is
far below its wall time waits for the disk). Peak RSS is each child's ``VmHWM`` (its peak
resident size since ``exec``; ``ru_maxrss`` would include the parent's pages held between
fork and exec) minus the baseline's. Targets: patch bytes per changed bf16 entry <= 0.6x
the 6-byte layout at 1 %; diff and apply >= 0.5x the plain throughput; peak RSS <= 1.5 GB
above the baseline. ``--profile`` adds one cProfile'd diff and apply per fraction.

Example:
    python tools/bench/patch.py --json --layers 4                   # both parts
    python tools/bench/patch.py --json --parts synthetic --layers 32 --dir /big/disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from merge import HIDDEN, INTER, LAYERS, VOCAB, llama_shapes  # tools/bench/merge.py
from safetensors.torch import save_file

INT32_BF16 = 6  # bytes per entry of the (int32 flat index, bf16 value) layout
BYTES_TARGET, RATIO_TARGET, RSS_TARGET = 0.6, 0.5, 1.5e9

_PRELUDE = """
import cProfile, io, json, os, pstats, resource, sys, time
import torch, safetensors.torch, spdelta.cli.main
A, B, C, D, PROFILE = sys.argv[1:6]
profiler = cProfile.Profile() if PROFILE == "1" else None
cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
if profiler is not None:
    profiler.enable()
{body}
if profiler is not None:
    profiler.disable()
wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
# VmHWM: the peak resident size of this program since exec (ru_maxrss would also count the
# parent's pages this process held between fork and exec)
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
out = {{"wall_s": wall, "maxrss_bytes": hwm * 1024,
        "user_s": cpu1.ru_utime - cpu0.ru_utime, "system_s": cpu1.ru_stime - cpu0.ru_stime,
        "major_faults": cpu1.ru_majflt - cpu0.ru_majflt}}
if profiler is not None:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    out["profile"] = [l for l in text.getvalue().splitlines() if l.strip()][-15:]
print(json.dumps(out))
"""
_CHILD = {
    "baseline": "pass",
    "plain": "import os\nfrom safetensors import safe_open\n"
    "from safetensors.torch import load_file, save_file\nos.makedirs(C, exist_ok=True)\n"
    "for shard in sorted(f for f in os.listdir(A) if f.endswith('.safetensors')):\n"
    "    with safe_open(os.path.join(A, shard), 'pt') as f:\n"
    "        meta = f.metadata()\n"
    "    save_file(load_file(os.path.join(A, shard)), os.path.join(C, shard), metadata=meta)",
    "diff": "from spdelta.cli.main import main\n"
    "assert main(['diff', A, B, '-o', D, '--force']) == 0",
    "apply": "from spdelta.cli.main import main\n"
    "assert main(['apply', '--base', A, '--delta', D, '-o', C, '--force']) == 0",
}


def _tensor(name: str, shape: tuple[int, ...], seed: int, fraction: float) -> torch.Tensor:
    """A seeded bf16 tensor; with ``fraction`` > 0, that fraction of it one ulp away."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    if fraction > 0:
        flip = torch.rand(shape, generator=gen) < fraction
        t.view(torch.int16)[flip] ^= 1  # the last mantissa bit: a 1-ulp change
    return t


def write_checkpoint(folder: Path, shapes: dict[str, tuple[int, ...]], fraction: float,
                     shard_bytes: float) -> int:
    """A sharded checkpoint with its index, one shard in memory at a time; returns bytes."""
    folder.mkdir(parents=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: _tensor(n, shapes[n], seed=j, fraction=fraction)
                for j, n in enumerate(shapes) if n in names}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in part.values())
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def run_child(kind: str, *paths: Path, profile: bool = False) -> dict[str, Any]:
    """One measurement in a fresh interpreter: wall and CPU time, peak RSS (and a profile)."""
    code = _PRELUDE.format(body=_CHILD[kind])
    argv = [sys.executable, "-c", code, *map(str, paths), "1" if profile else "0"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def synthetic(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Part (b): diff and apply of a 7B-shaped pair vs plain read + write, per fraction."""
    shapes = llama_shapes(args.layers / LAYERS, args.hidden, args.intermediate, args.vocab)
    base = work / "base"
    t0 = time.perf_counter()
    nbytes = write_checkpoint(base, shapes, 0.0, args.shard_gb * 1e9)
    out: dict[str, Any] = {"layers": args.layers, "tensors": len(shapes),
                           "checkpoint_bytes": nbytes, "fractions": {}}
    for fraction in args.fractions:
        tuned, patch, dest = work / "tuned", work / "patch.st", work / "out"
        _clear(tuned, patch, dest)
        write_checkpoint(tuned, shapes, fraction, args.shard_gb * 1e9)
        out["generate_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in _CHILD}
        for _ in range(args.repeats):
            for kind in ("baseline", "plain", "diff", "apply"):
                _clear(dest)
                runs[kind].append(run_child(kind, base, tuned, dest, patch))
        out["fractions"][str(fraction)] = _figures(runs, nbytes, patch)
        if args.profile:  # one more run of each under cProfile: where the time goes
            for kind in ("diff", "apply"):
                _clear(dest)
                prof = run_child(kind, base, tuned, dest, patch, profile=True)
                out["fractions"][str(fraction)][f"{kind}_profile"] = prof
        _clear(tuned, patch, dest)
    _clear(base)
    return out


def _figures(runs: dict[str, list[dict[str, Any]]], nbytes: int, patch: Path
             ) -> dict[str, Any]:
    from spdelta.format import read_header

    med = {k: {m: statistics.median(r[m] for r in v)
               for m in ("wall_s", "maxrss_bytes", "user_s", "system_s")} for k, v in runs.items()}
    base_rss = med["baseline"]["maxrss_bytes"]
    nnz = sum(i.nnz for i in read_header(patch)[1].values())
    size = patch.stat().st_size
    plain_tp = nbytes / med["plain"]["wall_s"]
    fig: dict[str, Any] = {"nnz": nnz, "changed_fraction": nnz / (nbytes // 2),
                           "patch_bytes": size, "bytes_per_changed_entry": size / nnz,
                           "over_int32_bf16": size / (INT32_BF16 * nnz),
                           "plain_wall_s": med["plain"]["wall_s"],
                           "plain_throughput_bytes_per_s": plain_tp,
                           "baseline_rss_bytes": base_rss}
    for kind in ("diff", "apply"):
        tp = nbytes / med[kind]["wall_s"]
        rss = med[kind]["maxrss_bytes"] - base_rss
        fig.update({f"{kind}_wall_s": med[kind]["wall_s"], f"{kind}_throughput_bytes_per_s": tp,
                    f"{kind}_cpu_s": med[kind]["user_s"] + med[kind]["system_s"],
                    f"{kind}_over_plain": tp / plain_tp, f"{kind}_rss_above_baseline_bytes": rss,
                    f"{kind}_throughput_target_met": tp / plain_tp >= RATIO_TARGET,
                    f"{kind}_rss_target_met": rss <= RSS_TARGET})
    fig["plain_rss_above_baseline_bytes"] = med["plain"]["maxrss_bytes"] - base_rss
    fig["plain_cpu_s"] = med["plain"]["user_s"] + med["plain"]["system_s"]
    fig["runs"] = runs
    return fig


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from _patch_finetune import finetune  # part (a), beside this file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="finetune,synthetic", help="comma-separated parts to run")
    p.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of the 7B shape")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--intermediate", type=int, default=INTER)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.01, 0.1], help="changed fractions of the synthetic pair")
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size of the checkpoints")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", help="fine-tune this checkpoint dir (default SmolLM2-135M)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the model's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one cProfile'd diff and apply per fraction")
    p.add_argument("--dir", help="work folder (default: a temp dir; removed after)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    report: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats,
                              "cpu_count": os.cpu_count(),
                              "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if "finetune" in parts:
            report["finetune"] = finetune(args, Path(tmp) / "finetune")
        if "synthetic" in parts:
            report["synthetic"] = synthetic(args, Path(tmp) / "synthetic")
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=1) if args.json else _text(report))
    return 0


def _text(report: dict[str, Any]) -> str:
    lines = []
    for name, d in report.get("finetune", {}).get("diffs", {}).items():
        lines.append(f"finetune {name}: {d['changed_fraction']:.4%} changed, "
                     f"{d['bytes_per_changed_entry']:.3f} B/entry "
                     f"({d['over_int32_bf16']:.3f}x int32+bf16), "
                     f"{d['patch_over_checkpoint']:.4f}x the checkpoint")
    for f, d in report.get("synthetic", {}).get("fractions", {}).items():
        lines.append(f"synthetic {float(f):.0%}: {d['bytes_per_changed_entry']:.3f} B/entry; "
                     f"diff {d['diff_over_plain']:.2f}x plain, apply {d['apply_over_plain']:.2f}x; "
                     f"RSS +{d['diff_rss_above_baseline_bytes'] / 1e9:.2f} / "
                     f"+{d['apply_rss_above_baseline_bytes'] / 1e9:.2f} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
