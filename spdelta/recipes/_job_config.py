"""The settings of a training job (``spdelta train``) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from spdelta.errors import ParameterError
from spdelta.optim.schedules import SCHEDULES, resolve_warmup
from spdelta.train._defaults import DEFAULT_SCHEDULE, DEFAULT_WARMUP

__all__ = ["TrainConfig", "check_config", "check_eval_options", "check_optim_options"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_job` (the options of ``spdelta train``).

    Attributes:
        model: Directory of a Hugging Face causal LM checkpoint (or a hub id in the cache).
        data: Training rows: a .csv/.tsv/.json/.jsonl/.parquet file, a ``save_to_disk``
            directory, or a dataset name (see :func:`spdelta.recipes.data.load_table`).
        output: Path of the delta file to write; the log is ``<output>.log.json``, the
            loss curve ``<output>.loss.png``.
        method: ``"speft"`` (static salience mask) or ``"spiel"`` (prune and regrow).
        metric: SPEFT salience metric (:data:`spdelta.salience.METRICS`).
        density: Fraction of the target entries trained (default 0.01 unless
            ``lora_rank``).
        lora_rank: Train as many entries as a rank-``r`` LoRA on the targets.
        targets: Target weights (:func:`spdelta.targets.resolve_targets`).
        lr: AdamW (SM3 for SpIEL-MA) peak learning rate; ``None``: the method's default
            (:data:`spdelta.train.DEFAULT_LR`).
        schedule: Learning-rate decay after the warmup: ``"constant"``, ``"linear"`` or
            ``"cosine"`` (to 0 at the last step; :func:`spdelta.optim.warmup_schedule`).
        warmup: Warmup steps (a whole number ``>= 1``) or a ratio of the run (``< 1``).
        max_grad_norm: Clip the values' gradient to this global norm (``None``: no
            clipping; :func:`spdelta.optim.clip_by_global_norm`).
        weight_decay: AdamW decoupled weight decay of the delta values.
        steps: Optimizer steps; exclusive with ``epochs``.
        epochs: Passes over the data (rounded up to whole steps); default 1.
        batch_size: Global batch size (rows per step, split over ranks).
        micro_batch_size: Rows per forward/backward pass (``None``: the whole batch, or
            its share per rank); each step accumulates the gradients of
            ``batch_size / (ranks * micro_batch_size)`` micro-batches, weighted by their
            label tokens, into the gradient of the whole batch.
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
        chat_template: ``"auto"`` (the tokenizer's chat template when it has one),
            ``"none"`` (plain prompt + response text) or a Jinja template file
            (:func:`spdelta.recipes.data.encode_prompt_response`); the delta's training record
            says which layout was used (``prompt_format``).
        eval_data: Held-out rows (same formats as ``data``).
        eval_split: A split of ``data`` (a dataset dict or named dataset) to hold out.
        eval_fraction: Hold out this fraction of the training rows (drawn with ``seed``).
        eval_every: Evaluate every this many steps (and at the end); ``None``: about 10
            times a run (every ``max(1, steps // 10)``).
        keep: ``"last"`` writes the final delta; ``"best"`` the delta of the evaluation
            with the best accuracy (text + label data), else the lowest held-out loss.
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
    lr: float | None = None
    schedule: str = DEFAULT_SCHEDULE
    warmup: float = DEFAULT_WARMUP
    max_grad_norm: float | None = None
    weight_decay: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    micro_batch_size: int | None = None
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
    chat_template: str = "auto"
    eval_data: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = None
    eval_every: int | None = None
    keep: str = "last"
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


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot run, before anything is loaded.

    Raises:
        ParameterError: A setting is out of its range (every float must be finite).
    """
    if cfg.model.startswith(("/", ".", "~")) and not Path(cfg.model).expanduser().is_dir():
        raise ParameterError(f"--model: expected a checkpoint directory or a hub id; "
                             f"{cfg.model!r} is not a directory.")
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
    _check_numbers(cfg)
    check_optim_options(cfg)
    check_eval_options(cfg)


