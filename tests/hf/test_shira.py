"""peft SHiRA adapters <-> SparseDelta, checked against real peft on a tiny random Llama."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spdelta import SparseDelta
from spdelta.errors import KeyMismatchError, OutputExistsError, ParameterError
from spdelta.hf import AdapterError, apply_to_model, export_shira, import_shira

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.hf,
    # transformers 5 deprecates an attribute that peft 0.21 reads when wrapping a model.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TARGETS = ["q_proj", "v_proj", "down_proj"]
LINEARS = [
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
]


def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    # Opting in to peft's sparse COO checks also validates every exported index.
    with torch.no_grad(), torch.sparse.check_sparse_tensor_invariants(enable=True):
        return model(input_ids=batch["input_ids"]).logits


def trained_adapter(base: nn.Module, batch: dict[str, Tensor], out: Path) -> nn.Module:
    """A SHiRA adapter trained by peft for three SGD steps, saved to ``out``."""
    config = peft.ShiraConfig(r=2, target_modules=TARGETS, random_seed=7)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with torch.sparse.check_sparse_tensor_invariants(enable=True):
        for _ in range(3):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    model.save_pretrained(out)
    return model.eval()


def shira_delta(
    base: nn.Module, nnz: dict[str, int], seed: int = 0, names: list[str] = LINEARS
) -> SparseDelta:
    """Random support of ``nnz[name]`` entries (default ``2 * (m + n)``) on each Linear."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(base.named_parameters())
    entries = {}
    for name in names:
        p = params[name]
        k = nnz.get(name, 2 * sum(p.shape))
        idx = torch.randperm(p.numel(), generator=gen)[:k].sort().values
        entries[name] = (tuple(p.shape), idx, torch.randn(k, generator=gen, dtype=p.dtype))
    return SparseDelta(entries, metadata={"spdelta.base_model": "org/tiny", "task": "demo"})


# ----------------------------------------------------------------------------- import
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_import_of_peft_trained_adapter_equals_peft_logits(
    tiny_llama: nn.Module, token_batch: dict[str, Tensor], tmp_path: Path, dtype: torch.dtype
) -> None:
    base = tiny_llama.to(dtype)
    peft_model = trained_adapter(base, token_batch, tmp_path / "adapter")
    delta = import_shira(tmp_path / "adapter", base=base)
    assert delta.keys() == sorted(LINEARS)
    for name, e in delta.items():
        assert e.nnz == 2 * sum(e.shape) and bool((e.values != 0).any()), name
    ours = apply_to_model(copy.deepcopy(base), delta)
    assert torch.equal(logits(ours, token_batch), logits(peft_model, token_batch))


def test_import_reads_shapes_from_model_checkpoint_or_mapping(
    tiny_llama: nn.Module, token_batch: dict[str, Tensor], tmp_path: Path
) -> None:
    trained_adapter(tiny_llama, token_batch, tmp_path / "adapter")
    tiny_llama.save_pretrained(tmp_path / "ckpt")
    from_model = import_shira(tmp_path / "adapter", base=tiny_llama)
    inner = import_shira(tmp_path / "adapter", base=tiny_llama.model)  # no "model." prefix
    shapes = {n: list(p.shape) for n, p in tiny_llama.named_parameters()}
    assert inner == from_model
    assert import_shira(tmp_path / "adapter", base=str(tmp_path / "ckpt")) == from_model
    assert import_shira(tmp_path / "adapter", base=tiny_llama.state_dict()) == from_model
    assert import_shira(tmp_path / "adapter", base=shapes) == from_model
    record = json.loads(from_model.metadata["spdelta.provenance"])
    assert record["operation"] == "import_shira" and record["parameters"] == {"r": 2}


def test_import_accepts_windows_float_indices(tiny_llama: nn.Module, tmp_path: Path) -> None:
    delta = shira_delta(tiny_llama, {})
    export_shira(delta, tmp_path / "a")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    weights = {k: v.float() if k.endswith("indices") else v for k, v in weights.items()}
    save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    assert import_shira(tmp_path / "a", base=tiny_llama) == delta


# ----------------------------------------------------------------------------- export
def test_export_loads_in_peft_and_equals_base_plus_delta(
    tiny_llama: nn.Module, token_batch: dict[str, Tensor], tmp_path: Path
) -> None:
    delta = shira_delta(tiny_llama, {})
    export_shira(delta, tmp_path / "out", model=tiny_llama)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == "org/tiny"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "out")
    expected = logits(apply_to_model(copy.deepcopy(tiny_llama), delta), token_batch)
    assert torch.equal(logits(loaded, token_batch), expected)


