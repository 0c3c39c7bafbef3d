"""Benchmark one training step: spdelta (static, SpIEL, reference, NF4) vs LoRA, full, frozen.

Same random-init Llama (same seed), same data and thread count for every variant.
Time: all variants live in this one process, each with its own model; after
``--warmup`` steps each, they take turns for ``--steps`` rounds, so load from other
processes on a shared machine hits all variants alike. In each round a variant runs
two steps in a row and the second is timed (``step_s`` is the median of those): a
step that follows another variant's step finds the allocator and caches holding that
other model's buffers, which a training run never does (in side-by-side A/B runs of
the default config such steps of ``spdelta_static`` ran 2-8 % slower; on a busy
machine the difference drowns in the noise). Their median is reported too, as
``step_s_after_other``. ``cpu_s`` is the median process CPU time of a timed step (all
threads), a second view that is less sensitive to being descheduled than wall time.
Memory: each variant runs ``--mem-steps`` steps in its own fresh child process.

Memory method: a child first imports everything it will use (torch, transformers,
spdelta, peft / torchao where the variant needs them) and reads its resident set
size ``VmRSS`` (``rss_base_mb``: interpreter + libraries, no model). It then builds
the model, data and trainable state (for ``spdelta_static_nf4`` it also quantises the
targets and drops the fp32 copies), collects garbage, reads ``VmRSS`` again
(``rss_before_mb``), resets the kernel's peak-RSS counter by writing ``5`` to
``/proc/self/clear_refs``, runs the steps, and reads the peak (``VmHWM``). So:

  ``peak_mb``        ``VmHWM - rss_before``: the extra memory the steps need on top of
                     what is resident before them (activations, gradients, optimizer
                     moments created on the first step, transient buffers).
  ``model_mb``       ``rss_before - rss_base``: what is resident before the first step:
                     every model weight (fp32, or NF4 for the targets), the batch, the
                     support / values / zero optimizer state (LoRA: adapters; full:
                     nothing extra yet: AdamW moments appear during the first step).
  ``peak_total_mb``  ``VmHWM - rss_base`` = ``model_mb + peak_mb``: the process peak
                     while training, model weights included, library baseline excluded.
                     This is the number the NF4 comparison uses.
  ``weights_mb``     not RSS: the byte count of the model's parameters and buffers
                     (NF4: its packed codes and scales), for reference.
  ``rss_peak_mb``    the absolute ``VmHWM`` (libraries included).

NF4 weight-dominated config (``--nf4-config``): at the default config the activations
(about 800 MB) dominate the peak, so NF4 weights cannot halve it whatever they save. When
``spdelta_static_nf4`` is among the variants, its memory and that of ``spdelta_static``
are also measured at a second config where the weights dominate (default
``hidden=2048,intermediate=5504,batch=1,seq=128``, the rest as given), reported under
``nf4_weight_dominated`` with its own config and ratios (memory only, no timing).
Both ratios are reported; ``weights_mb`` gives the model-only bytes of each.

Model-building transients (e.g. the fp32 weights before NF4 quantisation) are not in
any of them (the counter is reset after building). The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc serves every buffer >= 128 KiB by mmap
and returns it to the OS on free: RSS then tracks live tensors instead of freed heap
(the default threshold adapts upward after frees and can keep freed weights resident).
Where ``clear_refs`` is not writable, ``ru_maxrss`` is used (then the peaks also
include model-building transients) and ``mem_method`` says so.

SpIEL time (``spdelta_spiel``): AG regrowth, ``update_every=20``,
``accumulate_steps=5``, AdamW, ``total_steps`` 10**6 (the prune fraction stays ~0.2).
Its state starts at step 14 and warms up through steps 15..20 (an ordinary step, the
5-step AG window with dense gradients, and the prune/regrow at step 20), then exactly
``--spiel-cycles`` full 20-step cycles (steps 21..40, ...) are timed, spread evenly over
the ``--steps`` round-robin rounds. ``step_s`` is the AMORTISED time: the total wall
time of those cycles / their number of steps (likewise ``cpu_s``); the medians of
ordinary, AG-window and regrow steps are reported too. Its memory child starts at
step 14 and runs ``max(--mem-steps, 7)`` steps so the AG window and regrow are in it.

Variants (``--variants``):
  spdelta_static       make_loss_fn(impl="fast"), spdelta.functional.eager_grad_and_value,
                       sparse AdamW on the values
  spdelta_static_func  the same with torch.func.grad_and_value (keeps saved tensors to the
                       end of backward: create_graph=True), for comparison
  spdelta_spiel        SpIEL (AG regrowth) via spdelta.train.spiel.make_spiel_step, fast path,
                       same initial support as spdelta_static; amortised step time (above)
  spdelta_static_nf4   spdelta_static with the target linear weights in NF4
                       (spdelta.quant.to_nf4, block 64); the module holds the NF4 tensors
                       (the fp32 targets are freed); embeddings / lm_head / norms stay fp32;
                       fast path: SparseDeltaLinear dequantises per op, keeps no dense W
  spdelta_reference    impl="reference" (naive dense merge), eager_grad_and_value
  lora               peft LoRA on the same targets, r = round(nnz / sum(in + out))
  full               full fine-tuning with torch.optim.AdamW
  frozen             all weights frozen; backward to the input embeddings only

Example:
    python tools/bench/train_step.py --json                       # default config
    python tools/bench/train_step.py --json --variants spdelta_static,spdelta_static_nf4 \
        --nf4-config hidden=1024,intermediate=2752,batch=1,seq=128   # cheaper NF4 config
    python tools/bench/train_step.py --json --hidden 128 --layers 2 --vocab 1000 \\
        --intermediate 344 --batch 2 --seq 64 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("spdelta_static", "spdelta_spiel", "spdelta_reference", "lora", "full", "frozen",
            "spdelta_static_nf4", "spdelta_static_func")
DEFAULT_VARIANTS = VARIANTS[:-1]
SPIEL_EVERY, SPIEL_ACC, SPIEL_START, SPIEL_TOTAL = 20, 5, 14, 10**6
Step = Callable[[], float]


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` (fp32, seeded) from the bench config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["seed"])  # HF init draws from the global generator.
    lc = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                     num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                     num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
                     max_position_embeddings=cfg["seq"],
                     attn_implementation=cfg["attn"])  # type: ignore[call-arg]
    return LlamaForCausalLM(lc).train()


def make_batch(cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Random token ids (batch, seq) with labels equal to the inputs."""
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
    return {"input_ids": ids, "labels": ids}


