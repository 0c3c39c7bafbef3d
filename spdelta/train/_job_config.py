"""The settings of a training job (``spdelta train``) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spdelta.errors import ParameterError

__all__ = ["TrainConfig", "check_config"]


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


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot run, before anything is loaded.

    Raises:
        ParameterError: A setting is out of its range (every float must be finite).
    """
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
