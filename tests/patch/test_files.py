"""``spdelta diff`` and ``spdelta apply`` on checkpoints on disk: bit-exact, chained, refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from spdelta.cli import main
from spdelta.errors import (
    BaseMismatchError,
    CompositionError,
    KeyMismatchError,
    MetadataError,
    ParameterError,
)
from spdelta.files import compose_files, convert_file, merge_files, quantize_file
from spdelta.format import DeltaReader, load_patch, read_header, save_delta
from spdelta.format.constants import KEY_FINGERPRINT, KEY_RESULT_FINGERPRINT
from spdelta.format.fingerprint import sample_record, tensor_record
from spdelta.hf import checkpoint_fingerprint, checkpoint_shards, extract_delta
from spdelta.patch import apply_patch, bit_view, diff_checkpoints
from spdelta.patch._diff_files import Samples, exact_entry
from spdelta.patch._source import Source

Capsys = pytest.CaptureFixture[str]
#: One tensor of every dtype a checkpoint may hold, with values an arithmetic path would lose.
SPECIALS = {
    torch.bfloat16: [0x7FC1, 0x8000, 0x0001, 0x7F80], torch.float16: [0x7E01, 0x8001, 0xFC00],
    torch.float32: [0x7F800001, 0x80000000, 0x00000001], torch.float64: [0x7FF0000000000001],
}


def _bits(words: list[int], dtype: torch.dtype) -> Tensor:
    size = dtype.itemsize
    raw = b"".join((w % 2 ** (8 * size)).to_bytes(size, "little") for w in words)
    return torch.tensor(list(raw), dtype=torch.uint8).view(dtype)


def step(seed: int) -> dict[str, Tensor]:
    """Checkpoint ``seed`` of a training run: every dtype, a few entries change per step."""
    gen = torch.Generator().manual_seed(0)
    out = {
        "model.embed_tokens.weight": torch.randn(48, 16, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=gen).bfloat16(),
        "model.norm.weight": torch.randn(16, generator=gen),
        "model.head.bias": torch.randn(10, generator=gen).half(),
        "model.scale": torch.randn(3, generator=gen).double(),
        "model.rope.inv_freq": torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
        "step": torch.tensor(0),
        "model.position_ids": torch.arange(12, dtype=torch.int32),
        "model.mask": torch.zeros(6, dtype=torch.bool),
        "model.cplx": torch.zeros(2, dtype=torch.complex64),
    }
    gen = torch.Generator().manual_seed(seed)
    for i in range(seed):
        for t in out.values():
            flat = t.view(-1)
            pos = torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=gen)
            if t.dtype in SPECIALS:
                words = SPECIALS[t.dtype]
                cycle = [words[(i + j) % len(words)] for j in range(pos.numel())]
                flat[pos] = _bits(cycle, t.dtype)
            elif t.dtype == torch.bool:
                flat[pos] = ~flat[pos]
            else:
                flat[pos] = (torch.rand(pos.numel(), generator=gen) * 100).to(t.dtype)
    return out


def save_checkpoint(tensors: dict[str, Tensor], folder: Path, shards: int = 3) -> Path:
    """A sharded checkpoint: ``model-0000i-of-0000n.safetensors`` and the index json."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    return folder