def target_names(model: nn.Module) -> list[str]:
    """State-dict names of every targeted linear weight (all blocks)."""
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]


def random_support(model: nn.Module, density: float, seed: int) -> dict[str, Tensor]:
    """A static random support of ``density`` on each target weight (sorted int64)."""
    gen = torch.Generator().manual_seed(seed + 2)
    params = dict(model.named_parameters())
    out = {}
    for n in target_names(model):
        k = round(density * params[n].numel())
        out[n] = torch.randperm(params[n].numel(), generator=gen)[:k].sort().values
    return out


def lora_rank(model: nn.Module, density: float) -> int:
    """``r = round(nnz / sum(in + out))`` so LoRA trains about as many parameters."""
    params = dict(model.named_parameters())
    names = target_names(model)
    nnz = sum(round(density * params[n].numel()) for n in names)
    return max(1, round(nnz / sum(sum(params[n].shape) for n in names)))


def _nf4_base(model: nn.Module, base: dict[str, Tensor]) -> dict[str, Tensor]:
    """Quantise the targets to NF4 and make the model hold them (fp32 targets freed)."""
    from spdelta.quant import to_nf4

    names = target_names(model)
    qbase = to_nf4(base, names)
    modules = dict(model.named_modules())
    for n in names:
        mod, attr = n.rsplit(".", 1)
        setattr(modules[mod], attr, nn.Parameter(qbase[n], requires_grad=False))
    return qbase