def _check_numbers(cfg: TrainConfig) -> None:
    """Every float setting is finite and in its range (``inf``/``nan`` would train garbage)."""
    ranges = {"density": (cfg.density, 0.0, 1.0, False), "lr": (cfg.lr, 0.0, math.inf, True),
              "weight_decay": (cfg.weight_decay, 0.0, math.inf, False),
              "epochs": (cfg.epochs, 0.0, math.inf, True),
              "initial_fraction": (cfg.initial_fraction, 0.0, 1.0, False)}
    for name, (value, low, high, open_low) in ranges.items():
        if value is None:
            continue
        ok = math.isfinite(value) and low <= value <= high and not (open_low and value == low)
        if not ok:
            flag = "--" + name.replace("_", "-")
            left = "(" if open_low else "["
            raise ParameterError(f"{name} ({flag}): expected a finite number in {left}{low:g}, "
                                 f"{high:g}]; found {value!r}.")


def check_optim_options(cfg: TrainConfig) -> None:
    """The learning rate, schedule, warmup, clipping and micro-batch options."""
    if cfg.schedule not in SCHEDULES:
        raise ParameterError(f"--schedule: expected one of {', '.join(SCHEDULES)}; found "
                             f"{cfg.schedule!r}.")
    try:
        resolve_warmup(cfg.warmup, 0)
    except ParameterError:
        raise ParameterError(f"--warmup: expected a ratio in [0, 1) or a whole number of steps; "
                             f"found {cfg.warmup}.") from None
    if cfg.lr is not None and not cfg.lr > 0:
        raise ParameterError(f"--lr: expected > 0; found {cfg.lr}.")
    if cfg.max_grad_norm is not None and not 0 < cfg.max_grad_norm < math.inf:
        raise ParameterError(f"--max-grad-norm: expected a positive number; found "
                             f"{cfg.max_grad_norm}.")
    if cfg.micro_batch_size is not None and not 1 <= cfg.micro_batch_size <= cfg.batch_size:
        raise ParameterError(f"--micro-batch-size: expected 1 .. --batch-size "
                             f"({cfg.batch_size}); found {cfg.micro_batch_size}.")


def check_eval_options(cfg: TrainConfig) -> None:
    """The evaluation and prompt options: one source, sane numbers, ``--keep best`` with one."""
    sources = [f for f, v in (("--eval-data", cfg.eval_data), ("--eval-split", cfg.eval_split),
                              ("--eval-fraction", cfg.eval_fraction)) if v is not None]
    if len(sources) > 1:
        raise ParameterError(f"{' and '.join(sources)} both given; pass one source of held-out "
                             "rows.")
    if cfg.eval_fraction is not None and not 0 < cfg.eval_fraction < 1:
        raise ParameterError(f"--eval-fraction: expected a fraction in (0, 1); found "
                             f"{cfg.eval_fraction}.")
    if cfg.eval_every is not None and cfg.eval_every < 1:
        raise ParameterError(f"--eval-every: expected >= 1; found {cfg.eval_every}.")
    if cfg.keep not in ("last", "best"):
        raise ParameterError(f"--keep: expected 'last' or 'best'; found {cfg.keep!r}.")
    if cfg.keep == "best" and not sources:
        raise ParameterError("--keep best needs held-out rows to compare steps on; pass "
                             "--eval-data, --eval-split or --eval-fraction.")
    if cfg.fsdp and (sources or (cfg.micro_batch_size or 0) > 0):
        raise ParameterError("--fsdp does not evaluate or accumulate micro-batches yet; drop "
                             "--fsdp (data parallel), or drop the --eval-* and "
                             "--micro-batch-size options.")
    if cfg.chat_template not in ("auto", "none") and not Path(cfg.chat_template).is_file():
        raise ParameterError(f"--chat-template: expected auto, none or a template file; "
                             f"{cfg.chat_template!r} is not a file.")
