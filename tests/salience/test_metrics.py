"""Each salience metric against a direct dense implementation, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spdelta.errors import KeyMismatchError, SpdeltaError
from spdelta.salience import METRICS, score
from spdelta.salience._calib import causal_lm_loss

MLP_TARGETS = ["lin0.weight", "lin1.weight"]
LLAMA_TARGETS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
TOL = {"rtol": 1e-9, "atol": 1e-12}


def mlp_loss(out: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return (out - torch.sin(batch["input"][:, :2])).pow(2).mean()


def mlp_batches() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [{"input": torch.randn(n, 10, generator=gen, dtype=torch.float64)} for n in (3, 5, 4)]


def params(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters())


def dense_grads(model: nn.Module, names: list[str], loss: Tensor) -> list[Tensor]:
    p = params(model)
    return list(torch.autograd.grad(loss, [p[n] for n in names]))


def mean_grad_mlp(model: nn.Module, batches: list[dict[str, Tensor]]) -> list[Tensor]:
    """g = sum_b n_b grad L_b / N over the first 10 examples (the last batch cut to 2)."""
    cut = [batches[0], batches[1], {"input": batches[2]["input"][:2]}]
    total = [torch.zeros_like(params(model)[n]) for n in MLP_TARGETS]
    for b in cut:
        n = b["input"].shape[0]
        grads = dense_grads(model, MLP_TARGETS, mlp_loss(model(**b), b))
        for t, g in zip(total, grads, strict=True):
            t += n * g
    return [t / 10 for t in total]


def run(model: nn.Module, metric: str, batches: list, targets: list[str], **kw: object) -> dict:
    return score(model, params(model), batches, metric=metric, targets=targets, progress=False,
                 **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("metric, formula", [
    ("gradient", lambda w, g: g.abs()),
    ("snip", lambda w, g: (w * g).abs()),
    ("force", lambda w, g: -w * g),
    ("taylor_fo", lambda w, g: (w * g) ** 2),
])
def test_gradient_family_mlp(tiny_mlp: nn.Module, metric: str, formula: object) -> None:
    batches = mlp_batches()
    got = run(tiny_mlp, metric, batches, MLP_TARGETS, num_examples=10, loss=mlp_loss)
    for n, g in zip(MLP_TARGETS, mean_grad_mlp(tiny_mlp, batches), strict=True):
        assert got[n].dtype == torch.float64
        torch.testing.assert_close(got[n], formula(params(tiny_mlp)[n].detach(), g), **TOL)


def lm_loss(out: object, batch: dict[str, Tensor]) -> Tensor:
    """Next-token loss in float64 (HF's own ``output.loss`` is computed in float32)."""
    return causal_lm_loss(out.logits, batch["labels"])  # type: ignore[attr-defined]


def test_gradient_llama(tiny_llama: nn.Module, token_batch: dict[str, Tensor]) -> None:
    got = run(tiny_llama, "gradient", [token_batch], LLAMA_TARGETS, loss=lm_loss)
    want = dense_grads(tiny_llama, LLAMA_TARGETS, lm_loss(tiny_llama(**token_batch), token_batch))
    for n, g in zip(LLAMA_TARGETS, want, strict=True):
        torch.testing.assert_close(got[n], g.abs(), **TOL)
    got = run(tiny_llama, "gradient", [token_batch], LLAMA_TARGETS)  # HF output.loss (fp32 inside)
    want = dense_grads(tiny_llama, LLAMA_TARGETS, tiny_llama(**token_batch).loss)
    for n, g in zip(LLAMA_TARGETS, want, strict=True):
        torch.testing.assert_close(got[n], g.abs(), rtol=0, atol=1e-6 * float(g.abs().max()))


def test_magnitude_and_random(tiny_mlp: nn.Module) -> None:
    got = run(tiny_mlp, "magnitude", [], MLP_TARGETS)
    for n in MLP_TARGETS:
        torch.testing.assert_close(got[n], params(tiny_mlp)[n].detach().abs(), **TOL)
    got = run(tiny_mlp, "random", [], MLP_TARGETS, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for n in MLP_TARGETS:  # sorted name order, one draw per target
        want = torch.rand(params(tiny_mlp)[n].shape, generator=gen, dtype=torch.float64)
        assert torch.equal(got[n], want)


def test_fisher_per_example_loop(tiny_mlp: nn.Module, tiny_llama: nn.Module,
                                 token_batch: dict[str, Tensor]) -> None:
    batches = mlp_batches()
    got = run(tiny_mlp, "fisher", batches, MLP_TARGETS, num_examples=10, loss=mlp_loss)
    want = [torch.zeros_like(params(tiny_mlp)[n]) for n in MLP_TARGETS]
    rows = torch.cat([b["input"] for b in batches])[:10]
    for i in range(10):
        b = {"input": rows[i:i + 1]}
        grads = dense_grads(tiny_mlp, MLP_TARGETS, mlp_loss(tiny_mlp(**b), b))
        for t, g in zip(want, grads, strict=True):
            t += g ** 2 / 10
    for n, w in zip(MLP_TARGETS, want, strict=True):
        torch.testing.assert_close(got[n], w, **TOL)
    got = run(tiny_llama, "fisher", [token_batch], LLAMA_TARGETS, loss=lm_loss)  # 3 rows, chunk 4
    want = [torch.zeros_like(params(tiny_llama)[n]) for n in LLAMA_TARGETS]
    for i in range(3):
        b = {k: v[i:i + 1] for k, v in token_batch.items()}
        grads = dense_grads(tiny_llama, LLAMA_TARGETS, lm_loss(tiny_llama(**b), b))
        for t, g in zip(want, grads, strict=True):
            t += g ** 2 / 3
    for n, w in zip(LLAMA_TARGETS, want, strict=True):
        torch.testing.assert_close(got[n], w, **TOL)


def synflow_reference(model: nn.Module, names: list[str],
                      inputs: dict[str, Tensor]) -> list[Tensor]:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    out = model(**inputs)
    flow = (out if isinstance(out, Tensor) else out.logits).sum()
    p = params(model)
    return [(g * p[n]).abs() for n, g in zip(names, dense_grads(model, names, flow), strict=True)]


def test_synflow(tiny_mlp: nn.Module, tiny_llama: nn.Module,
                 token_batch: dict[str, Tensor]) -> None:
    got = run(tiny_mlp, "synflow", mlp_batches(), MLP_TARGETS)
    ones = {"input": torch.ones(1, 10, dtype=torch.float64)}
    for n, w in zip(MLP_TARGETS, synflow_reference(tiny_mlp, MLP_TARGETS, ones), strict=True):
        torch.testing.assert_close(got[n], w, **TOL)
    got = run(tiny_llama, "synflow", [token_batch], LLAMA_TARGETS)
    ones = {"inputs_embeds": torch.ones(1, 8, 32, dtype=torch.float64)}
    for n, w in zip(LLAMA_TARGETS, synflow_reference(tiny_llama, LLAMA_TARGETS, ones), strict=True):
        torch.testing.assert_close(got[n], w, **TOL)


def grasp_reference(model: nn.Module, names: list[str], batches: list[dict[str, Tensor]],
                    loss_of: object, temperature: float = 200.0) -> list[Tensor]:
    """w * (H g0) with g0 and H g0 example-weighted means; H g0 by autograd.functional.hvp."""
    base = {k: v.detach() for k, v in params(model).items()}
    buffers = dict(model.named_buffers())

    def tempered(b: dict[str, Tensor]):  # noqa: ANN202
        def f(*ws: Tensor) -> Tensor:
            p = {**buffers, **base, **dict(zip(names, ws, strict=True))}
            out = torch.func.functional_call(model, p, args=(), kwargs=b)
            return loss_of(out, b, temperature)  # type: ignore[operator]
        return f

    ws = tuple(base[n] for n in names)
    sizes = [next(iter(b.values())).shape[0] for b in batches]
    total = sum(sizes)
    def mean(per_batch: list[tuple[Tensor, ...]]) -> list[Tensor]:
        return [sum(n * t for n, t in zip(sizes, ts, strict=True)) / total
                for ts in zip(*per_batch, strict=True)]

    g0 = mean([torch.autograd.functional.vjp(tempered(b), ws)[1] for b in batches])
    hg = mean([torch.autograd.functional.hvp(tempered(b), ws, tuple(g0))[1] for b in batches])
    return [w * h for w, h in zip(ws, hg, strict=True)]


def test_grasp_hvp_mlp(tiny_mlp: nn.Module) -> None:
    batches = mlp_batches()
    want = grasp_reference(tiny_mlp, MLP_TARGETS, batches,
                           lambda out, b, t: mlp_loss(out / t, b))
    got = run(tiny_mlp, "grasp", batches, MLP_TARGETS, loss=mlp_loss)
    for n, w in zip(MLP_TARGETS, want, strict=True):
        torch.testing.assert_close(got[n], w, rtol=1e-9, atol=1e-24)
        assert w.abs().max() > 0


def test_grasp_hvp_llama(tiny_llama: nn.Module, token_batch: dict[str, Tensor]) -> None:
    def loss_of(out: object, b: dict[str, Tensor], t: float) -> Tensor:
        logits = out.logits  # type: ignore[attr-defined]
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64) / t, b["labels"][:, 1:].reshape(-1))

    batches = [{k: v[:2] for k, v in token_batch.items()},
               {k: v[2:] for k, v in token_batch.items()}]
    want = grasp_reference(tiny_llama, LLAMA_TARGETS, batches, loss_of)
    got = run(tiny_llama, "grasp", batches, LLAMA_TARGETS)
    for n, w in zip(LLAMA_TARGETS, want, strict=True):
        # HF's LlamaRMSNorm computes in float32 even in a float64 model, so the two
        # double-backward orders agree to float32 precision only.
        torch.testing.assert_close(got[n], w, rtol=0, atol=1e-5 * float(w.abs().max()))
        assert w.abs().max() > 0