def spdelta_step(model: nn.Module, cfg: dict[str, Any], impl: str, func: bool = False,
                 nf4: bool = False) -> Step:
    """Closure: one step of grad_and_value on values + sparse AdamW."""
    from torch.func import grad_and_value as func_grad_and_value

    from spdelta.functional import eager_grad_and_value, make_loss_fn
    from spdelta.optim import adamw, apply_updates

    grad_and_value = func_grad_and_value if func else eager_grad_and_value

    model.requires_grad_(False)
    base = {n: p.detach() for n, p in model.named_parameters()}
    support = random_support(model, cfg["density"], cfg["seed"])
    if nf4:
        base = _nf4_base(model, base)
    values = {n: torch.zeros(len(i)) for n, i in support.items()}
    fn, batch = make_loss_fn(model, impl=impl), make_batch(cfg)  # type: ignore[arg-type]
    opt = adamw(cfg["lr"])
    state: list[Any] = [values, opt.init(values)]

    def step() -> float:
        values, opt_state = state
        grads, loss = grad_and_value(fn)(values, base, support, batch)
        updates, opt_state = opt.update(grads, opt_state, values)
        state[:] = [apply_updates(values, updates), opt_state]
        return float(loss)

    return step


def spiel_step(model: nn.Module, cfg: dict[str, Any], start: int = SPIEL_START) -> Step:
    """Closure: one SpIEL step (AG, R=20, S=5, AdamW, fast path); ``step.t()`` is the count."""
    from spdelta.functional import make_loss_fn
    from spdelta.optim import adamw
    from spdelta.train.spiel import make_spiel_step, spiel_init

    model.requires_grad_(False)
    base = {n: p.detach() for n, p in model.named_parameters()}
    support = random_support(model, cfg["density"], cfg["seed"])
    values = {n: torch.zeros(len(i)) for n, i in support.items()}
    opt = adamw(cfg["lr"])
    fn, batch = make_loss_fn(model, impl="fast"), make_batch(cfg)
    spiel = make_spiel_step(fn, base, opt, total_steps=SPIEL_TOTAL, regrowth="ag",
                            update_every=SPIEL_EVERY, accumulate_steps=SPIEL_ACC)
    state = [spiel_init(values, support, opt)._replace(step=start)]

    def step() -> float:
        state[0], metrics = spiel(state[0], batch)
        return metrics["loss"]

    step.t = lambda: state[0].step  # type: ignore[attr-defined]
    return step


def spiel_phase(t: int) -> str:
    """``regrow``, ``ag`` (in the accumulation window) or ``plain`` for 1-based step ``t``."""
    if t % SPIEL_EVERY == 0:
        return "regrow"
    return "ag" if SPIEL_EVERY - t % SPIEL_EVERY < SPIEL_ACC else "plain"


def module_step(model: nn.Module, cfg: dict[str, Any], params: Sequence[Tensor]) -> Step:
    """Closure: forward, backward, torch.optim.AdamW over ``params``."""
    opt = torch.optim.AdamW(params, lr=cfg["lr"])
    batch = make_batch(cfg)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def lora_step(model: nn.Module, cfg: dict[str, Any]) -> tuple[Step, int]:
    """Closure for peft LoRA at the matched rank; also returns the rank."""
    from peft import LoraConfig, get_peft_model

    r = lora_rank(model, cfg["density"])
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                  target_modules=list(TARGETS)))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return module_step(peft_model, cfg, params), r


