"""A complete training job on a Hugging Face checkpoint: what ``spdelta train`` runs.

:func:`train_job` loads a causal LM and a table of examples, selects a support
(SPEFT: salience top-k; SpIEL: random, then prune/regrow), trains the delta values,
and writes the delta file, a JSON log and a loss-curve PNG. It checkpoints
periodically and resumes bit for bit; under ``torchrun`` it runs data-parallel
(``torch.distributed``, gloo on CPU, nccl on GPU) with one support on every rank.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from spdelta._io import atomic_write
from spdelta.delta import SparseDelta
from spdelta.errors import DataError, OutputExistsError, ParameterError, SpdeltaError
from spdelta.format.constants import KEY_BASE_MODEL, KEY_FINGERPRINT, KEY_TRAINING
from spdelta.train._spiel_io import SpielState
from spdelta.types import Params, Support

__all__ = ["TrainConfig", "train_job"]

Batch = Mapping[str, Any]
StepFn = Callable[[SpielState, Batch], tuple[SpielState, dict[str, float]]]

# Fields that change how a run is executed, not what it computes: free to differ on resume.
_RUN_ONLY = frozenset({"checkpoint_every", "checkpoint_dir", "resume", "stop_after", "progress",
                       "force", "fsdp", "device"})


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_job` (the options of ``spdelta train``).

    Attributes:
        model: Directory of a Hugging Face causal LM checkpoint (or a hub id in the cache).
        data: Training rows: a .csv/.tsv/.json/.jsonl/.parquet file, a ``save_to_disk``
            directory, or a dataset name (see :func:`spdelta.data.load_table`).
        output: Path of the delta file to write; the log is ``<output>.log.json``, the
            loss curve ``<output>.loss.png``.
        method: ``"speft"`` (static salience mask) or ``"spiel"`` (prune and regrow).
        metric: SPEFT salience metric (:data:`spdelta.salience.METRICS`).
        density: Fraction of the target entries trained (default 0.01 unless
            ``lora_rank``).
        lora_rank: Train as many entries as a rank-``r`` LoRA on the targets.
        targets: Target weights (:func:`spdelta.targets.resolve_targets`).
        lr: AdamW (SM3 for SpIEL-MA) learning rate.
        weight_decay: AdamW decoupled weight decay of the delta values.
        steps: Optimizer steps; exclusive with ``epochs``.
        epochs: Passes over the data (rounded up to whole steps); default 1.
        batch_size: Global batch size (rows per step, split over ranks).
        max_length: Tokens per sequence (prompts are truncated from the left).
        bf16: Load the base in bfloat16 (values stay fp32).
        nf4: Quantise the target weights of the base to NF4 (torchao) after scoring.
        device: Where the job computes: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None``
            (the default) is this process's GPU when torch sees one (under ``torchrun``
            the ``LOCAL_RANK``-th), else the CPU. Checkpoints resume on any device.
        fsdp: Under ``torchrun``, shard the base weights, values and optimizer state
            per decoder layer with FSDP2 (``fully_shard``) instead of replicating them
            (data parallel). AdamW only (SPEFT, or SpIEL-AG); not with ``nf4``.
        seed: Seeds the data order, the SpIEL support and everything random.
        split: Split of a dataset dict or named dataset.
        prompt_column: Prompt column (prompt + response format; auto-detected).
        response_column: Response column (prompt + response format; auto-detected).
        text_column: Text column (text + label format).
        label_column: Label column (text + label format).
        label_names: Label id -> response text (text + label format).
        template: ``str.format`` template of the prompt over the row's columns.
        system: System message for chat templates.
        calibration_examples: Examples scored for SPEFT selection.
        regrowth: SpIEL regrowth, ``"ag"`` (accumulated gradients) or ``"ma"`` (SM3).
        update_every: SpIEL steps between regrowths.
        accumulate_steps: SpIEL-AG gradient window.
        initial_fraction: SpIEL initial prune fraction (annealed linearly to 0).
        checkpoint_every: Save a resumable checkpoint every this many steps (0: never,
            except when stopping early with ``stop_after``).
        checkpoint_dir: Where checkpoints go (default ``<output>.ckpt``).
        resume: Continue from the checkpoint if there is one.
        stop_after: Stop after this many steps in this call (leaving a checkpoint), e.g.
            for time-limited jobs; ``--resume`` continues.
        progress: Show progress bars.
        force: Replace an existing output file.
    """

    model: str
    data: str
    output: str
    method: str = "speft"
    metric: str = "gradient"
    density: float | None = None
    lora_rank: int | None = None
    targets: str = "all-linear"
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    max_length: int = 256
    bf16: bool = False
    nf4: bool = False
    device: str | None = None
    fsdp: bool = False
    seed: int = 0
    split: str = "train"
    prompt_column: str | None = None
    response_column: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    label_names: tuple[str, ...] | None = None
    template: str | None = None
    system: str | None = None
    calibration_examples: int = 256
    regrowth: str = "ag"
    update_every: int = 20
    accumulate_steps: int = 5
    initial_fraction: float = 0.2
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    force: bool = False


