"""spdelta.patch in memory: diff then apply_ reproduces any tensor bit for bit, in every dtype."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from spdelta import DeltaTensor
from spdelta.errors import BaseMismatchError, KeyMismatchError, ShapeError
from spdelta.format import load_patch, save_delta
from spdelta.format.constants import KEY_FINGERPRINT, KEY_RESULT_FINGERPRINT, TORCH_DTYPES
from spdelta.hf import fingerprint
from spdelta.patch import Patch, ReplaceTensor, apply_, bit_view, compose_patches, diff, diff_tensor

DTYPES = list(TORCH_DTYPES.values())  # every dtype a patch stores
#: Bit patterns an arithmetic path would change, per item size: NaN payloads (quiet and
#: signalling, both signs), -0.0, the smallest subnormals, +-inf, all ones.
SPECIAL = {
    1: [0x7F, 0xFF, 0x80, 0x01, 0x7C, 0xFC],
    2: [0x7FC1, 0xFF81, 0x7E01, 0x7C01, 0x8000, 0x0001, 0x8001, 0x7F80, 0xFF80, 0x7C00, 0xFFFF],
    4: [0x7F800001, 0xFFC00001, 0x80000000, 0x00000001, 0x80000001, 0x7F800000, 0xFF800000,
        0xFFFFFFFF],
    8: [0x7FF0000000000001, 0xFFF8000000000001, 0x8000000000000000, 0x1, 0x7FF0000000000000,
        0x800000007F800001, 0xFFFFFFFFFFFFFFFF],
}


def _from_bits(words: list[int], dtype: torch.dtype) -> Tensor:
    """A tensor of ``dtype`` whose elements have exactly these bits (little-endian)."""
    size = dtype.itemsize
    raw = b"".join((w % 2 ** (8 * size)).to_bytes(size, "little") for w in words)
    return torch.tensor(list(raw), dtype=torch.uint8).view(dtype)


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bit_view(a), bit_view(b))


@st.composite
def pairs(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    """(base, tuned): random bits with special values, tuned changing a random subset."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (64, 33)]))
    n = 1
    for s in shape:
        n *= s
    words = st.one_of(st.integers(0, 2 ** (8 * dtype.itemsize) - 1),
                      st.sampled_from(SPECIAL[dtype.itemsize]))
    if dtype == torch.bool:  # a checkpoint's bools are the bytes 0 and 1
        words = st.integers(0, 1)
    base_bits = draw(st.lists(words, min_size=n, max_size=n))
    changed = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    new_bits = [draw(words) if c else b for b, c in zip(base_bits, changed, strict=True)]
    base = _from_bits(base_bits, dtype).reshape(shape)
    tuned = _from_bits(new_bits, dtype).reshape(shape)
    return base, tuned


def _changed_reference(base: Tensor, tuned: Tensor) -> list[int]:
    """Positions whose bytes differ, from the raw bytes (a second, independent rule)."""
    size = base.dtype.itemsize
    a = base.reshape(-1).contiguous().view(torch.uint8)
    b = tuned.reshape(-1).contiguous().view(torch.uint8)
    return [i for i in range(base.numel()) if bytes(a[i * size:(i + 1) * size].tolist())
            != bytes(b[i * size:(i + 1) * size].tolist())]


@settings(max_examples=150, deadline=None)
@given(pairs())
def test_apply_of_diff_is_tuned_bitwise(pair: tuple[Tensor, Tensor]) -> None:
    base, tuned = pair
    entry = diff_tensor("w", base, tuned)
    assert entry.indices.tolist() == _changed_reference(base, tuned)
    target = {"w": base.clone()}
    apply_(target, diff({"w": base}, {"w": tuned}))
    assert _bits_equal(target["w"], tuned)


@settings(max_examples=40, deadline=None)
@given(pairs())
def test_file_round_trip_keeps_every_bit(tmp_path_factory: pytest.TempPathFactory,
                                         pair: tuple[Tensor, Tensor]) -> None:
    base, tuned = pair
    path = tmp_path_factory.mktemp("p") / "p.safetensors"
    save_delta(diff({"w": base}, {"w": tuned}), path)
    target = {"w": base.clone()}
    apply_(target, load_patch(path))
    assert _bits_equal(target["w"], tuned)


def test_patch_equality_is_bitwise() -> None:
    nan1, nan2 = _from_bits([0x7FC1], torch.bfloat16), _from_bits([0x7FC2], torch.bfloat16)
    one = Patch({"w": ReplaceTensor((2,), torch.tensor([1]), nan1)})
    assert one == Patch({"w": ReplaceTensor((2,), torch.tensor([1]), nan1.clone())})
    assert one != Patch({"w": ReplaceTensor((2,), torch.tensor([1]), nan2)})


def test_diff_records_both_fingerprints() -> None:
    old, new = {"w": torch.zeros(4)}, {"w": torch.ones(4)}
    p = diff(old, new)
    assert p.metadata[KEY_FINGERPRINT] == fingerprint(old)
    assert p.metadata[KEY_RESULT_FINGERPRINT] == fingerprint(new)
    assert diff(old, old).nnz == 0 and len(diff(old, old)) == 0


def test_wrong_step_is_refused_before_any_write() -> None:
    c0, c1 = {"w": torch.zeros(5)}, {"w": torch.arange(5.0)}
    c2 = {"w": torch.arange(5.0) * 2}
    p12 = diff(c1, c2)
    target = {"w": c0["w"].clone()}
    with pytest.raises(BaseMismatchError, match=f"applies to {p12.metadata[KEY_FINGERPRINT]}"
                       f".*target is {fingerprint(c0)}"):
        apply_(target, p12)
    assert _bits_equal(target["w"], c0["w"])
    done = {"w": c2["w"].clone()}
    with pytest.raises(BaseMismatchError, match="already applied"):
        apply_(done, p12)