def frozen_step(model: nn.Module, cfg: dict[str, Any]) -> Step:
    """Closure: forward + backward to the input embeddings only (the lower bound)."""
    model.requires_grad_(False)
    batch = make_batch(cfg)
    embed: nn.Module = model.get_input_embeddings()  # type: ignore[operator]

    def step() -> float:
        inputs = embed(batch["input_ids"]).detach().requires_grad_()
        loss = model(inputs_embeds=inputs, labels=batch["labels"]).loss
        loss.backward()
        return float(loss.detach())

    return step


def tensor_bytes(t: Tensor) -> int:
    """Bytes held by ``t``; for a wrapper subclass (NF4) the sum over its inner tensors."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, a)) for a in inner)


def weights_mb(model: nn.Module) -> float:
    """MiB of every distinct parameter and buffer of ``model`` (byte count, not RSS)."""
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_bytes(t) for t in seen.values()) / 2**20


def _status_kb(key: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_step(name: str, model: nn.Module, cfg: dict[str, Any]) -> tuple[Step, dict[str, Any]]:
    """The step closure of variant ``name`` and facts about it (trainable params, rank)."""
    if name == "spdelta_spiel":
        nnz = sum(len(i) for i in random_support(model, cfg["density"], cfg["seed"]).values())
        return spiel_step(model, cfg), {"trainable": nnz}
    if name.startswith("spdelta_"):
        impl = "reference" if name == "spdelta_reference" else "fast"
        nnz = sum(len(i) for i in random_support(model, cfg["density"], cfg["seed"]).values())
        return spdelta_step(model, cfg, impl, func=name.endswith("_func"),
                            nf4=name.endswith("_nf4")), {"trainable": nnz}
    if name == "lora":
        step, r = lora_step(model, cfg)
        return step, {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "rank": r}
    if name == "full":
        params = list(model.parameters())
        return module_step(model, cfg, params), {"trainable": sum(p.numel() for p in params)}
    if name == "frozen":
        return frozen_step(model, cfg), {"trainable": 0}
    raise SystemExit(f"train_step: error: unknown variant {name!r}; choose from {VARIANTS}")


def measure_memory(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of ``--mem-steps`` steps of ``name`` (see the module doc); a fresh process."""
    import gc

    import transformers.models.llama.modeling_llama  # noqa: F401  (imports in the baseline)

    import spdelta.functional  # noqa: E401, F401
    import spdelta.kernels
    import spdelta.optim
    import spdelta.train.spiel
    if name == "lora":
        import peft  # noqa: F401
    if name.endswith("_nf4"):
        import torchao  # noqa: F401

        import spdelta.quant.nf4  # noqa: F401
    torch.set_num_threads(cfg["threads"])
    gc.collect()
    rss_base = _status_kb("VmRSS")
    model = build_model(cfg)
    step, facts = build_step(name, model, cfg)
    facts["weights_mb"] = weights_mb(model)
    gc.collect()
    rss_before = _status_kb("VmRSS")
    exact = _reset_peak_rss()
    n = max(cfg["mem_steps"], 7) if name == "spdelta_spiel" else cfg["mem_steps"]
    losses = [step() for _ in range(n)]
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak_kb - rss_before) / 1024,
            "model_mb": (rss_before - rss_base) / 1024,
            "peak_total_mb": (peak_kb - rss_base) / 1024,
            "rss_peak_mb": peak_kb / 1024, "rss_before_mb": rss_before / 1024,
            "rss_base_mb": rss_base / 1024, "mem_steps_run": n,
            "mem_method": "VmHWM-after-clear_refs" if exact else "ru_maxrss",
            "loss_first": losses[0], "loss_last": losses[-1], **facts}


