"""A training job's files: its checkpoint (state, log, settings) and its outputs.

The checkpoint directory holds ``spdelta-checkpoint.json`` (the marker, see
:mod:`spdelta.recipes._job_dir`), ``job.json`` (the comparable settings and the log) and
``state/`` (:func:`spdelta.dist.save_checkpoint`). The outputs are the delta file,
``<output>.log.json`` and ``<output>.loss.png``.
"""

from __future__ import annotations

import dataclasses
import filecmp
import io
import json
import secrets
from pathlib import Path
from typing import Any

import torch

from spdelta._io import atomic_write
from spdelta.delta import SparseDelta
from spdelta.dist import fsdp_delta, load_checkpoint, save_checkpoint
from spdelta.errors import OutputExistsError, ParameterError, SpdeltaError
from spdelta.format import save_delta
from spdelta.format.constants import KEY_BASE_MODEL, KEY_FINGERPRINT, KEY_TRAINING
from spdelta.recipes._job_config import TrainConfig
from spdelta.recipes._job_dir import ckpt_dir, mark, outputs, remove_checkpoint
from spdelta.recipes._job_run import Run
from spdelta.train import SpielState
from spdelta.train._defaults import default_lr

# Fields that change how a run is executed, not what it computes: free to differ on resume.
RUN_ONLY = frozenset({"checkpoint_every", "checkpoint_dir", "resume", "stop_after", "progress",
                      "force", "fsdp", "device"})


def comparable(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["label_names"] = list(cfg.label_names) if cfg.label_names is not None else None
    return {k: v for k, v in d.items() if k not in RUN_ONLY}


def write_json(path: Path, obj: Any, *, overwrite: bool = True) -> None:
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode())


def save_job(ckpt: Path, state: SpielState, cfg: TrainConfig, log: list[dict[str, float]],
          rank: int) -> None:
    """Log and config first, state last: a crash in between leaves a longer log, cut on resume."""
    if rank == 0:
        mark(ckpt)
        write_json(ckpt / "job.json", {"config": comparable(cfg), "log": log})
    state = state._replace(rng_state=torch.get_rng_state())
    save_checkpoint(state, ckpt / "state")