def test_grasp_on_sdpa_attention_equals_eager(token_batch: dict[str, Tensor]) -> None:
    """Hugging Face's default attention (SDPA) has no second derivative in its fused CPU
    kernel; GraSP runs its Hessian-vector product on the math backend and so equals the
    eager-attention model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(cfg).double().eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "attn_implementation": "eager"}))
    eager = eager.double().eval()
    eager.load_state_dict(sdpa.state_dict())
    got, want = (run(m, "grasp", [token_batch], LLAMA_TARGETS) for m in (sdpa, eager))
    for n in LLAMA_TARGETS:  # RMSNorm runs in float32 in a float64 Llama: float32 precision
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-5 * float(want[n].abs().max()))
        assert want[n].abs().max() > 0


def test_grasp_rejects_one_shot_iterator(tiny_mlp: nn.Module) -> None:
    with pytest.raises(SpdeltaError, match="re-iterable"):
        run(tiny_mlp, "grasp", iter(mlp_batches()), MLP_TARGETS, loss=mlp_loss)  # type: ignore[arg-type]


def test_score_errors(tiny_mlp: nn.Module) -> None:
    with pytest.raises(SpdeltaError, match="unknown metric 'nope'"):
        run(tiny_mlp, "nope", [], MLP_TARGETS)
    with pytest.raises(SpdeltaError, match="no example"):
        run(tiny_mlp, "gradient", [], MLP_TARGETS, loss=mlp_loss)
    with pytest.raises(SpdeltaError, match="num_examples"):
        run(tiny_mlp, "gradient", mlp_batches(), MLP_TARGETS, num_examples=0)
    with pytest.raises(KeyMismatchError, match="absent from base"):
        score(tiny_mlp, {}, [], metric="magnitude", targets=MLP_TARGETS, progress=False)
    assert set(METRICS) >= {"random", "magnitude", "gradient", "snip", "force", "taylor_fo",
                            "fisher", "synflow", "grasp"}


def test_bf16_weights_accumulate_in_fp32(tiny_mlp: nn.Module) -> None:
    model = copy.deepcopy(tiny_mlp).to(torch.bfloat16)
    batches = [{"input": b["input"].to(torch.bfloat16)} for b in mlp_batches()]
    got = run(model, "gradient", batches, MLP_TARGETS, loss=mlp_loss)
    assert all(got[n].dtype == torch.float32 and got[n].shape == params(model)[n].shape
               for n in MLP_TARGETS)