def measure_time(names: list[str], cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median step time of every variant, all in this process, the variants taking turns.

    Each variant gets its own model (same seed) and data; after ``warmup`` steps each,
    ``steps`` rounds follow, so that load from other processes on a shared machine hits
    all variants alike. In a round each variant runs two steps back to back; the second
    is timed, and the first one's median is reported as ``step_s_after_other``.
    ``spdelta_spiel`` warms up to a cycle boundary and then runs ``20 * spiel_cycles``
    steps spread evenly over the rounds, every one timed (the phases of the cycle must
    all be in the sum); its ``step_s`` is their total / their count.
    """
    torch.set_num_threads(cfg["threads"])
    steps = {n: build_step(n, build_model(cfg), cfg)[0] for n in names}
    for n, step in steps.items():
        if n == "spdelta_spiel":
            while step.t() % SPIEL_EVERY or step.t() == SPIEL_START:  # type: ignore[attr-defined]
                step()
        else:
            for _ in range(cfg["warmup"]):
                step()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    after_other: dict[str, list[float]] = {n: [] for n in names}
    phase: list[str] = []
    rounds, n_spiel = cfg["steps"], SPIEL_EVERY * cfg["spiel_cycles"]
    for r in range(rounds):
        for n, step in steps.items():
            if n != "spdelta_spiel":
                start = time.perf_counter()
                step()  # follows another variant's step: not in step_s
                after_other[n].append(time.perf_counter() - start)
            reps = 1
            if n == "spdelta_spiel":
                reps = (r + 1) * n_spiel // rounds - r * n_spiel // rounds
            for _ in range(reps):
                if n == "spdelta_spiel":
                    phase.append(spiel_phase(step.t() + 1))  # type: ignore[attr-defined]
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                wall[n].append(time.perf_counter() - start)
                cpu[n].append(time.process_time() - start_cpu)
    out = {n: {"step_s": statistics.median(wall[n]), "step_s_min": min(wall[n]),
               "cpu_s": statistics.median(cpu[n]), "step_s_all": wall[n],
               "step_s_after_other": statistics.median(after_other[n])} for n in names
           if n != "spdelta_spiel"}
    if "spdelta_spiel" in names:
        w, c = wall["spdelta_spiel"], cpu["spdelta_spiel"]
        by = {p: [x for x, q in zip(w, phase, strict=True) if q == p] for p in set(phase)}
        out["spdelta_spiel"] = {
            "step_s": sum(w) / len(w), "cpu_s": sum(c) / len(c), "amortised": True,
            "cycles_timed": cfg["spiel_cycles"], "steps_timed": len(w),
            "cycle_s": sum(w) / cfg["spiel_cycles"],
            "median_plain_s": statistics.median(by["plain"]),
            "median_ag_window_s": statistics.median(by["ag"]),
            "median_regrow_step_s": statistics.median(by["regrow"]),
            "n_by_phase": {p: len(v) for p, v in sorted(by.items())},
            "step_s_all": w, "phase_all": phase}
    return out


def run_child(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``name`` in a fresh Python process and parse its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--config", json.dumps(cfg)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ratios, all from this one run.

    Targets: static step <= 0.9x LoRA and <= 1.15x frozen; static peak <= LoRA peak;
    SpIEL amortised step <= 1.0x LoRA; NF4 ``peak_total`` <= 0.45x the fp32-base static.
    """
    out: dict[str, float] = {}

    def ratio(key: str, a: str, b: str, field: str) -> None:
        x, y = results.get(a, {}).get(field), results.get(b, {}).get(field)
        if x is not None and y is not None:
            out[key] = x / max(y, 1e-9)

    for other in ("lora", "frozen", "spdelta_reference", "spdelta_static_func", "full"):
        ratio(f"step_static_over_{other}", "spdelta_static", other, "step_s")
        ratio(f"step_after_other_static_over_{other}", "spdelta_static", other,
              "step_s_after_other")
        ratio(f"cpu_static_over_{other}", "spdelta_static", other, "cpu_s")
        ratio(f"peak_static_over_{other}", "spdelta_static", other, "peak_mb")
        ratio(f"peak_total_static_over_{other}", "spdelta_static", other, "peak_total_mb")
    for other in ("lora", "frozen", "spdelta_static"):
        ratio(f"step_spiel_amortised_over_{other}", "spdelta_spiel", other, "step_s")
        ratio(f"cpu_spiel_amortised_over_{other}", "spdelta_spiel", other, "cpu_s")
    ratio("peak_spiel_over_lora", "spdelta_spiel", "lora", "peak_mb")
    ratio("peak_total_spiel_over_lora", "spdelta_spiel", "lora", "peak_total_mb")
    ratio("peak_total_nf4_over_static", "spdelta_static_nf4", "spdelta_static", "peak_total_mb")
    ratio("model_nf4_over_static", "spdelta_static_nf4", "spdelta_static", "model_mb")
    ratio("peak_nf4_over_static", "spdelta_static_nf4", "spdelta_static", "peak_mb")
    ratio("step_nf4_over_static", "spdelta_static_nf4", "spdelta_static", "step_s")
    ratio("weights_nf4_over_static", "spdelta_static_nf4", "spdelta_static", "weights_mb")
    return out


NF4_CONFIG = "hidden=2048,intermediate=5504,batch=1,seq=128"


def nf4_weight_dominated(cfg: dict[str, Any], spec: str) -> dict[str, Any]:
    """Memory of ``spdelta_static`` and ``spdelta_static_nf4`` at ``cfg`` overridden by ``spec``.

    ``spec`` is ``key=int,...`` over the integer config keys (e.g. ``batch=1,seq=128``).
    """
    over = {}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        if key not in cfg or not isinstance(cfg[key], int):
            raise SystemExit(f"train_step: error: --nf4-config: unknown integer key {key!r}")
        over[key] = int(val)
    sub = {**cfg, **over}
    results = {n: run_child(n, sub) for n in ("spdelta_static", "spdelta_static_nf4")}
    ratios = {k: v for k, v in summarize(results).items() if "nf4" in k and "step" not in k}
    tokens = sub["batch"] * sub["seq"]
    return {"config": {**over, "tokens": tokens}, "results": results, "ratios": ratios}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (defaults = the design's default config)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("hidden", 512), ("layers", 8), ("vocab", 8000), ("intermediate", 1376),
                          ("heads", 8), ("batch", 8), ("seq", 256), ("steps", 5), ("warmup", 2),
                          ("mem_steps", 3), ("threads", 2), ("seed", 0), ("spiel_cycles", 1)):
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int, default=default)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--nf4-config", default=NF4_CONFIG,
                   help="overrides (key=int,...) for the weight-dominated NF4 memory comparison, "
                        "run when spdelta_static_nf4 is a variant; 'none' skips it")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every requested variant in its own process and print the JSON summary."""
    a = parse(argv)
    if a.child:
        print(json.dumps(measure_memory(a.child, json.loads(a.config))))
        return 0
    keys = ("hidden", "layers", "vocab", "intermediate", "heads", "batch", "seq", "steps",
            "warmup", "mem_steps", "threads", "seed", "density", "lr", "attn", "spiel_cycles")
    cfg: dict[str, Any] = {k: getattr(a, k) for k in keys}
    cfg["torch"] = torch.__version__
    cfg["spiel"] = {"regrowth": "ag", "update_every": SPIEL_EVERY,
                    "accumulate_steps": SPIEL_ACC, "optimizer": "adamw",
                    "start_step": SPIEL_START, "total_steps": SPIEL_TOTAL}
    names = a.variants.split(",")
    results = {}
    for name in names:
        results[name] = run_child(name, cfg)
        if not a.json:
            print(name, "memory", json.dumps(results[name]), file=sys.stderr, flush=True)
    for name, timing in measure_time(names, cfg).items():
        results[name].update(timing)
    report = {"config": cfg, "results": results, "ratios": summarize(results)}
    if "spdelta_static_nf4" in names and a.nf4_config != "none":
        report["nf4_weight_dominated"] = nf4_weight_dominated(cfg, a.nf4_config)
        if not a.json:
            print("nf4_weight_dominated", json.dumps(report["nf4_weight_dominated"]["ratios"]),
                  file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