def job_file(ckpt: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint's job record, if there is a checkpoint; refuse other settings."""
    if not (ckpt / "state").is_dir():
        return None
    job: dict[str, Any] = json.loads((ckpt / "job.json").read_text())
    ours = comparable(cfg)
    diff = sorted(k for k in set(ours) | set(job["config"]) if ours.get(k) != job["config"].get(k))
    if diff:
        shown = ", ".join(f"{k}: {job['config'].get(k)!r} -> {ours.get(k)!r}" for k in diff)
        raise ParameterError(f"resume from {str(ckpt)!r}: the checkpoint was made with other "
                             f"settings ({shown}); rerun with the same settings, or delete the "
                             "checkpoint to start over.")
    return job


def load_job(ckpt: Path, job: dict[str, Any]) -> tuple[SpielState, list[dict[str, float]]]:
    state = load_checkpoint(ckpt / "state")
    if not isinstance(state, SpielState):
        raise SpdeltaError(f"{str(ckpt)!r}: expected a spdelta train job checkpoint; found a "
                           f"{type(state).__name__}. Delete it to start over.")
    if state.rng_state is not None:
        torch.set_rng_state(state.rng_state)
    return state, job["log"][:state.step]


def plot_losses(log: list[dict[str, float]], path: Path, title: str, overwrite: bool) -> bool:
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
    evals = [r for r in log if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.5,
                label="held-out loss")
    if any("eval_accuracy" in r for r in evals):
        acc = ax.twinx()
        acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "s--",
                 color="tab:green", lw=1.2, label="held-out accuracy")
        acc.set_ylabel("held-out accuracy")
        acc.legend(loc="upper right")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(loc="upper left" if evals else "best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(buf.getvalue())
    return True



def _delta(cfg: TrainConfig, run: Run, model: Any, state: SpielState,
           summary: dict[str, Any]) -> SparseDelta:
    """The trained delta with its metadata (every rank takes part in an FSDP2 gather)."""
    nnz, entries = summary["nnz"], summary["target_entries"]
    record = {**comparable(cfg), "nnz": nnz, "achieved_density": nnz / max(1, entries),
              "total_steps": run.total, "data_format": run.data.format,
              "lr": default_lr(cfg.method) if cfg.lr is None else cfg.lr,  # the peak used
              "prompt_format": run.data.prompt_format,
              "written_step": summary.get("written_step", run.total)}
    meta = {KEY_TRAINING: json.dumps(record, sort_keys=True),
            KEY_BASE_MODEL: str(getattr(model.config, "_name_or_path", "") or cfg.model),
            KEY_FINGERPRINT: run.fingerprint}
    if cfg.fsdp:
        got = fsdp_delta(model, state)  # every rank gathers
        support = {n: got[n].indices if n in got else torch.zeros(0, dtype=torch.long)
                   for n in run.shapes}
        values = {n: got[n].values if n in got else torch.zeros(0) for n in run.shapes}
    else:
        support, values = state.support, state.values
    delta = SparseDelta.from_support({n: i.cpu() for n, i in support.items()},
                                     {n: v.cpu() for n, v in values.items()}, run.shapes,
                                     metadata=meta)
    return run.targets.layout.to_checkpoint(delta)  # names and layout of the model's directory


def _save_or_match(delta: SparseDelta, out: Path, force: bool) -> None:
    """Write the delta; if ``out`` exists (a resumed run wrote it), it must be these bytes."""
    if force or not out.exists():
        save_delta(delta, out, overwrite=force)  # checked again, atomically
        return
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        save_delta(delta, tmp)
        same = filecmp.cmp(tmp, out, shallow=False)
    finally:
        tmp.unlink(missing_ok=True)
    if not same:
        raise OutputExistsError(f"output {str(out)!r} exists and is not this run's delta; pass "
                                "--force to replace it, or choose another -o.")


def finish(cfg: TrainConfig, run: Run, model: Any, state: SpielState,
           log: list[dict[str, float]], summary: dict[str, Any], resumed: bool) -> None:
    """Write the delta (with its metadata), the JSON log and the loss curve; drop the checkpoint.

    Every rank takes part (an FSDP2 delta is gathered from all of them); rank 0 writes.
    The marker records first that the outputs are being written; a run killed then is
    resumed with ``resumed`` (it began writing them): it keeps an existing delta that is
    byte for byte this run's, and an existing log and loss curve. Nothing else that
    exists is replaced without ``--force``.
    """
    delta = _delta(cfg, run, model, state, summary)
    out, log_path, png = outputs(cfg)
    ckpt = ckpt_dir(cfg)
    if run.rank == 0:
        mark(ckpt, finishing=True)
        _save_or_match(delta, out, cfg.force)
        keep = resumed and not cfg.force  # a killed run of this job wrote them
        if not (keep and log_path.exists()):
            write_json(log_path, {"config": comparable(cfg), "summary": summary, "log": log},
                       overwrite=cfg.force)
        title = f"spdelta {cfg.method} on {Path(cfg.model).name}"
        plotted = (keep and png.exists()) or plot_losses(log, png, title, cfg.force)
        run.speak(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB, nnz {delta.nnz:,}); "
                  f"log {log_path}" + (f"; loss curve {png}" if plotted else
                                       "; no loss curve (pip install matplotlib)"))
    if run.world > 1:
        torch.distributed.barrier()
    if run.rank == 0:  # finished: the delta file is the result
        left = remove_checkpoint(ckpt)
        if left:
            run.speak(f"kept {ckpt}: it holds files spdelta did not write "
                      f"({', '.join(left[:5])}); the checkpoint in it is removed.")
