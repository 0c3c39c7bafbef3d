"""Benchmark serving many sparse deltas on one base model, against peft LoRA.

Model: SmolLM2-135M-Instruct (``spdelta.recipes.assets``, offline) or ``--model DIR``, fp32,
``--threads`` threads, greedy decoding, the same ``--rows`` left-padded prompts and
``--new-tokens`` new tokens (EOS ignored) for every variant. Deltas: ``--deltas`` seeded
random deltas at ``--density`` on every linear weight of the blocks (q, k, v, o, gate,
up, down; not the head), values ``N(0, 1e-3)``, saved as ordinary delta files (with the
base fingerprint) and loaded from those files. LoRA: the same targets at rank
``r = round(nnz / sum(in + out))`` (as many trainable parameters), random A and B.

Variants (each with its own model, all in this one process, taking turns each round):
  base             the plain model (the limit).
  merged           one delta merged into the weights (``DeltaModel.activate``).
  mixed            ``DeltaModel`` with all the deltas; row ``b`` uses delta ``b % deltas``.
  peft_lora_mixed  peft with ``deltas`` LoRA adapters; ``generate(adapter_names=...)``, row
                   ``b`` on adapter ``b % deltas``.
  swap             ``activate`` + ``deactivate`` of one delta (median of ``--swap-reps``),
                   against peft ``merge_adapter`` + ``unmerge_adapter`` of one adapter.

Time: in each of ``--rounds`` rounds every variant runs one ``generate``; a logits
processor stamps the time at every step, so ``prefill_s`` is from the call to the first
step's logits (HF's setup and the prefill forward) and each gap between stamps is one
decode step (forward, greedy pick, cache update). Reported: the median prefill over the
rounds and the median decode step over all steps of all rounds (a step slowed by another
process on a shared machine moves a median little); ``prefill_tok_s`` counts the
prompts' real (unpadded) tokens, ``decode_tok_s`` is rows per decode step.

Memory: each variant also runs in a fresh child process (``MALLOC_MMAP_THRESHOLD_=131072``,
so freed buffers leave the resident set). After the imports it reads ``VmRSS``
(``rss_base``), builds the model and loads the deltas / adapters, generates once, and
reads the peak ``VmHWM``. ``peak_total_mb = VmHWM - rss_base``: the serving process's
peak, weights and loading included. The checkpoint's tensors may be mapped from the
file, resident only once touched; every variant reads one value per 4 KiB page of every
weight right after loading, so all of them hold the whole model from then on.
``model_mb`` is what is resident after building (weights + deltas or adapters),
``peak_generate_mb`` the extra peak of one ``generate`` (the counter is reset after
building; ``ru_maxrss`` where ``clear_refs`` is not writable).

Example:
    python tools/bench/serve.py --json
    python tools/bench/serve.py --json --model ./tiny --rows 4 --deltas 2 --new-tokens 4 \\
        --rounds 1 --swap-reps 2
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
from pathlib import Path
from typing import Any

import torch
from torch import nn
from train_step import _reset_peak_rss, _status_kb

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("base", "merged", "mixed", "peft_lora_mixed")
TEXT = ("The old lighthouse keeper wrote in his journal every evening about the ships, the "
        "weather over the bay, the birds that rested on the rocks, and the letters he never "
        "sent to his brother in the city far away across the mountains and the plains.")


def load_model(cfg: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The fp32 model (eval) and its tokenizer (left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    with torch.no_grad():  # fault in every page: the weights may be mapped from the file
        for t in (*model.parameters(), *model.buffers()):
            t.view(-1)[::1024].sum()
    return model.eval().requires_grad_(False), tok


def prompts(cfg: dict[str, Any], tok: Any) -> dict[str, torch.Tensor]:
    """``rows`` left-padded prompts of different lengths (8 to about 40 words)."""
    words = TEXT.split()
    texts = [" ".join(words[i % 7:i % 7 + 8 + (5 * i) % 33]) for i in range(cfg["rows"])]
    return dict(tok(texts, return_tensors="pt", padding=True))


def target_names(model: nn.Module) -> list[str]:
    """Every targeted linear weight of the blocks."""
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]


def write_deltas(cfg: dict[str, Any], folder: str) -> list[str]:
    """Save ``deltas`` seeded random deltas for the model; return their paths."""
    from spdelta import SparseDelta, save_delta
    from spdelta.format.constants import KEY_FINGERPRINT
    from spdelta.hf import fingerprint

    model, _ = load_model(cfg)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = target_names(model)
    gen = torch.Generator().manual_seed(cfg["seed"])
    base_fingerprint = fingerprint(model)  # base1: over every tensor of the checkpoint
    paths = []
    for k in range(cfg["deltas"]):
        entries = {}
        for n in names:
            nnz = round(cfg["density"] * params[n].numel())
            idx = torch.randperm(params[n].numel(), generator=gen)[:nnz].sort().values
            entries[n] = (tuple(params[n].shape), idx, torch.randn(nnz, generator=gen) * 1e-3)
        path = os.path.join(folder, f"delta{k}.safetensors")
        save_delta(SparseDelta(entries, metadata={KEY_FINGERPRINT: base_fingerprint}),
                   path)
        paths.append(path)
    return paths


def lora_rank(model: nn.Module, density: float) -> int:
    """``r = round(nnz / sum(in + out))``: about as many trainable values as a delta."""
    params = dict(model.named_parameters())
    names = target_names(model)
    nnz = sum(round(density * params[n].numel()) for n in names)
    return max(1, round(nnz / sum(sum(params[n].shape) for n in names)))


def build(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The model of variant ``name`` and how to call ``generate`` on it."""
    from spdelta.serve import DeltaModel

    model, tok = load_model(cfg)
    rows = [f"d{b % cfg['deltas']}" for b in range(cfg["rows"])]
    out: dict[str, Any] = {"model": model, "tok": tok, "kw": {}, "gen": model.generate}
    if name in ("merged", "mixed"):
        paths = cfg["paths"][:1] if name == "merged" else cfg["paths"]
        dm = DeltaModel(model, {f"d{k}": p for k, p in enumerate(paths)})
        out["dm"] = dm
        if name == "merged":
            dm.activate("d0")
        else:
            out["gen"], out["kw"] = dm.generate, {"deltas": rows}
    elif name == "peft_lora_mixed":
        from peft import LoraConfig, get_peft_model

        r = lora_rank(model, cfg["density"])
        lora = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(TARGETS),
                          init_lora_weights=False)  # random A and B: a trained adapter's cost
        torch.manual_seed(cfg["seed"])
        peft_model = get_peft_model(model, lora, adapter_name="a0")
        for k in range(1, cfg["deltas"]):
            peft_model.add_adapter(f"a{k}", lora)
        peft_model.eval()
        out.update(model=peft_model, gen=peft_model.generate, rank=r,
                   kw={"adapter_names": [f"a{b % cfg['deltas']}" for b in range(cfg["rows"])]})
    return out


