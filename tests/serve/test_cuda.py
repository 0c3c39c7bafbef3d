"""CUDA: the same DeltaModel code serves rows and swaps on the GPU as on the CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from spdelta import SparseDelta
from spdelta.serve import DeltaModel

from .test_mixed import left_padded
from .test_swap import bits, same_bits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (CI has none); run `pytest tests/serve` on one"),
]
ROWS = ["a", None, "b", "a"]


def test_rows_on_cuda_equal_rows_on_cpu(llama: nn.Module,
                                        make_delta: Callable[..., SparseDelta]) -> None:
    deltas = {"a": make_delta(llama, seed=1), "b": make_delta(llama, seed=2)}
    gpu = copy.deepcopy(llama).cuda()
    ids, mask = left_padded([5, 3, 5, 4])
    with torch.no_grad():
        want = DeltaModel(llama, deltas)(ids, attention_mask=mask, deltas=ROWS).logits
        dm = DeltaModel(gpu, deltas)
        got = dm(ids.cuda(), attention_mask=mask.cuda(), deltas=ROWS).logits
        out = dm.generate(ids.cuda(), attention_mask=mask.cuda(), deltas=ROWS, max_new_tokens=5,
                          do_sample=False, pad_token_id=0)
    assert got.device.type == "cuda" and out.shape == (4, ids.shape[1] + 5)
    real = mask.bool()
    torch.testing.assert_close(got.cpu()[real], want[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_on_cuda_restores_bits(make_llama: Callable[..., nn.Module],
                                    make_delta: Callable[..., SparseDelta],
                                    dtype: torch.dtype) -> None:
    model = make_llama(dtype).cuda()
    before = bits(model)
    dm = DeltaModel(model, {"a": make_delta(model, seed=1)})
    dm.activate("a")
    assert not same_bits(bits(model), before)
    dm.deactivate()
    assert same_bits(bits(model), before)
