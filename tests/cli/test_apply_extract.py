"""``spdelta apply`` and ``spdelta extract`` through ``main(argv)`` on real tiny HF checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from spdelta import SparseDelta
from spdelta.cli import main
from spdelta.format import file_sha256, load_delta, save_delta
from spdelta.hf import checkpoint_shards

Capsys = pytest.CaptureFixture[str]
pytestmark = pytest.mark.hf


def _run(capsys: Capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()  # drop earlier output (save_pretrained's progress bar)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, command: str) -> None:
    assert err.count("\n") == 1 and err.startswith(f"spdelta {command}: error: "), err


def weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory, over all its shards."""
    out: dict[str, Tensor] = {}
    for shard in checkpoint_shards(path):
        out.update(load_file(path / shard))
    return out


def per_tensor_delta(params: dict[str, Tensor], density: float, seed: int) -> SparseDelta:
    """``floor(density * numel + 0.5)`` entries per tensor (extract's per-tensor budget),
    with magnitudes >= 0.05 so that ``(w + v) - w`` is never zero."""
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    for name, p in sorted(params.items()):
        k = math.floor(density * p.numel() + 0.5)
        if k == 0:
            continue
        idx = torch.randperm(p.numel(), generator=gen)[:k].sort().values
        mags = 0.05 + torch.rand(k, generator=gen) * 0.1
        signs = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
        entries[name] = (tuple(p.shape), idx, (mags * signs).to(p.dtype))
    return SparseDelta(entries)


@pytest.fixture(params=["single", "sharded"])
def checkpoint(request: pytest.FixtureRequest, tiny_llama: nn.Module, tmp_path: Path) -> Path:
    """A float32 tiny Llama saved with ``save_pretrained``: one file, or six shards."""
    path = tmp_path / "base"
    size = "20KB" if request.param == "sharded" else "5GB"
    tiny_llama.float().save_pretrained(path, max_shard_size=size)
    assert len(checkpoint_shards(path)) == (1 if request.param == "single" else 6)
    return path


# ------------------------------------------------------------------------------- apply
def test_apply_writes_base_plus_delta(checkpoint: Path, tmp_path: Path, capsys: Capsys) -> None:
    base = weights(checkpoint)
    delta = per_tensor_delta(base, 0.1, seed=0)
    save_delta(delta, tmp_path / "d.st")
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys,
        "apply",
        "--base",
        checkpoint,
        "--delta",
        tmp_path / "d.st",
        "-o",
        out,
        "--alpha",
        "0.5",
    )
    assert code == 0 and err == ""
    assert f"patched {len(delta)} tensors" in stdout and str(out) in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    assert checkpoint_shards(out) == checkpoint_shards(checkpoint)
    got = weights(out)
    for name, w in base.items():
        expected = w.flatten().clone()
        if name in delta:
            e = delta[name]
            expected[e.indices] += 0.5 * e.values
        assert torch.equal(got[name], expected.view(w.shape)), name
    assert (out / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()


def test_apply_existing_output_needs_force(
    checkpoint: Path, tmp_path: Path, capsys: Capsys
) -> None:
    save_delta(per_tensor_delta(weights(checkpoint), 0.1, seed=0), tmp_path / "d.st")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["apply", "--base", checkpoint, "--delta", tmp_path / "d.st", "-o", out]
    code, stdout, err = _run(capsys, *argv)
    assert code == 1 and stdout == "" and "--force" in err
    _one_error_line(err, "apply")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = _run(capsys, *argv, "--force")
    assert code == 0 and not (out / "keep.txt").exists()


def _wrong_shape(base: dict[str, Tensor], delta: SparseDelta) -> SparseDelta:
    entries = dict(delta.items())
    last = sorted(base)[-1]  # fails in the last shard, after others were written
    entries[last] = ((3, 3), torch.tensor([0]), torch.ones(1))
    return SparseDelta(entries)


def _unknown_name(base: dict[str, Tensor], delta: SparseDelta) -> SparseDelta:
    return SparseDelta(
        {**dict(delta.items()), "nope.weight": ((2,), torch.tensor([0]), torch.ones(1))}
    )


def _mismatched_base(base: dict[str, Tensor], delta: SparseDelta) -> SparseDelta:
    return delta.with_metadata({"spdelta.base_model.fingerprint": "sha256:0123456789abcdef"})


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_wrong_shape, "shape"),
        (_unknown_name, "'nope.weight'"),
        (_mismatched_base, "--allow-base-mismatch"),
        (None, "V1"),
    ],
)
def test_apply_bad_delta_fails_and_leaves_no_output(
    checkpoint: Path, tmp_path: Path, capsys: Capsys, make: object, needle: str
) -> None:
    base = weights(checkpoint)
    path = tmp_path / "d.st"
    good = per_tensor_delta(base, 0.1, seed=0)
    if make is None:  # a truncated file
        save_delta(good, path)
        path.write_bytes(path.read_bytes()[:-7])
    else:
        save_delta(make(base, good), path)  # type: ignore[operator]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run(
        capsys, "apply", "--base", checkpoint, "--delta", path, "-o", tmp_path / "out"
    )
    assert code == 1 and stdout == "" and needle in err
    _one_error_line(err, "apply")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp dir


