"""A training job's files: its checkpoint (state, log, settings) and its outputs.

The checkpoint directory holds ``spdelta-checkpoint.json`` (the marker: spdelta wrote
this directory), ``job.json`` (the comparable settings and the log) and ``state/``
(:func:`spdelta.dist.save_checkpoint`). The outputs are the delta file,
``<output>.log.json`` and ``<output>.loss.png``. A run claims the output and the
checkpoint directory at start (:func:`spdelta._io.claim`); a checkpoint directory that
holds anything without the marker is refused, and only what spdelta wrote is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spdelta._io import atomic_write, claim, remove_stale, user_os_error
from spdelta.delta import SparseDelta
from spdelta.errors import OutputExistsError, ParameterError, SpdeltaError
from spdelta.format.constants import KEY_BASE_MODEL, KEY_FINGERPRINT, KEY_TRAINING
from spdelta.train._spiel_io import SpielState

if TYPE_CHECKING:
    from spdelta.train.job import TrainConfig, _Run

# Fields that change how a run is executed, not what it computes: free to differ on resume.
RUN_ONLY = frozenset({"checkpoint_every", "checkpoint_dir", "resume", "stop_after", "progress",
                      "force", "fsdp", "device"})


#: The file that marks a checkpoint directory as spdelta's, and what spdelta writes there.
MARKER = "spdelta-checkpoint.json"
_MARKER_FORMAT = "spdelta.train_checkpoint/1"
OWN = (MARKER, "job.json", "state", "state.tmp", "state.old")  # .tmp/.old: earlier versions


def ckpt_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint_dir or cfg.output + ".ckpt")


def outputs(cfg: TrainConfig) -> list[Path]:
    """The files a finished run writes: the delta, its JSON log and its loss curve."""
    out = Path(cfg.output)
    return [out, out.with_name(out.name + ".log.json"), out.with_name(out.name + ".loss.png")]


def _refuse_foreign(ckpt: Path) -> None:
    """A checkpoint directory must be new, empty, or marked as spdelta's."""
    if not ckpt.exists() and not ckpt.is_symlink():
        return
    if not ckpt.is_dir():
        raise ParameterError(f"--checkpoint-dir {str(ckpt)!r} is not a directory; choose a new "
                             "or empty directory.")
    if (ckpt / MARKER).is_file():
        return
    found = sorted(os.listdir(ckpt))
    if found and set(found) <= set(OWN):
        raise ParameterError(
            f"--checkpoint-dir {str(ckpt)!r} holds a checkpoint of an earlier spdelta, whose "
            "state file format can run code when read; it is not read. Delete the directory "
            "to start over.")
    if found:
        shown = ", ".join(repr(n) for n in found[:5]) + (" ..." if len(found) > 5 else "")
        raise ParameterError(
            f"--checkpoint-dir {str(ckpt)!r} holds files spdelta did not write ({shown}); "
            "spdelta deletes its checkpoint when the run finishes, so it only uses a new or "
            "empty directory or one of its own checkpoints. Choose another --checkpoint-dir.")


@contextlib.contextmanager
def claim_run(cfg: TrainConfig, rank: int) -> Iterator[None]:
    """Rank 0 holds the output and the checkpoint directory for the run; checks both first.

    Raises:
        OutputExistsError: An output exists and ``cfg.force`` is false.
        OutputBusyError: Another run holds the output or the checkpoint directory.
        ParameterError: The checkpoint directory holds files spdelta did not write.
    """
    if rank != 0:
        yield
        return
    out, ckpt = Path(cfg.output), ckpt_dir(cfg)
    for folder in {out.absolute().parent, ckpt.absolute().parent}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise user_os_error(folder, e) from e
    with claim(out), claim(ckpt):
        for path in outputs(cfg):
            if path.exists() and not cfg.force:
                raise OutputExistsError(f"output {str(path)!r} exists; pass --force to replace "
                                        "it, or choose another -o.")
        _refuse_foreign(ckpt)
        yield


def _mark(ckpt: Path) -> None:
    """Create the checkpoint directory (or adopt an empty one) and write the marker."""
    if (ckpt / MARKER).is_file():
        return
    created = not ckpt.exists()
    ckpt.mkdir(parents=True, exist_ok=True)
    write_json(ckpt / MARKER, {"format": _MARKER_FORMAT, "created_directory": created})


def remove_checkpoint(ckpt: Path) -> list[str]:
    """Delete what spdelta wrote in a marked checkpoint directory; return what else is there.

    The directory itself goes only if spdelta created it and nothing else is left.
    """
    marker = ckpt / MARKER
    if not marker.is_file():
        return []
    created = json.loads(marker.read_text()).get("created_directory") is True
    for name in ("job.json", "state"):  # and what killed writes left beside them
        remove_stale(ckpt / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ckpt / f".{name}.lock")
    for name in OWN[1:]:
        path = ckpt / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    marker.unlink()
    left = sorted(os.listdir(ckpt))
    if created and not left:
        ckpt.rmdir()
    return left


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
    from spdelta.dist import save_checkpoint

    if rank == 0:
        _mark(ckpt)
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
    from spdelta.dist import load_checkpoint

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
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(buf.getvalue())
    return True



def finish(cfg: TrainConfig, run: _Run, model: Any, state: SpielState,
           log: list[dict[str, float]], summary: dict[str, Any]) -> None:
    """Write the delta (with its metadata), the JSON log and the loss curve; drop the checkpoint.

    Every rank takes part (an FSDP2 delta is gathered from all of them); rank 0 writes.
    """
    from spdelta.format import save_delta

    nnz, entries = summary["nnz"], summary["target_entries"]
    record = {**comparable(cfg), "nnz": nnz, "achieved_density": nnz / max(1, entries),
              "total_steps": run.total, "data_format": run.data.format}
    meta = {KEY_TRAINING: json.dumps(record, sort_keys=True),
            KEY_BASE_MODEL: str(getattr(model.config, "_name_or_path", "") or cfg.model),
            KEY_FINGERPRINT: run.fingerprint}
    if cfg.fsdp:
        from spdelta.dist import fsdp_delta

        got = fsdp_delta(model, state)  # every rank gathers
        support = {n: got[n].indices if n in got else torch.zeros(0, dtype=torch.long)
                   for n in run.shapes}
        values = {n: got[n].values if n in got else torch.zeros(0) for n in run.shapes}
    else:
        support, values = state.support, state.values
    delta = SparseDelta.from_support({n: i.cpu() for n, i in support.items()},
                                     {n: v.cpu() for n, v in values.items()}, run.shapes,
                                     metadata=meta)
    out, ckpt = Path(cfg.output), ckpt_dir(cfg)
    if run.rank == 0:
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        _, log_path, png = outputs(cfg)
        save_delta(delta, out, overwrite=cfg.force)  # checked again, atomically
        write_json(log_path, {"config": comparable(cfg), "summary": summary, "log": log},
                   overwrite=cfg.force)
        plotted = plot_losses(log, png, f"spdelta {cfg.method} on {Path(cfg.model).name}",
                              cfg.force)
        run.speak(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB, nnz {nnz:,}); "
                  f"log {log_path}" + (f"; loss curve {png}" if plotted else
                                       "; no loss curve (pip install matplotlib)"))
    if run.world > 1:
        torch.distributed.barrier()
    if run.rank == 0:  # finished: the delta file is the result
        left = remove_checkpoint(ckpt)
        if left:
            run.speak(f"kept {ckpt}: it holds files spdelta did not write "
                      f"({', '.join(left[:5])}); the checkpoint in it is removed.")