def test_export_pads_with_explicit_zeros(
    tiny_llama: nn.Module, token_batch: dict[str, Tensor], tmp_path: Path
) -> None:
    nnz = {LINEARS[0]: 0, LINEARS[1]: 37, LINEARS[2]: 500}  # r = ceil(500 / (32 + 64)) = 6
    delta = shira_delta(tiny_llama, nnz, names=LINEARS[:3])
    unprefixed = SparseDelta({n.removeprefix("model."): e for n, e in delta.items()})
    with pytest.raises(ParameterError, match="pad=True"):
        export_shira(unprefixed, tmp_path / "out", model=tiny_llama)
    export_shira(unprefixed, tmp_path / "out", model=tiny_llama, pad=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 6
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "out")
    expected = logits(apply_to_model(copy.deepcopy(tiny_llama), delta), token_batch)
    assert torch.equal(logits(loaded, token_batch), expected)
    back = import_shira(tmp_path / "out", base=tiny_llama)
    for name, e in back.items():
        assert e.nnz == 6 * sum(e.shape)
        assert torch.equal(back.to_dense(name), delta.to_dense(name)), name


# ----------------------------------------------------------------------------- round trips
def test_import_then_export_gives_back_the_peft_adapter(
    tiny_llama: nn.Module, token_batch: dict[str, Tensor], tmp_path: Path
) -> None:
    peft_model = trained_adapter(tiny_llama, token_batch, tmp_path / "x")
    export_shira(import_shira(tmp_path / "x", base=tiny_llama), tmp_path / "y")
    x, y = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("x", "y"))
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    cx, cy = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in "xy")
    assert (cx["peft_type"], cx["r"]) == (cy["peft_type"], cy["r"])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "y")
    assert torch.equal(logits(reloaded, token_batch), logits(peft_model, token_batch))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_export_then_import_gives_back_the_delta(
    tiny_llama: nn.Module, tmp_path: Path, dtype: torch.dtype
) -> None:
    delta = shira_delta(tiny_llama, {}).to(dtype=dtype)
    export_shira(delta, tmp_path / "out")
    back = import_shira(tmp_path / "out", base=tiny_llama)
    assert back == delta and back.metadata == delta.metadata


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("model.norm.weight", "nn.Linear weights only"),
        ("model.embed_tokens.weight", "not the weight of an nn.Linear"),
    ],
)
def test_export_refuses_non_linear_tensors(
    tiny_llama: nn.Module, tmp_path: Path, name: str, match: str
) -> None:
    delta = shira_delta(tiny_llama, {name: 4}, names=[name, LINEARS[0]])
    with pytest.raises(ParameterError, match=match):
        export_shira(delta, tmp_path / "out", model=tiny_llama, pad=True)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_tied_weights(tiny_llama_tied: nn.Module, tmp_path: Path) -> None:
    one = torch.ones(2, dtype=torch.float64)
    delta = SparseDelta({"lm_head.weight": ((64, 32), torch.tensor([0, 5]), one)})
    with pytest.raises(ParameterError, match="tied"):
        export_shira(delta, tmp_path / "out", model=tiny_llama_tied, pad=True)


def test_export_refuses_r_too_large_and_bad_r(tiny_llama: nn.Module, tmp_path: Path) -> None:
    delta = shira_delta(tiny_llama, {LINEARS[0]: 1000}, names=LINEARS[:1])  # 32x32: max r=16
    with pytest.raises(ParameterError, match=r"r\*\(m\+n\) <= m\*n"):
        export_shira(delta, tmp_path / "out", r=17, pad=True)
    with pytest.raises(ParameterError, match="r must be an int >= 1"):
        export_shira(delta, tmp_path / "out", r=0, pad=True)
    with pytest.raises(ParameterError, match="do not fit"):
        export_shira(delta, tmp_path / "out", r=2, pad=True)
    with pytest.raises(ParameterError, match="empty"):
        export_shira(SparseDelta({}), tmp_path / "out")


def test_export_is_atomic_and_needs_overwrite(tiny_llama: nn.Module, tmp_path: Path) -> None:
    delta = shira_delta(tiny_llama, {})
    export_shira(delta, tmp_path / "out")
    with pytest.raises(OutputExistsError, match="overwrite"):
        export_shira(delta, tmp_path / "out")
    negated = delta.with_values({LINEARS[0]: -delta[LINEARS[0]].values})
    export_shira(negated, tmp_path / "out", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert import_shira(tmp_path / "out", base=tiny_llama) == negated


def test_import_errors(tiny_llama: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter config"):
        import_shira(tmp_path / "missing", base=tiny_llama)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="expected peft_type 'SHIRA'; found 'LORA'"):
        import_shira(lora, base=tiny_llama)

    export_shira(shira_delta(tiny_llama, {}), tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    head = {"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(2)}
    save_file({**weights, **head}, path)
    with pytest.raises(AdapterError, match="modules_to_save"):
        import_shira(tmp_path / "a", base=tiny_llama)
    save_file(weights, path)
    small = {n: (4, 4) for n in LINEARS}
    with pytest.raises(AdapterError, match="does not fit this base model"):
        import_shira(tmp_path / "a", base=small)
    with pytest.raises(KeyMismatchError, match="1 unmatched"):
        import_shira(tmp_path / "a", base={n: p for n, p in small.items() if n != LINEARS[0]})
