"""A batch whose rows use different deltas equals, row by row, the model with that delta merged."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from spdelta import SparseDelta
from spdelta.hf import apply_to_model
from spdelta.serve import DeltaModel

ROWS = ["a", None, "b", "a", "c", "b"]
LENGTHS = [7, 4, 9, 5, 9, 3]
STEPS = 20
TOL = dict(rtol=1e-5, atol=1e-5)


def left_padded(lengths: list[int], vocab: int = 64, seed: int = 3) -> tuple[torch.Tensor, ...]:
    """Token ids (pad 0 on the left) and the attention mask of rows of ``lengths``."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def generate(model: nn.Module | DeltaModel, ids: torch.Tensor, mask: torch.Tensor,
             **kw: object) -> object:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=STEPS,
                              min_new_tokens=STEPS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


@pytest.fixture
def setup(llama: nn.Module, make_delta: Callable[..., SparseDelta]) -> tuple:
    deltas = {n: make_delta(llama, seed=i + 1) for i, n in enumerate("abc")}
    refs = {}
    for n, d in deltas.items():
        refs[n] = apply_to_model(copy.deepcopy(llama), d)
    refs[None] = copy.deepcopy(llama)
    return DeltaModel(llama, deltas), refs


def test_prefill_logits_match_each_rows_merged_model(setup: tuple) -> None:
    dm, refs = setup
    ids, mask = left_padded(LENGTHS)
    with torch.no_grad():
        got = dm(ids, attention_mask=mask, deltas=ROWS).logits
        want = {n: m(ids, attention_mask=mask).logits for n, m in refs.items()}
    for b, name in enumerate(ROWS):
        real = mask[b].bool()
        if name is None:  # the base, exactly
            assert torch.equal(got[b], want[None][b])
        else:
            torch.testing.assert_close(got[b, real], want[name][b, real], **TOL)
            other = "b" if name == "a" else "a"  # the test can tell deltas apart
            assert (got[b, real] - want[other][b, real]).abs().max() > 1e-2


def test_generate_tokens_and_logits_match_over_20_steps(setup: tuple) -> None:
    dm, refs = setup
    ids, mask = left_padded(LENGTHS)
    got = generate(dm, ids, mask, deltas=ROWS)
    want = {n: generate(m, ids, mask) for n, m in refs.items()}
    assert len(got.logits) == STEPS
    for b, name in enumerate(ROWS):
        assert torch.equal(got.sequences[b], want[name].sequences[b]), (b, name)
        for step in range(STEPS):
            if name is None:
                assert torch.equal(got.logits[step][b], want[None].logits[step][b])
            else:
                torch.testing.assert_close(got.logits[step][b], want[name].logits[step][b],
                                           **TOL)


def test_beam_search_repeats_each_rows_delta(setup: tuple) -> None:
    dm, refs = setup  # beam search runs num_beams copies of each row (repeat_interleave)
    ids, mask = left_padded(LENGTHS[:4])
    rows = ROWS[:4]
    got = generate(dm, ids, mask, deltas=rows, num_beams=3, num_return_sequences=2)
    for b, name in enumerate(rows):
        want = generate(refs[name], ids, mask, num_beams=3, num_return_sequences=2)
        assert torch.equal(got.sequences[2 * b:2 * b + 2], want.sequences[2 * b:2 * b + 2])


def test_one_row_and_all_rows_on_one_delta(setup: tuple) -> None:
    dm, refs = setup
    ids, mask = left_padded([5, 8])
    with torch.no_grad():
        got = dm(ids, attention_mask=mask, deltas=["c", "c"]).logits
        want = refs["c"](ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)
        one = dm(ids[:1], attention_mask=mask[:1], deltas=["b"]).logits
        torch.testing.assert_close(one[0, mask[0].bool()],
                                   refs["b"](ids[:1], attention_mask=mask[:1]).logits[0,
                                                                                     mask[0].bool()],
                                   **TOL)


def test_all_none_and_no_deltas_is_the_base_exactly(setup: tuple) -> None:
    dm, refs = setup
    ids, mask = left_padded([4, 6])
    with torch.no_grad():
        want = refs[None](ids, attention_mask=mask).logits
        assert torch.equal(dm(ids, attention_mask=mask, deltas=[None, None]).logits, want)
        assert torch.equal(dm(ids, attention_mask=mask).logits, want)
        assert torch.equal(dm.model(ids, attention_mask=mask).logits, want)