def test_result_mismatch_restores_the_target() -> None:
    base, tuned = {"w": torch.zeros(6)}, {"w": torch.tensor([0.0, 1, 0, 2, 0, 0])}
    p = diff(base, tuned)
    lying = p.with_metadata({**p.metadata, KEY_RESULT_FINGERPRINT: "base1:" + "0" * 32})
    target = {"w": base["w"].clone()}
    with pytest.raises(BaseMismatchError, match="restored"):
        apply_(target, lying)
    assert _bits_equal(target["w"], base["w"])


def test_apply_checks_names_shapes_and_dtypes_first() -> None:
    p = diff({"w": torch.zeros(3)}, {"w": torch.ones(3)}, fingerprints=False)
    with pytest.raises(KeyMismatchError, match="'w'"):
        apply_({"v": torch.zeros(3)}, p)
    with pytest.raises(ShapeError, match="float32"):
        apply_({"w": torch.zeros(3, dtype=torch.float64)}, p)
    with pytest.raises(ShapeError, match="dtype"):
        diff({"w": torch.zeros(3)}, {"w": torch.zeros(3, dtype=torch.bfloat16)})
    with pytest.raises(KeyMismatchError, match="only after"):
        diff({"w": torch.zeros(3)}, {"w": torch.zeros(3), "b": torch.zeros(1)})


def test_live_model_with_tied_weights(tiny_llama_tied: torch.nn.Module) -> None:
    from tests.conftest import make_tiny_llama

    model = tiny_llama_tied.to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    server = make_tiny_llama(tie=True, dtype=torch.bfloat16)
    server.load_state_dict(before)
    with torch.no_grad():  # one "optimizer step": a few entries of every parameter change
        for i, p in enumerate(model.parameters()):
            p.view(-1)[i % p.numel()] += 0.5
    p = diff(server, model)
    assert "lm_head.weight" not in p  # tied: stored once, under the embedding's name
    apply_(server, p)
    for name, t in model.state_dict().items():
        assert _bits_equal(server.state_dict()[name], t), name


def test_non_contiguous_target_is_written_through_its_strides() -> None:
    base = torch.zeros(4, 3).t()  # (3, 4), not contiguous
    tuned = base.clone()
    tuned[1, 2] = -0.0
    tuned[2, 3] = 5.0
    apply_({"w": base}, diff({"w": base.contiguous()}, {"w": tuned}))
    assert _bits_equal(base.contiguous(), tuned)


def test_additive_entries_touch_only_their_positions() -> None:
    nan = _from_bits([0x7FC1], torch.bfloat16)  # a payload a whole-tensor round trip would lose
    w = torch.cat([nan, torch.ones(2, dtype=torch.bfloat16)])
    p = Patch({"w": DeltaTensor((3,), torch.tensor([2]), torch.tensor([0.5]))})
    apply_({"w": w}, p)
    assert bit_view(w)[0] == bit_view(nan)[0] and w[2].item() == 1.5


def test_chain_composes_and_refuses_out_of_order() -> None:
    c = [{"w": torch.tensor([float(i), 0.0, -0.0, float(i * i)], dtype=torch.bfloat16)}
         for i in range(3)]
    p01, p12 = diff(c[0], c[1]), diff(c[1], c[2])
    both = compose_patches(p01, p12)
    assert both.metadata == {KEY_FINGERPRINT: fingerprint(c[0]),
                             KEY_RESULT_FINGERPRINT: fingerprint(c[2])}
    target = {"w": c[0]["w"].clone()}
    apply_(target, both)
    assert _bits_equal(target["w"], c[2]["w"])
    with pytest.raises(BaseMismatchError, match="not consecutive"):
        compose_patches(p12, p01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_live_sync_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    old = {"w": torch.randn(64, 33, generator=gen).to(torch.bfloat16),
           "n": _from_bits(SPECIAL[4], torch.float32)}
    new = {"w": old["w"].clone(), "n": _from_bits(SPECIAL[4][::-1], torch.float32)}
    new["w"][3, :7] = float("nan")
    gpu_old = {k: v.cuda() for k, v in old.items()}
    p = diff(gpu_old, {k: v.cuda() for k, v in new.items()})
    assert p["w"].indices.device.type == "cuda"
    assert p == diff(old, new).to("cuda")
    apply_(gpu_old, p)
    for k in new:
        assert _bits_equal(gpu_old[k].cpu(), new[k])


def test_additive_tools_refuse_a_patch(tmp_path_factory: pytest.TempPathFactory) -> None:
    from safetensors.torch import save_file

    from spdelta.errors import ParameterError
    from spdelta.hf import apply_to_checkpoint, apply_to_model

    p = diff({"weight": torch.zeros(2, 2)}, {"weight": torch.ones(2, 2)})
    with pytest.raises(ParameterError, match="spdelta.patch.apply_"):
        apply_to_model(torch.nn.Linear(2, 2, bias=False), p)  # type: ignore[arg-type]
    folder = tmp_path_factory.mktemp("ckpt")
    save_file({"weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(ParameterError, match="spdelta.patch.apply_patch"):
        apply_to_checkpoint(folder, p, folder / "out")  # type: ignore[arg-type]