class StepTimer:
    """A logits processor that records when each generation step reaches it.

    ``generate`` calls it once per step, right after the model's forward: the first
    call ends the prefill, the gaps between calls are the decode steps.
    """

    def __init__(self) -> None:
        self.start, self.stamps = time.perf_counter(), []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def generate(v: dict[str, Any], batch: dict[str, torch.Tensor], tokens: int,
             timer: StepTimer | None = None) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``tokens`` new tokens."""
    from transformers import LogitsProcessorList

    extra = {"logits_processor": LogitsProcessorList([timer])} if timer else {}
    with torch.no_grad():
        return v["gen"](**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                        pad_token_id=v["tok"].pad_token_id, **v["kw"], **extra)  # type: ignore[no-any-return]


def measure_time(names: list[str], cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Prefill and decode throughput of every variant, taking turns over the rounds."""
    torch.set_num_threads(cfg["threads"])
    built = {n: build(n, cfg) for n in names}
    batch = prompts(cfg, built[names[0]]["tok"])
    real = int(batch["attention_mask"].sum())
    prefill: dict[str, list[float]] = {n: [] for n in names}
    steps: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        generate(built[n], batch, 2)
    for _ in range(cfg["rounds"]):
        for n in names:
            timer = StepTimer()
            out = generate(built[n], batch, cfg["new_tokens"], timer)
            assert out.shape[1] == batch["input_ids"].shape[1] + cfg["new_tokens"]
            prefill[n].append(timer.stamps[0] - timer.start)
            steps[n] += [b - a for a, b in zip(timer.stamps[:-1], timer.stamps[1:], strict=True)]
    res = {}
    for n in names:
        pre, step = statistics.median(prefill[n]), statistics.median(steps[n])
        res[n] = {"prefill_s": pre, "decode_step_s": step, "prefill_tok_s": real / pre,
                  "decode_tok_s": cfg["rows"] / step, "prompt_tokens": real,
                  "prefill_s_all": prefill[n], "decode_step_s_all": steps[n]}
        if "rank" in built[n]:
            res[n]["lora_rank"] = built[n]["rank"]
        if "dm" in built[n]:
            res[n]["delta_mb"] = built[n]["dm"].nbytes() / 2**20
    if "mixed" in built and "peft_lora_mixed" in built:
        res["swap"] = measure_swap(built["mixed"]["dm"], built["peft_lora_mixed"]["model"], cfg)
    return res