def test_apply_allow_base_mismatch(checkpoint: Path, tmp_path: Path, capsys: Capsys) -> None:
    delta = _mismatched_base({}, per_tensor_delta(weights(checkpoint), 0.1, seed=0))
    save_delta(delta, tmp_path / "d.st")
    code, _, _ = _run(
        capsys,
        "apply",
        "--base",
        checkpoint,
        "--delta",
        tmp_path / "d.st",
        "-o",
        tmp_path / "out",
        "--allow-base-mismatch",
    )
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()


def test_apply_missing_base_is_one_line(tmp_path: Path, capsys: Capsys) -> None:
    save_delta(SparseDelta({}), tmp_path / "d.st")
    code, _, err = _run(
        capsys,
        "apply",
        "--base",
        tmp_path / "nope",
        "--delta",
        tmp_path / "d.st",
        "-o",
        tmp_path / "out",
    )
    assert code == 1 and "model.safetensors" in err
    _one_error_line(err, "apply")


# ------------------------------------------------------------------------------- extract
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_extract_of_apply_recovers_the_delta(
    checkpoint: Path, tmp_path: Path, capsys: Capsys, scope: str
) -> None:
    base = weights(checkpoint)
    delta = per_tensor_delta(base, 0.05, seed=1)
    save_delta(delta, tmp_path / "d.st")
    tuned = tmp_path / "tuned"
    code, _, _ = _run(
        capsys, "apply", "--base", checkpoint, "--delta", tmp_path / "d.st", "-o", tuned
    )
    assert code == 0
    # The global budget equals the per-tensor one here: density * numel summed.
    density = 0.05 if scope == "per_tensor" else delta.nnz / sum(p.numel() for p in base.values())
    out = tmp_path / "x.st"
    code, stdout, err = _run(
        capsys,
        "extract",
        "--base",
        checkpoint,
        "--tuned",
        tuned,
        "--density",
        density,
        "--scope",
        scope,
        "-o",
        out,
    )
    assert code == 0 and err == "" and f"nnz {delta.nnz}" in stdout
    got = load_delta(out)
    assert got.keys() == delta.keys()
    for name, e in delta.items():
        assert torch.equal(got[name].indices, e.indices), name
        torch.testing.assert_close(got[name].values, e.values, rtol=0, atol=1e-6)
    record = json.loads(got.metadata["spdelta.provenance"])
    assert record["operation"] == "extract" and record["command"].startswith("spdelta extract")
    assert record["parameters"] == {"density": density, "scope": scope, "targets": None}
    assert [(i["role"], i["dir"]) for i in record["inputs"]] == [
        ("base", "base"),
        ("tuned", "tuned"),
    ]
    shard = sorted(checkpoint_shards(checkpoint))[0]
    assert record["inputs"][0]["files"][shard] == file_sha256(checkpoint / shard)
    assert got.metadata["spdelta.base_model.fingerprint"].startswith("base1:")
    # The extracted delta carries the base fingerprint: apply checks it and accepts it.
    code, _, err = _run(
        capsys, "apply", "--base", checkpoint, "--delta", out, "-o", tmp_path / "o2"
    )
    assert code == 0, err


