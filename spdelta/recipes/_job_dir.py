"""A training job's claim on its outputs and its checkpoint directory (nothing lost).

A run claims its output and its checkpoint directory at start (:func:`spdelta._io.claim`,
rank 0 under ``torchrun``). The checkpoint directory carries ``spdelta-checkpoint.json``,
the marker that spdelta wrote it; a directory that holds anything else is refused, and
at the end only spdelta's own entries are removed (the directory too if spdelta made it).
The marker also records that a run began writing its outputs (``finishing``), so that a
run killed then can be resumed: it keeps the outputs that are already there when they are
this run's (the delta byte for byte) and refuses anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spdelta._io import atomic_write, claim, is_temp_of, remove_stale, user_os_error
from spdelta.errors import OutputExistsError, ParameterError
from spdelta.format import read_header
from spdelta.format.constants import KEY_TRAINING
from spdelta.recipes._job_config import TrainConfig

__all__ = ["MARKER", "ckpt_dir", "claim_run", "mark", "outputs", "remove_checkpoint"]

#: The file that marks a checkpoint directory as spdelta's, and what spdelta writes there.
MARKER = "spdelta-checkpoint.json"
_MARKER_FORMAT = "spdelta.train_checkpoint/1"
OWN = (MARKER, "job.json", "state", "state.tmp", "state.old")  # .tmp/.old: earlier versions


def ckpt_dir(cfg: TrainConfig) -> Path:
    """``--checkpoint-dir``, default ``<output>.ckpt``."""
    return Path(cfg.checkpoint_dir or cfg.output + ".ckpt")


def outputs(cfg: TrainConfig) -> list[Path]:
    """The files a finished run writes: the delta, its JSON log and its loss curve."""
    out = Path(cfg.output)
    return [out, out.with_name(out.name + ".log.json"), out.with_name(out.name + ".loss.png")]


def _marker(ckpt: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == _MARKER_FORMAT else None


def _ours(entry: str) -> bool:
    """An entry spdelta writes in a checkpoint directory, or a leftover of a killed write."""
    return entry in OWN or any(is_temp_of(entry, name) or entry == f".{name}.lock"
                               for name in OWN)


def _refuse_foreign(ckpt: Path) -> None:
    """A checkpoint directory must be new, empty, or marked as spdelta's."""
    if not ckpt.exists() and not ckpt.is_symlink():
        return
    if not ckpt.is_dir():
        raise ParameterError(f"--checkpoint-dir {str(ckpt)!r} is not a directory; choose a new "
                             "or empty directory.")
    if _marker(ckpt) is not None:
        return
    found = sorted(os.listdir(ckpt))
    if {"job.json", "state"} <= set(found) and all(map(_ours, found)):
        raise ParameterError(
            f"--checkpoint-dir {str(ckpt)!r} holds a checkpoint of an earlier spdelta, whose "
            "state file format can run code when read; it is not read. Delete the directory "
            "to start over.")
    foreign = [n for n in found if not _ours(n)]
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ParameterError(
            f"--checkpoint-dir {str(ckpt)!r} holds files spdelta did not write ({shown}); "
            "spdelta deletes its checkpoint when the run finishes, so it only uses a new or "
            "empty directory or one of its own checkpoints. Choose another --checkpoint-dir.")


def _finished(cfg: TrainConfig, comparable: dict[str, Any]) -> bool:
    """Whether the output is this job's finished delta (its training record is these settings)."""
    try:
        meta, _ = read_header(cfg.output)
        record = json.loads(meta.get(KEY_TRAINING, "{}"))
    except (OSError, ValueError):  # not a readable delta: not ours
        return False
    return isinstance(record, dict) and all(record.get(k) == v for k, v in comparable.items())


@contextlib.contextmanager
def claim_run(cfg: TrainConfig, rank: int, comparable: dict[str, Any]) -> Iterator[str]:
    """Rank 0 holds the output and the checkpoint directory for the run; checks both first.

    Yields:
        ``"finishing"`` when a run of this job (resumed now) had begun writing its
        outputs, ``"finished"`` when ``--resume`` finds this job's delta written and its
        checkpoint gone (nothing to do), else ``"new"``.

    Raises:
        OutputExistsError: An output exists and ``cfg.force`` is false.
        OutputBusyError: Another run holds the output or the checkpoint directory.
        ParameterError: The checkpoint directory holds files spdelta did not write.
    """
    out, ckpt = Path(cfg.output), ckpt_dir(cfg)
    if rank != 0:  # reads only; every rank must agree on "finished" (no process group yet)
        done = cfg.resume and _marker(ckpt) is None and out.exists() and _finished(cfg,
                                                                                  comparable)
        yield "finished" if done else "new"
        return
    for folder in {out.absolute().parent, ckpt.absolute().parent}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise user_os_error(folder, e) from e
    with claim(out), claim(ckpt):
        for path in outputs(cfg)[1:]:  # the claim on ``out`` covers the log and the plot
            remove_stale(path)
        _refuse_foreign(ckpt)
        marker = _marker(ckpt)
        status = "new"
        if cfg.resume and marker is not None and marker.get("finishing") is True:
            status = "finishing"
        elif cfg.resume and marker is None and out.exists() and _finished(cfg, comparable):
            status = "finished"
        for path in outputs(cfg):
            if path.exists() and not (cfg.force or status != "new"):
                raise OutputExistsError(f"output {str(path)!r} exists; pass --force to replace "
                                        "it, or choose another -o.")
        yield status


def mark(ckpt: Path, *, finishing: bool = False) -> None:
    """Create the checkpoint directory (or adopt an empty one) and write the marker.

    With ``finishing``, record that the run is about to write its outputs.
    """
    doc = _marker(ckpt)
    if doc is None:
        created = not ckpt.exists()
        ckpt.mkdir(parents=True, exist_ok=True)
        doc = {"format": _MARKER_FORMAT, "created_directory": created}
    elif not finishing or doc.get("finishing") is True:
        return
    if finishing:
        doc["finishing"] = True
    with atomic_write(ckpt / MARKER) as f:
        f.write(json.dumps(doc, sort_keys=True).encode())


def remove_checkpoint(ckpt: Path) -> list[str]:
    """Delete what spdelta wrote in a marked checkpoint directory; return what else is there.

    The marker goes last, and the directory itself only if spdelta created it and
    nothing else is left.
    """
    doc = _marker(ckpt)
    if doc is None:
        return []
    for name in OWN[1:]:  # and what killed writes left beside them
        remove_stale(ckpt / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ckpt / f".{name}.lock")
        path = ckpt / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    remove_stale(ckpt / MARKER)
    (ckpt / MARKER).unlink()
    left = sorted(os.listdir(ckpt))
    if doc.get("created_directory") is True and not left:
        ckpt.rmdir()
    return left