def measure_swap(dm: Any, peft_model: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Median time of activate + deactivate vs peft merge_adapter + unmerge_adapter."""
    ours, theirs = [], []
    peft_model.set_adapter("a0")
    for _ in range(cfg["swap_reps"] + 2):
        start = time.perf_counter()
        dm.activate("d0")
        dm.deactivate()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
        theirs.append(time.perf_counter() - start)
    ours, theirs = ours[2:], theirs[2:]  # the first two warm up
    return {"spdelta_s": statistics.median(ours), "peft_s": statistics.median(theirs),
            "spdelta_s_all": ours, "peft_s_all": theirs}


def measure_memory(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of building variant ``name`` and one ``generate`` (see the module doc)."""
    import gc
    import resource

    import peft  # noqa: F401  (imported by every child alike, before the baseline)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import spdelta.serve  # noqa: F401

    torch.set_num_threads(cfg["threads"])
    gc.collect()
    rss_base = _status_kb("VmRSS")
    v = build(name, cfg)
    batch = prompts(cfg, v["tok"])
    gc.collect()
    rss_built = _status_kb("VmRSS")
    peak_build = _status_kb("VmHWM")
    exact = _reset_peak_rss()
    generate(v, batch, cfg["new_tokens"])
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_total_mb": (max(peak, peak_build) - rss_base) / 1024,
            "model_mb": (rss_built - rss_base) / 1024,
            "peak_generate_mb": (peak - rss_built) / 1024, "rss_base_mb": rss_base / 1024,
            "mem_method": "VmHWM-after-clear_refs" if exact else "ru_maxrss"}


def run_child(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``measure_memory(name)`` in a fresh Python process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--config", json.dumps(cfg)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def summarize(res: dict[str, dict[str, Any]], files_mb: float) -> dict[str, Any]:
    """Ratios and the issue's targets, all from this run."""
    def get(v: str, f: str) -> float | None:
        return res.get(v, {}).get(f)

    ratios: dict[str, float] = {}
    for phase in ("prefill", "decode"):
        for a, b in (("mixed", "base"), ("mixed", "peft_lora_mixed"), ("merged", "base"),
                     ("peft_lora_mixed", "base")):
            x, y = get(a, f"{phase}_tok_s"), get(b, f"{phase}_tok_s")
            if x is not None and y is not None:
                ratios[f"{phase}_{a}_over_{b}"] = x / y
    swap = res.get("swap")
    if swap:
        ratios["swap_over_peft"] = swap["spdelta_s"] / swap["peft_s"]
    targets: dict[str, Any] = {}
    for key, bound, op in (("decode_mixed_over_base", 0.8, ">="),
                           ("decode_mixed_over_peft_lora_mixed", 1.0, ">="),
                           ("swap_over_peft", 0.1, "<=")):
        if key in ratios:
            ok = ratios[key] >= bound if op == ">=" else ratios[key] <= bound
            targets[key] = {"value": ratios[key], "target": f"{op} {bound}", "met": ok}
    mixed, base = get("mixed", "peak_total_mb"), get("base", "peak_total_mb")
    if mixed is not None and base is not None:
        targets["peak_mixed_mb"] = {"value": mixed, "target": f"<= {base + 2 * files_mb:.1f} "
                                    f"(base {base:.1f} + 2 x files {files_mb:.1f})",
                                    "met": mixed <= base + 2 * files_mb}
    return {"ratios": ratios, "targets": targets}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: SmolLM2-135M-Instruct, offline)")
    for flag, default in (("rows", 16), ("deltas", 8), ("new_tokens", 32), ("rounds", 3),
                          ("swap_reps", 20), ("threads", 2), ("seed", 0)):
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int, default=default)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (swap runs when "
                        "mixed and peft_lora_mixed both do)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the deltas, measure memory in children and time here, print the JSON report."""
    a = parse(argv)
    if a.child:
        print(json.dumps(measure_memory(a.child, json.loads(a.config))))
        return 0
    if a.model is None:
        from spdelta.recipes.assets import smollm2_checkpoint

        a.model = str(smollm2_checkpoint())
    keys = ("model", "rows", "deltas", "new_tokens", "rounds", "swap_reps", "threads", "seed",
            "density")
    cfg: dict[str, Any] = {k: getattr(a, k) for k in keys}
    names = a.variants.split(",")
    bad = sorted(set(names) - set(VARIANTS))
    if bad:
        raise SystemExit(f"serve bench: error: unknown variants {bad}; choose from {VARIANTS}")
    with tempfile.TemporaryDirectory(prefix="spdelta-serve-bench-") as folder:
        cfg["paths"] = write_deltas(cfg, folder)
        files_mb = sum(Path(p).stat().st_size for p in cfg["paths"]) / 2**20
        results: dict[str, dict[str, Any]] = {n: {} for n in names}
        for n in names if not a.no_memory else []:
            results[n].update(run_child(n, cfg))
            if not a.json:
                print(n, "memory", json.dumps(results[n]), file=sys.stderr, flush=True)
        for n, timing in measure_time(names, cfg).items():
            results.setdefault(n, {}).update(timing)
    cfg.pop("paths")
    report = {"config": {**cfg, "torch": torch.__version__, "delta_files_mb": files_mb},
              "results": results, **summarize(results, files_mb)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