def test_extract_targets_and_value_dtype(
    tiny_llama: nn.Module, tmp_path: Path, capsys: Capsys
) -> None:
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    tiny_llama.float().save_pretrained(base_dir)
    base = weights(base_dir)
    delta = per_tensor_delta({n: p for n, p in base.items() if "mlp" in n}, 0.1, seed=2)
    save_delta(delta, tmp_path / "d.st")
    assert (
        _run(capsys, "apply", "--base", base_dir, "--delta", tmp_path / "d.st", "-o", tuned_dir)[0]
        == 0
    )
    out = tmp_path / "x.st"
    code, _, _ = _run(
        capsys,
        "extract",
        "--base",
        base_dir,
        "--tuned",
        tuned_dir,
        "--density",
        "0.1",
        "--targets",
        r"mlp\.",
        "--value-dtype",
        "bf16",
        "-o",
        out,
    )
    got = load_delta(out)
    assert code == 0 and got.keys() == delta.keys()
    assert all(e.values.dtype == torch.bfloat16 for _, e in got.items())
    assert json.loads(got.metadata["spdelta.provenance"])["parameters"]["value_dtype"] == "bf16"


def test_extract_existing_output_needs_force(
    tiny_llama: nn.Module, tmp_path: Path, capsys: Capsys
) -> None:
    tiny_llama.float().save_pretrained(tmp_path / "base")
    out = tmp_path / "x.st"
    out.write_bytes(b"mine")
    argv = [
        "extract",
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "base",
        "--density",
        "0.1",
        "-o",
        out,
    ]
    code, stdout, err = _run(capsys, *argv)
    assert code == 1 and stdout == "" and "--force" in err and out.read_bytes() == b"mine"
    _one_error_line(err, "extract")
    code, stdout, _ = _run(capsys, *argv, "--force")
    assert code == 0 and "0 tensors" in stdout and len(load_delta(out)) == 0


def test_extract_different_architectures_fail_cleanly(
    tiny_llama: nn.Module, tmp_path: Path, capsys: Capsys
) -> None:
    tiny_llama.float().save_pretrained(tmp_path / "a")
    from safetensors.torch import save_file

    (tmp_path / "b").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "b" / "model.safetensors")
    code, _, err = _run(
        capsys,
        "extract",
        "--base",
        tmp_path / "a",
        "--tuned",
        tmp_path / "b",
        "--density",
        "0.1",
        "-o",
        tmp_path / "x.st",
    )
    assert code == 1 and "different tensors" in err and not (tmp_path / "x.st").exists()
    _one_error_line(err, "extract")


@pytest.mark.parametrize(
    "extra",
    [
        ["--density", "1.5"],
        ["--density", "x"],
        ["--density", "0.1", "--targets", "("],
        ["--density", "0.1", "--scope", "row"],
    ],
)
def test_extract_usage_errors_exit_2(tmp_path: Path, capsys: Capsys, extra: list[str]) -> None:
    code = main(["extract", "--base", "a", "--tuned", "b", "-o", str(tmp_path / "x"), *extra])
    assert code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["apply", "extract"])
def test_help_ends_with_examples(command: str, capsys: Capsys) -> None:
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0 and out.rstrip().splitlines()[-1].strip().startswith(f"spdelta {command}")