def weights(folder: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for shard in checkpoint_shards(folder):
        out.update(load_file(folder / shard))
    return out


def assert_bitwise(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert torch.equal(bit_view(got[name]), bit_view(want[name])), name


def _run(capsys: Capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    """Four consecutive checkpoints of a run, sharded (3 shards each)."""
    return [save_checkpoint(step(i), tmp_path / f"c{i}") for i in range(4)]


def test_diff_then_apply_is_bitwise_on_sharded_checkpoints(chain: list[Path], tmp_path: Path,
                                                          capsys: Capsys) -> None:
    code, out, _ = _run(capsys, "diff", chain[0], chain[1], "-o", tmp_path / "p.st")
    assert code == 0 and "exact patch" in out
    meta, infos = read_header(tmp_path / "p.st")
    assert meta["spdelta.format_version"] == "1.3"
    assert {i.value_encoding for i in infos.values()} == {"replace"}
    assert meta[KEY_FINGERPRINT] == checkpoint_fingerprint(chain[0])
    assert meta[KEY_RESULT_FINGERPRINT] == checkpoint_fingerprint(chain[1])
    code, out, _ = _run(capsys, "apply", "--base", chain[0], "--delta", tmp_path / "p.st",
                        "-o", tmp_path / "out")
    assert code == 0 and "result verified" in out
    assert_bitwise(weights(tmp_path / "out"), weights(chain[1]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in chain[0].iterdir())  # shards, index and config kept


def test_chain_applies_in_order_and_refuses_the_wrong_step(chain: list[Path], tmp_path: Path,
                                                           capsys: Capsys) -> None:
    patches = [tmp_path / f"p{i}{i + 1}.st" for i in range(3)]
    for i, p in enumerate(patches):
        assert _run(capsys, "diff", chain[i], chain[i + 1], "-o", p)[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(capsys, "apply", "--base", chain[0], "--delta", patches[1], "-o",
                        tmp_path / "wrong")
    assert code == 1 and err.count("\n") == 1
    assert checkpoint_fingerprint(chain[0]) in err and checkpoint_fingerprint(chain[1]) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp dir
    current = chain[0]
    for i, p in enumerate(patches):  # three applies in order, each bitwise the next step
        out = tmp_path / f"s{i + 1}"
        assert _run(capsys, "apply", "--base", current, "--delta", p, "-o", out)[0] == 0
        assert_bitwise(weights(out), weights(chain[i + 1]))
        current = out
    code, _, err = _run(capsys, "apply", "--base", tmp_path / "s1", "--delta", patches[2], "-o",
                        tmp_path / "skip")  # a step skipped: step 2's patch on step 1
    assert code == 1 and checkpoint_fingerprint(chain[2]) in err
    assert not (tmp_path / "skip").exists()
    code, _, err = _run(capsys, "apply", "--base", tmp_path / "s3", "--delta", patches[2], "-o",
                        tmp_path / "again")
    assert code == 1 and "already applied" in err and not (tmp_path / "again").exists()


def test_composed_chain_is_one_patch(chain: list[Path], tmp_path: Path, capsys: Capsys) -> None:
    p01, p12, p02 = (tmp_path / n for n in ("p01.st", "p12.st", "p02.st"))
    diff_checkpoints(chain[0], chain[1], p01)
    diff_checkpoints(chain[1], chain[2], p12)
    assert _run(capsys, "compose", p01, p12, "-o", p02)[0] == 0
    meta, _ = read_header(p02)
    assert meta[KEY_FINGERPRINT] == checkpoint_fingerprint(chain[0])
    assert meta[KEY_RESULT_FINGERPRINT] == checkpoint_fingerprint(chain[2])
    apply_patch(chain[0], p02, tmp_path / "out")
    assert_bitwise(weights(tmp_path / "out"), weights(chain[2]))
    code, _, err = _run(capsys, "compose", p12, p01, "-o", tmp_path / "bad.st")
    assert code == 1 and "not consecutive" in err and not (tmp_path / "bad.st").exists()
    with pytest.raises(CompositionError, match="merge methods combine additive"):
        merge_files([p01, p12], tmp_path / "m.st")


def test_single_files_and_tensor_sets(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(step(0), str(a))
    save_file(step(2), str(b))
    report = diff_checkpoints(a, b, tmp_path / "p.st")
    assert report["changed_tensors"] == report["tensors"] == 10
    apply_patch(a, tmp_path / "p.st", tmp_path / "c.safetensors")
    assert_bitwise(load_file(tmp_path / "c.safetensors"), load_file(b))
    extra = tmp_path / "extra.safetensors"
    save_file({**step(2), "new.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(KeyMismatchError, match=r"only in TUNED \['new.weight'\]"):
        diff_checkpoints(a, extra, tmp_path / "q.st")
    assert not (tmp_path / "q.st").exists()


def test_chunked_comparison_equals_whole_tensor(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    big = torch.randn(3001, generator=torch.Generator().manual_seed(3)).bfloat16()
    save_file({**step(0), "big": big}, str(a))  # > 1,024 elements: sampled positions
    save_file({**step(2), "big": big * 2}, str(b))
    tensors = (load_file(a), load_file(b))
    with Source(a) as sa, Source(b) as sb:
        for name in sa.names:
            whole = exact_entry(sa, sb, name)
            st = sa.tensors[name]
            samples = Samples(st.numel, tensors[0][name].element_size())
            chunked = exact_entry(sa, sb, name, chunk_bytes=56, samples=samples)  # 7-56 a chunk
            assert torch.equal(whole.indices, chunked.indices), name
            assert torch.equal(bit_view(whole.values), bit_view(chunked.values)), name
            for got, side in zip((samples.old, samples.new), tensors, strict=True):
                record = sample_record(name, st.dtype, st.shape, got.tobytes())
                assert record == tensor_record(name, side[name]), name


def test_lossy_mode_is_extract(tmp_path: Path, capsys: Capsys) -> None:
    finite = [{n: t for n, t in step(i).items() if n != "model.layers.0.mlp.up_proj.weight"}
              for i in (0, 2)]
    for t in finite[1].values():  # no NaN or inf: the additive mode needs finite changes
        if t.dtype in SPECIALS:
            t.view(-1)[~torch.isfinite(t.view(-1).float())] = 1.0
    chain = [save_checkpoint(t, tmp_path / f"f{i}") for i, t in enumerate(finite)]
    chain.append(chain[1])
    out = tmp_path / "d.st"
    code, text, _ = _run(capsys, "diff", chain[0], chain[2], "-o", out, "--density", "0.05")
    assert code == 0 and "lossy patch" in text
    got = load_patch(out)
    want = extract_delta(chain[0], chain[2], density=0.05)
    floating = [n for n in want.keys()]
    assert got.keys() == floating and got.replaced == []
    for name in floating:
        assert torch.equal(got[name].indices, want[name].indices)
        assert torch.equal(got[name].values, want[name].values)
    assert KEY_RESULT_FINGERPRINT not in read_header(out)[0]
    code, _, _ = _run(capsys, "diff", chain[0], chain[2], "-o", tmp_path / "k.st", "--topk", "2")
    assert code == 0 and all(e.nnz <= 2 for _, e in load_patch(tmp_path / "k.st").items())
    code, _, err = _run(capsys, "diff", chain[0], chain[2], "-o", tmp_path / "x.st",
                        "--targets", "mlp")
    assert code == 1 and "--density" in err
    nan = save_checkpoint({n: t for n, t in step(2).items() if n in finite[0]}, tmp_path / "nan")
    code, _, err = _run(capsys, "diff", chain[0].parent / "f0", nan, "-o", tmp_path / "y.st",
                        "--density", "0.5")
    assert code == 1 and "Use the exact diff" in err and not (tmp_path / "y.st").exists()


def test_alpha_is_refused_for_a_patch(chain: list[Path], tmp_path: Path, capsys: Capsys) -> None:
    diff_checkpoints(chain[0], chain[1], tmp_path / "p.st")
    code, _, err = _run(capsys, "apply", "--base", chain[0], "--delta", tmp_path / "p.st",
                        "-o", tmp_path / "o", "--alpha", "0.5")
    assert code == 1 and "cannot be scaled" in err and not (tmp_path / "o").exists()


def test_file_tools_on_patches(chain: list[Path], tmp_path: Path) -> None:
    p = tmp_path / "p.st"
    diff_checkpoints(chain[0], chain[1], p)
    with DeltaReader(p) as r, pytest.raises(ParameterError, match="replacement tensor"):
        r.read(r.names[0])
    convert_file(p, tmp_path / "c.st", index_encoding="abs64", value_dtype=torch.float32)
    assert load_patch(tmp_path / "c.st") == load_patch(p)  # replacement values never cast
    with pytest.raises(ParameterError, match="replacement tensor"):
        quantize_file(p, tmp_path / "q.st")
    assert not (tmp_path / "q.st").exists()
    with pytest.raises(CompositionError):  # an addition outside what the patch sets
        compose_files([p, _additive(tmp_path, chain[1])], tmp_path / "x.st")
    assert not (tmp_path / "x.st").exists()


def _additive(tmp_path: Path, base: Path) -> Path:
    from spdelta import SparseDelta

    path = tmp_path / "add.st"
    shape = tuple(weights(base)["model.norm.weight"].shape)
    d = SparseDelta({"model.norm.weight": (shape, torch.arange(16), torch.ones(16))},
                    metadata={KEY_FINGERPRINT: checkpoint_fingerprint(base)})  # = p's result
    save_delta(d, path)
    return path


def test_a_reader_of_format_1_2_refuses_a_patch(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """The 1.2 rules (no 'replace' encoding, MINOR 2) reject the file: nothing is misread."""
    from spdelta.format import _metadata, load_delta

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(step(0), str(a))
    save_file(step(1), str(b))
    diff_checkpoints(a, b, tmp_path / "p.st")
    monkeypatch.setattr(_metadata, "VALUE_ENCODINGS", ("raw", "int8", "int4"))
    monkeypatch.setattr(_metadata, "MINOR", 2)
    with pytest.raises(MetadataError, match="found 'replace'"):
        load_delta(tmp_path / "p.st")


def test_refusals_leave_no_file(tmp_path: Path) -> None:
    """Wrong base, or a result that is not the patch's: no output and no temp file."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"c{i}.safetensors")
        save_file(step(i), str(files[-1]))
    diff_checkpoints(files[1], files[2], tmp_path / "p12.st")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BaseMismatchError, match="wrong base"):
        apply_patch(files[0], tmp_path / "p12.st", tmp_path / "out.safetensors")
    patch = load_patch(tmp_path / "p12.st")
    lying = patch.with_metadata({**patch.metadata, KEY_RESULT_FINGERPRINT: "base1:" + "0" * 32})
    with pytest.raises(BaseMismatchError, match="not the patch's result"):
        apply_patch(files[1], lying, tmp_path / "out.safetensors")
    with pytest.raises(BaseMismatchError, match="not the patch's result"):
        apply_patch(tmp_path / "c1.safetensors", lying, tmp_path / "dir-out")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    apply_patch(files[1], lying, tmp_path / "out.safetensors", check_base=False)  # unchecked
    assert_bitwise(load_file(tmp_path / "out.safetensors"), load_file(files[2]))


@pytest.mark.parametrize("case", ["v4_replace_in_1_2", "v5_scale_on_replace", "v6_replace_f4",
                                  "v7_replace_length", "v4_result_fingerprint_in_1_2"])
def test_validate_reports_the_new_rules(case: str, capsys: Capsys) -> None:
    vectors = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "invalid"
    rule = json.loads((vectors / f"{case}.json").read_text())["rule"]
    code, out, _ = _run(capsys, "validate", vectors / f"{case}.safetensors", "--json")
    report = json.loads(out)
    assert code == 1 and report[0]["problems"][0]["rule"] == rule
    valid = vectors.parent / "valid" / "replace_dtypes.safetensors"
    assert _run(capsys, "validate", valid)[0] == 0


def test_reads_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file(step(1), str(tmp_path / "a.safetensors"))
    with Source(tmp_path / "a.safetensors") as src:
        want = {n: bit_view(src.read(n)).clone() for n in src.names}
        monkeypatch.delattr(os, "preadv")
        for name in src.names:
            assert torch.equal(bit_view(src.read(name)), want[name])


def test_a_legacy_fingerprint_still_verifies_on_a_file_base(tmp_path: Path) -> None:
    from spdelta import SparseDelta
    from spdelta.format.fingerprint import legacy_combine, legacy_file_sample

    a = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(8), "b": torch.ones(2)}, str(a))
    legacy = legacy_combine({"w": legacy_file_sample(a, "w", "w")})
    for fp, ok in ((legacy, True), ("sha256:" + "0" * 16, False)):
        d = SparseDelta({"w": ((8,), torch.tensor([3]), torch.tensor([2.0]))},
                        metadata={KEY_FINGERPRINT: fp})
        save_delta(d, tmp_path / "d.st")
        if ok:
            apply_patch(a, tmp_path / "d.st", tmp_path / "out.safetensors")
            assert load_file(tmp_path / "out.safetensors")["w"][3].item() == 2.0
        else:
            with pytest.raises(BaseMismatchError, match="wrong base"):
                apply_patch(a, tmp_path / "d.st", tmp_path / "bad.safetensors")


def test_apply_without_copy_file_range(chain: list[Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    diff_checkpoints(chain[0], chain[1], tmp_path / "p.st")
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # pread/pwrite instead
    apply_patch(chain[0], tmp_path / "p.st", tmp_path / "out")
    assert_bitwise(weights(tmp_path / "out"), weights(chain[1]))