def _check(cfg: TrainConfig) -> None:
    if cfg.method not in ("speft", "spiel"):
        raise ParameterError(f"method: expected 'speft' or 'spiel'; found {cfg.method!r}.")
    if cfg.density is not None and cfg.lora_rank is not None:
        raise ParameterError("density and lora_rank both given; pass one budget.")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ParameterError("steps and epochs both given; pass one length.")
    if (cfg.steps is not None and cfg.steps < 1) or (cfg.epochs is not None and cfg.epochs <= 0):
        raise ParameterError(f"expected steps >= 1 or epochs > 0; found steps={cfg.steps}, "
                             f"epochs={cfg.epochs}.")
    if cfg.batch_size < 1 or cfg.max_length < 2:
        raise ParameterError(f"expected batch_size >= 1 and max_length >= 2; found "
                             f"{cfg.batch_size} and {cfg.max_length}.")
    if cfg.regrowth not in ("ag", "ma"):
        raise ParameterError(f"regrowth: expected 'ag' or 'ma'; found {cfg.regrowth!r}.")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ParameterError(f"stop_after: expected >= 1; found {cfg.stop_after}.")
    if os.path.exists(cfg.output) and not cfg.force:
        raise OutputExistsError(f"output {cfg.output!r} exists; pass --force to replace it or "
                                "choose another -o.")


def _device(cfg: TrainConfig, env: Any) -> torch.device:
    """``cfg.device``, or this process's GPU (``env.device``), or the CPU."""
    if cfg.device is None:
        return torch.device(env.device)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ParameterError(f"device: expected 'cpu', 'cuda' or 'cuda:N'; found "
                             f"{cfg.device!r} ({e}).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {cfg.device!r}: torch sees no CUDA device here; drop "
                             "--device to use the CPU.")
    if device.type == "cuda" and device.index is None:
        return torch.device(env.device) if env.device.type == "cuda" else torch.device("cuda", 0)
    return device


class _Data:
    """Step ``t`` -> its global batch: epoch ``t // per_epoch``, shuffled by ``(seed, epoch)``.

    The order depends only on the seed and the step, so a resumed run reads exactly
    the batches the interrupted one would have read, with no iterator to replay.
    """

    def __init__(self, cfg: TrainConfig, tokenizer: Any) -> None:
        from spdelta.data import load_table, prompt_response_pairs

        rows = load_table(cfg.data, split=cfg.split)
        self.prompts, self.responses, self.format = prompt_response_pairs(
            rows, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
            text_column=cfg.text_column, label_column=cfg.label_column,
            label_names=cfg.label_names, template=cfg.template)
        self.n = len(self.prompts)
        if self.n < cfg.batch_size:
            raise DataError(f"data {cfg.data!r}: {self.n} rows, fewer than one batch of "
                            f"{cfg.batch_size}; lower --batch-size or add rows.")
        self.per_epoch = self.n // cfg.batch_size  # the last partial batch is dropped
        self.cfg, self.tokenizer = cfg, tokenizer
        self._orders: dict[int, list[int]] = {}

    def rows(self, t: int) -> list[int]:
        epoch, i = divmod(t, self.per_epoch)
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        b = self.cfg.batch_size
        return self._orders[epoch][i * b:(i + 1) * b]

    def batch(self, t: int) -> dict[str, Any]:
        from spdelta.data import encode_prompt_response

        idx = self.rows(t)
        return encode_prompt_response(
            self.tokenizer, [self.prompts[i] for i in idx], [self.responses[i] for i in idx],
            max_length=self.cfg.max_length, system=self.cfg.system)


