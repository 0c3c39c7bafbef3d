"""Gradient accumulation: k micro-batches give the gradient of one batch, in float64."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from spdelta import make_loss_fn
from spdelta.errors import ParameterError
from spdelta.functional import eager_grad_and_value
from spdelta.optim import sm3
from spdelta.recipes.data import encode_prompt_response
from spdelta.train import (
    MicroBatches,
    accumulate,
    init_train_state,
    label_tokens,
    make_train_step,
    micro_batches,
)
from spdelta.train.spiel import make_spiel_step, random_support, spiel_init

pytestmark = pytest.mark.hf

Setup = tuple[object, object, dict[str, Tensor], dict[str, Tensor]]
# Responses of different lengths, so micro-batches hold different numbers of label tokens.
PROMPTS = ["add 1 2", "a much longer prompt here", "x", "add 3 4", "hi", "tell me"]
RESPONSES = ["3", "a long answer", "yes", "7", "hello there friend", "no"]


def _rms_norm_in_dtype(self: torch.nn.Module, x: Tensor) -> Tensor:
    """LlamaRMSNorm without its float32 upcast: the same formula, in the input's float64."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                          + self.variance_epsilon))


@pytest.fixture(scope="module")
def setup(tiny_lm_dir: str) -> Iterator[Setup]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    # Llama's norms compute in float32 whatever the model's dtype; a float64 comparison
    # needs the float64 formula (the batch's shape changes matmul rounding at 1e-16, and
    # float32 casts occasionally turn that into 1e-8).
    patch = pytest.MonkeyPatch()
    patch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_dtype)

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float64).eval()
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in base.items() if p.dim() == 2}
    support = random_support(shapes, density=0.3, generator=torch.Generator().manual_seed(0))
    yield tok, model, base, support
    patch.undo()


def _encode(tok: object, rows: range) -> dict[str, object]:
    return encode_prompt_response(tok, [PROMPTS[i] for i in rows], [RESPONSES[i] for i in rows],
                                  max_length=64)


def f64_loss(out: object, batch: dict[str, Tensor]) -> Tensor:
    """The token-mean next-token loss in float64 (HF's own loss upcasts logits to float32 only)."""
    logits = out.logits  # type: ignore[attr-defined]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             batch["shift_labels"].reshape(-1), ignore_index=-100)


def _values(support: dict[str, Tensor], seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: 0.05 * torch.randn(len(i), generator=gen, dtype=torch.float64)
            for n, i in support.items()}


def test_k_micro_batches_equal_one_batch_in_float64(setup: tuple) -> None:
    tok, model, base, support = setup
    full = _encode(tok, range(6))
    parts = [_encode(tok, r) for r in (range(0, 2), range(2, 3), range(3, 6))]
    counts = [label_tokens(p) for p in parts]
    assert len(set(counts)) == 3 and sum(counts) == label_tokens(full)
    grad_fn = eager_grad_and_value(make_loss_fn(model, f64_loss))
    values = _values(support)
    g_full, l_full = grad_fn(values, base, support, full)
    g_acc, l_acc = accumulate(lambda b: grad_fn(values, base, support, b), micro_batches(parts))
    torch.testing.assert_close(l_acc, l_full, rtol=1e-13, atol=0)
    for n in support:
        torch.testing.assert_close(g_acc[n], g_full[n], rtol=1e-11, atol=1e-15)
    # A plain mean over micro-batches is not the batch's gradient (the token weights matter).
    even = MicroBatches(tuple(parts), (1 / 3, 1 / 3, 1 / 3))
    g_even, _ = accumulate(lambda b: grad_fn(values, base, support, b), even)
    assert max(float((g_even[n] - g_full[n]).abs().max()) for n in support) > 1e-6


def test_train_and_spiel_steps_accumulate(setup: tuple) -> None:
    """Several steps (SM3, sensitive to the gradient's scale; SpIEL-AG with its dense window)."""
    tok, model, base, support = setup
    full = _encode(tok, range(6))
    micro = micro_batches([_encode(tok, r) for r in (range(0, 4), range(4, 6))])
    loss_fn = make_loss_fn(model, f64_loss)
    shapes = {n: tuple(base[n].shape) for n in support}
    results = []
    for batch in (full, micro):
        opt = sm3(1e-2, support=support, shapes=shapes)
        step = make_train_step(loss_fn, opt, base, support)
        state = init_train_state(opt, _values(support))
        for _ in range(2):
            state, metrics = step(state, batch)
        spiel_step = make_spiel_step(loss_fn, base, opt, total_steps=5, update_every=2,
                                     accumulate_steps=2, initial_fraction=0.5)
        s = spiel_init(_values(support), support, opt)
        s, _ = spiel_step(s, batch)  # in the AG window: dense gradients accumulate too
        results.append((state.values, metrics["loss"], s.values, s.grad_acc))
    (v1, l1, s1, a1), (v2, l2, s2, a2) = results
    assert l1 == pytest.approx(l2, rel=1e-13)
    for n in support:
        torch.testing.assert_close(v2[n], v1[n], rtol=1e-11, atol=1e-15)
        torch.testing.assert_close(s2[n], s1[n], rtol=1e-11, atol=1e-15)
        torch.testing.assert_close(a2[n], a1[n], rtol=1e-11, atol=1e-15)


def test_weights_and_errors() -> None:
    a = {"shift_labels": torch.tensor([[1, -100, 2]])}
    b = {"labels": torch.tensor([[9, 1, 2, 3]])}  # shifted: 3 label tokens
    assert micro_batches([a, b]).weights == (0.4, 0.6)
    assert micro_batches([a, b], weights=[1, 1]).weights == (0.5, 0.5)
    with pytest.raises(ParameterError):
        micro_batches([])
    with pytest.raises(ParameterError):
        micro_batches([{"shift_labels": torch.full((1, 2), -100)}])
    with pytest.raises(ParameterError, match="labels"):
        label_tokens({"input_ids": torch.ones(1, 2)})
