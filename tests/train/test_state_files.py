"""Resuming reads no pickle: a crafted checkpoint that would run code is refused unrun."""

from __future__ import annotations

import json
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spdelta.cli.main import main
from spdelta.dist import load_checkpoint, save_checkpoint
from spdelta.errors import SpdeltaError
from spdelta.optim import adamw, chain, sm3
from spdelta.recipes._job_io import comparable
from spdelta.recipes.job import TrainConfig
from spdelta.train import TrainState, load_state, spiel_init


class _Touch:
    """Unpickling this creates ``path``: the payload of a crafted checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _payload(path: Path) -> bytes:
    data = pickle.dumps(_Touch(path))
    assert b"touch" in data
    return data


def test_the_payload_works(tmp_path: Path) -> None:
    pickle.loads(_payload(tmp_path / "ran"))  # noqa: S301 - shows the payload is live
    assert (tmp_path / "ran").exists()


def _crafted_dcp(state_dir: Path, victim: Path) -> None:
    """A ``torch.distributed.checkpoint`` directory whose ``.metadata`` runs code."""
    state_dir.mkdir(parents=True)
    (state_dir / ".metadata").write_bytes(_payload(victim))
    (state_dir / "__0_0.distcp").write_bytes(_payload(victim))


def test_load_checkpoint_refuses_a_crafted_dcp_checkpoint_without_running_it(tmp_path: Path
                                                                             ) -> None:
    victim = tmp_path / "pwned"
    _crafted_dcp(tmp_path / "state", victim)
    with pytest.raises(SpdeltaError, match="pickle"):
        load_checkpoint(tmp_path / "state")
    assert not victim.exists()


def test_train_resume_refuses_a_crafted_checkpoint_without_running_it(
    tiny_lm_dir: str, tmp_path: Path, sums_file: Callable[[Path, int], Path],
    capsys: pytest.CaptureFixture[str]
) -> None:
    data = sums_file(tmp_path / "sums.jsonl", 8)
    out, ckpt, victim = tmp_path / "d.st", tmp_path / "d.st.ckpt", tmp_path / "pwned"
    cfg = TrainConfig(model=tiny_lm_dir, data=str(data), output=str(out), steps=2,
                      batch_size=4, max_length=16, calibration_examples=4, density=0.05,
                      resume=True, progress=False)
    _crafted_dcp(ckpt / "state", victim)
    (ckpt / "job.json").write_text(json.dumps({"config": comparable(cfg), "log": []}))
    (ckpt / "spdelta-checkpoint.json").write_text(json.dumps(
        {"format": "spdelta.train_checkpoint/1", "created_directory": True}))
    code = main(["train", "--model", tiny_lm_dir, "--data", str(data), "-o", str(out),
                 "--steps", "2", "--batch-size", "4", "--max-length", "16",
                 "--calibration-examples", "4", "--density", "0.05", "--resume",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pickle" in err, err
    assert not victim.exists() and not out.exists()


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("node", [
    {"__reduce__": ["os.system", "touch pwned"]},
    {"__tensor__": "missing"},
    {"__dict__": [1, 2]},
    {"__state__": "system", "fields": {"command": "touch pwned"}},  # not a known state class
    {"__state__": "TrainState", "fields": {"values": {}, "opt_state": None, "step": 1, "x": 2}},
    "top",  # the whole tree is an AdamWState, not the TrainState the document names
])
def test_a_state_file_is_data_only(tmp_path: Path, node: object, version: int) -> None:
    save_checkpoint(TrainState({"w": torch.ones(2)}, None, 3), tmp_path / "ck")
    file = tmp_path / "ck" / "state.safetensors"
    fields = {"values": node, "opt_state": None, "step": 3}
    tree = ({"__dict__": fields} if version == 2 else
            {"__state__": "TrainState", "fields": fields})
    if node == "top":
        tree = {"__state__": "AdamWState", "fields": {"steps": {"__dict__": {}}, "mu": None,
                                                      "nu": None, "num_updates": 0}}
    doc = {"format": f"spdelta.train_state/{version}", "kind": "TrainState", "tree": tree}
    save_file({"s::values::w": torch.ones(2)}, str(file),
              metadata={"spdelta.state": json.dumps(doc)})
    with pytest.raises(SpdeltaError, match="training state"):
        load_checkpoint(tmp_path / "ck")
    assert not (tmp_path / "pwned").exists()


def test_load_state_refuses_a_pickle(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    (tmp_path / "state.pt").write_bytes(_payload(victim))
    with pytest.raises(SpdeltaError, match="not a readable"):
        load_state(tmp_path / "state.pt")
    assert not victim.exists()


def test_a_version_2_file_loads_as_it_was_written() -> None:
    """``data/spiel_state_v2.safetensors`` was written by the version-2 writer (before the
    optimizer states were stored generically): chain(adamw, sm3 with momentum), one update."""
    sup = {"w": torch.tensor([1, 3])}
    opt = chain(adamw(0.1), sm3(0.1, support=sup, shapes={"w": (2, 2)}, momentum=0.5))
    state = spiel_init({"w": torch.ones(2)}, sup, opt, generator=torch.Generator().manual_seed(0))
    _, moved = opt.update({"w": torch.tensor([1.0, 2.0])}, state.opt_state, state.values)
    want = state._replace(opt_state=moved, step=1,
                          grad_acc={"w": torch.tensor([0.5, 0.0, -1.0, 2.0])})
    back = load_state(Path(__file__).parent / "data" / "spiel_state_v2.safetensors")
    assert type(back.opt_state[1].accumulators["w"]) is tuple
    assert back.opt_state[0].num_updates == 1 and back.opt_state[1].steps == 1
    flat_back, flat_want = _leaves(back), _leaves(want)
    assert [type(x) for x in flat_back] == [type(x) for x in flat_want]
    for a, b in zip(flat_back, flat_want, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _leaves(tree: object) -> list[object]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [type(tree), *(x for v in tree for x in _leaves(v))]
    return [tree]