def _total_steps(cfg: TrainConfig, data: _Data) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * data.per_epoch))


def _ckpt_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint_dir or cfg.output + ".ckpt")


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["label_names"] = list(cfg.label_names) if cfg.label_names is not None else None
    return {k: v for k, v in d.items() if k not in _RUN_ONLY}


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode())


def _save(ckpt: Path, state: SpielState, cfg: TrainConfig, log: list[dict[str, float]],
          rank: int) -> None:
    """Log and config first, state last: a crash in between leaves a longer log, cut on resume."""
    from spdelta.dist import save_checkpoint

    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        _write_json(ckpt / "job.json", {"config": _comparable(cfg), "log": log})
    state = state._replace(rng_state=torch.get_rng_state())
    save_checkpoint(state, ckpt / "state")


def _job_file(ckpt: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint's job record, if there is a checkpoint; refuse other settings."""
    if not (ckpt / "state").is_dir():
        return None
    job: dict[str, Any] = json.loads((ckpt / "job.json").read_text())
    ours = _comparable(cfg)
    diff = sorted(k for k in set(ours) | set(job["config"]) if ours.get(k) != job["config"].get(k))
    if diff:
        shown = ", ".join(f"{k}: {job['config'].get(k)!r} -> {ours.get(k)!r}" for k in diff)
        raise ParameterError(f"resume from {str(ckpt)!r}: the checkpoint was made with other "
                             f"settings ({shown}); rerun with the same settings, or delete the "
                             "checkpoint to start over.")
    return job


def _load(ckpt: Path, job: dict[str, Any]) -> tuple[SpielState, list[dict[str, float]]]:
    from spdelta.dist import load_checkpoint

    state = load_checkpoint(ckpt / "state")
    if not isinstance(state, SpielState):
        raise SpdeltaError(f"{str(ckpt)!r}: expected a spdelta train job checkpoint; found a "
                           f"{type(state).__name__}. Delete it to start over.")
    if state.rng_state is not None:
        torch.set_rng_state(state.rng_state)
    return state, job["log"][:state.step]


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _budget_density(shapes: Mapping[str, tuple[int, ...]], cfg: TrainConfig) -> float:
    if cfg.lora_rank is None:
        return 0.01 if cfg.density is None else cfg.density
    from spdelta.select import budget

    total = sum(math.prod(s) for s in shapes.values())
    return budget(shapes, lora_rank=cfg.lora_rank)[""] / total


def _select(cfg: TrainConfig, model: Any, base: Params, names: list[str], data: _Data,
            shard: Callable[[Batch], Batch], world: int) -> Support:
    """SPEFT's support: salience on the first calibration batches, global top-k."""
    from spdelta.dist import score_distributed
    from spdelta.salience import score
    from spdelta.select import select_topk

    n_batches = max(1, math.ceil(cfg.calibration_examples / cfg.batch_size))
    calibration = [shard(data.batch(t)) for t in range(n_batches)]
    kwargs: dict[str, Any] = {"metric": cfg.metric, "targets": names, "progress": cfg.progress,
                              "num_examples": max(1, cfg.calibration_examples // world),
                              "generator": torch.Generator().manual_seed(cfg.seed)}
    scores = (score_distributed(model, base, calibration, **kwargs) if world > 1
              else score(model, base, calibration, **kwargs))
    if cfg.lora_rank is not None:
        return select_topk(scores, lora_rank=cfg.lora_rank)
    return select_topk(scores, density=0.01 if cfg.density is None else cfg.density)


def _optimizer(cfg: TrainConfig, support: Support, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    from spdelta.optim import adamw, sm3

    if cfg.method == "spiel" and cfg.regrowth == "ma":
        return sm3(cfg.lr, support=support, shapes=shapes)
    return adamw(cfg.lr, weight_decay=cfg.weight_decay)


def _static(inner: Callable[[Any, Batch], tuple[Any, dict[str, float]]]) -> StepFn:
    """A fixed-support ``TrainState`` step as a step on the job's ``SpielState``."""
    from spdelta.train._loop import TrainState

    def static_step(s: SpielState, batch: Batch) -> tuple[SpielState, dict[str, float]]:
        t, metrics = inner(TrainState(s.values, s.opt_state, s.step), batch)
        return s._replace(values=t.values, opt_state=t.opt_state, step=t.step), metrics

    return static_step


def _step_fn(cfg: TrainConfig, model: Any, base: Params, support: Support, optimizer: Any,
             total: int, world: int) -> StepFn:
    from spdelta.dist import make_dist_spiel_step, make_dist_train_step
    from spdelta.functional import make_loss_fn
    from spdelta.train._loop import make_train_step
    from spdelta.train.spiel import make_spiel_step

    loss_fn = make_loss_fn(model)  # the fast path, NF4 targets included
    if cfg.method == "spiel":
        kwargs: dict[str, Any] = {"total_steps": total, "regrowth": cfg.regrowth, "update_every":
                  cfg.update_every, "accumulate_steps": cfg.accumulate_steps,
                  "initial_fraction": cfg.initial_fraction}
        if world > 1:
            return make_dist_spiel_step(loss_fn, base, optimizer, **kwargs)
        return make_spiel_step(loss_fn, base, optimizer, **kwargs)
    make = make_dist_train_step if world > 1 else make_train_step
    return _static(make(loss_fn, optimizer, base, support))


def _fsdp(cfg: TrainConfig, model: Any, state: SpielState, total: int,
          resume_from: Path | None) -> tuple[Any, SpielState, StepFn]:
    """Shard ``model`` with deltas on ``state.support`` (FSDP2); the sharded state and step."""
    from spdelta.dist import (
        fsdp_spiel_init,
        load_checkpoint,
        make_fsdp_spiel_step,
        make_fsdp_train_step,
        shard_with_deltas,
    )
    from spdelta.optim import adamw

    # A tensor the global top-k left empty gets no DeltaLinear (FSDP cannot shard 0 values).
    model = shard_with_deltas(model, {n: i for n, i in state.support.items() if i.numel()})
    optimizer = adamw(cfg.lr, weight_decay=cfg.weight_decay)
    template = fsdp_spiel_init(model, optimizer)  # values/optimizer state as sharded DTensors
    if resume_from is not None:
        loaded = load_checkpoint(resume_from, template=template)
        if not isinstance(loaded, SpielState):
            raise SpdeltaError(f"{str(resume_from)!r}: expected a spdelta train job checkpoint; "
                               f"found a {type(loaded).__name__}. Delete it to start over.")
        state = loaded._replace(rng_state=state.rng_state)
    else:
        state = template
    if cfg.method == "spiel":
        return model, state, make_fsdp_spiel_step(
            model, optimizer, total_steps=total, regrowth="ag",
            update_every=cfg.update_every, accumulate_steps=cfg.accumulate_steps,
            initial_fraction=cfg.initial_fraction)
    return model, state, _static(make_fsdp_train_step(model, optimizer))


def _plot(log: list[dict[str, float]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["loss"] for r in log], lw=0.8, alpha=0.5, label="loss")
    w = max(1, len(log) // 20)  # a running mean shows the trend through the noise
    if w > 1:
        windows = [log[max(0, i - w + 1):i + 1] for i in range(len(log))]
        smooth = [sum(r["loss"] for r in win) / len(win) for win in windows]
        ax.plot(steps, smooth, lw=1.5, label=f"running mean of {w}")
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    return True


def train_job(cfg: TrainConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a training job end to end and return its report (also the JSON log's ``summary``).

    1. Load the tokenizer and model (``cfg.bf16``: bfloat16) and the rows
       (:func:`spdelta.data.load_table`, :func:`spdelta.data.prompt_response_pairs`).
    2. Select the support: SPEFT scores the targets on ``calibration_examples`` rows
       and keeps the global top-k; SpIEL draws a random support per tensor. Then, with
       ``cfg.nf4``, quantise the targets to NF4 and free their dense copies.
    3. Train for ``steps`` (or ``epochs``) steps; the batch of step ``t`` depends only
       on ``seed`` and ``t``. A tqdm bar shows the loss and tokens/s. Every
       ``checkpoint_every`` steps the state (values, support, optimizer, AG
       accumulators, torch RNG, step = data position) is saved atomically with
       ``torch.distributed.checkpoint`` under ``checkpoint_dir``; ``resume`` continues
       from it and ends with the same delta, bit for bit, as an uninterrupted run.
    4. Write the delta (metadata: base model, fingerprint, method and settings), the
       JSON log (config, one record per step, summary) and the loss-curve PNG.

    Under ``torchrun`` every rank runs this function: each takes its share of every
    global batch, gradients and salience are averaged over ranks, supports are
    identical everywhere, and rank 0 writes the outputs.

    Args:
        cfg: The job's settings.
        say: Where progress lines go (rank 0 only).

    Returns:
        A summary dict: ``steps``, ``finished`` (False when ``stop_after`` stopped it),
        ``loss_first``, ``loss_last``, ``nnz``, ``seconds``, ``tokens_per_s`` and paths.

    Raises:
        ParameterError, DataError, OutputExistsError: Bad settings or data.

    Example:
        >>> cfg = TrainConfig(model="ckpt/", data="train.jsonl", output="d.safetensors",
        ...                   steps=100)
        >>> report = train_job(cfg)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spdelta.dist import init_from_env, shard_batch
    from spdelta.format import save_delta
    from spdelta.hf import fingerprint
    from spdelta.targets import resolve_targets
    from spdelta.train.spiel import random_support

    _check(cfg)
    ckpt = _ckpt_dir(cfg)
    job = _job_file(ckpt, cfg) if cfg.resume else None  # fail before the slow part
    if not cfg.progress:
        _quiet_libraries()
    env = init_from_env(backend="gloo" if cfg.device == "cpu" else None)
    rank, world = env.rank, env.world_size
    device = _device(cfg, env)
    speak = say if rank == 0 else (lambda _: None)
    show = cfg.progress and rank == 0
    t_start = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device)
    model.train()
    data = _Data(cfg, tokenizer)
    total = _total_steps(cfg, data)
    if cfg.batch_size % world:
        raise ParameterError(f"batch_size {cfg.batch_size} is not a multiple of the world size "
                             f"{world}; use a multiple of {world}.")
    if cfg.fsdp and (world == 1 or cfg.nf4 or (cfg.method, cfg.regrowth) == ("spiel", "ma")):
        raise ParameterError(f"--fsdp shards over several processes with AdamW: it needs "
                             f"torchrun (found world size {world}), no --nf4, and SPEFT or "
                             "SpIEL-AG; drop --fsdp to train data-parallel instead.")

    def shard(batch: Batch) -> Batch:
        mine = shard_batch(batch, rank, world) if world > 1 else batch
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mine.items()}

    base = {n: p.detach() for n, p in model.named_parameters()}
    names = resolve_targets(model, cfg.targets)
    shapes = {n: tuple(base[n].shape) for n in names}
    print_fp = fingerprint(base, names)
    speak(f"model {cfg.model}: {len(names)} target tensors, "
          f"{sum(math.prod(s) for s in shapes.values()):,} target entries; data {cfg.data}: "
          f"{data.n} rows ({data.format}), {total} steps of {cfg.batch_size}"
          + (f" on {world} ranks" if world > 1 else "") + f", on {device}")

    if job is not None:
        state, log = _load(ckpt, job)
        rng = state.rng_state  # the CPU generator's state stays on the CPU
        state = tree_map_only(torch.Tensor, lambda t: t.to(device), state._replace(
            rng_state=None))._replace(rng_state=rng)
        speak(f"resuming from {ckpt} at step {state.step}")
    else:
        log = []
        if cfg.method == "speft":
            support = _select(cfg, model, base, names, data, shard, world)
        else:
            density = _budget_density(shapes, cfg)
            support = random_support(shapes, density=density,
                                     generator=torch.Generator().manual_seed(cfg.seed),
                                     device=device)
        values = {n: torch.zeros(i.numel(), dtype=torch.float32, device=device)
                  for n, i in support.items()}
        opt = _optimizer(cfg, support, shapes)
        state = SpielState(values, support, opt.init(values), 0, {}, None)
        torch.manual_seed(cfg.seed)  # dropout, if the model has any
    if cfg.nf4:
        from spdelta.quant import to_nf4

        base = to_nf4(base, names)
        for n, p in model.named_parameters():  # drop the dense copies of the targets
            if n in shapes:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    if cfg.fsdp:
        model, state, step_fn = _fsdp(cfg, model, state, total,
                                      ckpt / "state" if job is not None else None)
    else:
        # An FSDP checkpoint keeps AG sums as (out, in) shards; here they are flat.
        state = state._replace(grad_acc={n: g.reshape(-1) for n, g in state.grad_acc.items()})
        optimizer = _optimizer(cfg, state.support, shapes)
        step_fn = _step_fn(cfg, model, base, state.support, optimizer, total, world)

    from tqdm.auto import tqdm

    end = total if cfg.stop_after is None else min(total, state.step + cfg.stop_after)
    t_train = time.perf_counter()
    tokens_run = 0
    with tqdm(total=total, initial=state.step, desc=f"{cfg.method}", unit="step",
              disable=not show) as bar:
        while state.step < end:
            batch = data.batch(state.step)
            tokens = int(batch["attention_mask"].sum())
            t0 = time.perf_counter()
            state, metrics = step_fn(state, shard(batch))
            dt = time.perf_counter() - t0
            tokens_run += tokens
            log.append({**metrics, "tokens": float(tokens), "seconds": dt})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}")
            due = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
            if (due and state.step < total) or (state.step == end < total):
                _save(ckpt, state, cfg, log, rank)
    train_s = time.perf_counter() - t_train
    finished = state.step >= total
    out = Path(cfg.output)
    nnz = sum(int(i.numel()) for i in state.support.values())
    entries = sum(math.prod(s) for s in shapes.values())
    summary = {"steps": state.step, "total_steps": total, "finished": finished,
               "loss_first": log[0]["loss"] if log else None,
               "loss_last": log[-1]["loss"] if log else None,
               "nnz": nnz, "target_entries": entries,
               "seconds": time.perf_counter() - t_start, "train_seconds_this_run": train_s,
               "tokens_per_s": tokens_run / train_s if train_s > 0 else 0.0,
               "world_size": world, "device": str(device), "delta": str(out),
               "checkpoint": str(ckpt)}
    if not finished:
        speak(f"stopped at step {state.step} of {total}; checkpoint in {ckpt}. "
              "Continue with the same command and --resume.")
        return summary
    record = {**_comparable(cfg), "nnz": nnz, "achieved_density": nnz / max(1, entries),
              "total_steps": total, "data_format": data.format}
    meta = {KEY_TRAINING: json.dumps(record, sort_keys=True),
            KEY_BASE_MODEL: str(getattr(model.config, "_name_or_path", "") or cfg.model),
            KEY_FINGERPRINT: print_fp}
    if cfg.fsdp:
        from spdelta.dist import fsdp_delta

        got = fsdp_delta(model, state)  # every rank gathers
        delta = SparseDelta.from_support(
            {n: got[n].indices.cpu() if n in got else torch.zeros(0, dtype=torch.long)
             for n in shapes},
            {n: got[n].values.cpu() if n in got else torch.zeros(0) for n in shapes},
            shapes, metadata=meta)
    else:
        delta = SparseDelta.from_support(
            {n: i.cpu() for n, i in state.support.items()},
            {n: v.cpu() for n, v in state.values.items()}, shapes, metadata=meta)
    if rank == 0:
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        save_delta(delta, out)
        log_path = out.with_name(out.name + ".log.json")
        _write_json(log_path, {"config": _comparable(cfg), "summary": summary, "log": log})
        png = out.with_name(out.name + ".loss.png")
        plotted = _plot(log, png, f"spdelta {cfg.method} on {Path(cfg.model).name}")
        speak(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB, nnz {nnz:,}); "
              f"log {log_path}" + (f"; loss curve {png}" if plotted else
                                   "; no loss curve (pip install matplotlib)"))
    if world > 1:
        torch.distributed.barrier()
    if ckpt.is_dir() and rank == 0:
        shutil.rmtree(ckpt)  # finished: the delta file is the result
    return summary

