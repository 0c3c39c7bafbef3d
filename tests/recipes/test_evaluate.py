"""Prompt layouts (``chat_template``) and evaluation (loss, accuracy by scoring each label)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdelta.errors import DataError
from spdelta.recipes.data import encode_prompt_response, prompt_format
from spdelta.recipes.evaluate import choice_accuracy, evaluate_pairs, response_nll


@pytest.fixture(scope="module")
def bpe():
    """A character BPE with merges and no pre-tokenizer: merges can cross the prompt's end."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  show_progress=False)
    core.train_from_iterator(["ab ab abab yes no yes", "is it good? yes. no, bad.",
                              "review: good film; review: bad film"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


TEXT = st.text(alphabet="abyesnogd :.?", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(TEXT, min_size=1, max_size=3), data=st.data())
def test_none_is_the_plain_tokenisation_of_prompt_plus_response(bpe, prompts: list[str],
                                                                data: st.DataObject) -> None:
    responses = [data.draw(TEXT) for _ in prompts]
    batch = encode_prompt_response(bpe, prompts, responses, chat_template="none", max_length=64)
    eos = bpe.eos_token_id
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        mask = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][mask].tolist()
        assert ids == bpe(p + r)["input_ids"] + [eos]
        # The loss covers the tokens past the prompt's own tokens, and EOS.
        alone = bpe(p)["input_ids"]
        k = len(os.path.commonprefix([ids, alone]))
        targets = batch["shift_labels"][row]
        assert targets[targets != -100].tolist() == ids[k:]


def test_none_counts_a_token_across_the_boundary_as_response(bpe) -> None:
    joint = bpe("ab ab")["input_ids"]
    # Tokenising apart would split the last "ab": the layout must tokenise the joint text.
    assert bpe("ab a")["input_ids"] + bpe("b")["input_ids"] != joint
    batch = encode_prompt_response(bpe, ["ab a"], ["b"], chat_template="none")
    targets = batch["shift_labels"][0]
    assert targets[targets != -100].tolist() == [joint[-1], bpe.eos_token_id]
    assert prompt_format(bpe, "none") == "plain" and prompt_format(bpe, "auto") == "answer_suffix"


def test_a_given_template_replaces_the_tokenizers(tiny_chat_tokenizer) -> None:
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"
    got = encode_prompt_response(tiny_chat_tokenizer, ["hi"], ["yo"], chat_template=template)
    ids = got["input_ids"][0][got["attention_mask"][0].bool()].tolist()
    want = tiny_chat_tokenizer("[hi]>yo", add_special_tokens=False)["input_ids"]
    assert ids == want + [tiny_chat_tokenizer.eos_token_id]
    auto = encode_prompt_response(tiny_chat_tokenizer, ["hi"], ["yo"])
    assert auto["input_ids"].tolist() != got["input_ids"].tolist()
    assert prompt_format(tiny_chat_tokenizer, template) == "chat:given"
    assert prompt_format(tiny_chat_tokenizer, "auto") == "chat:tokenizer"


def test_auto_without_a_template_is_prompt_answer_suffix_then_response(bpe) -> None:
    got = encode_prompt_response(bpe, ["ab a", "no"], ["yes", "b"], max_length=64)
    for row, (p, r) in enumerate((("ab a", "yes"), ("no", "b"))):
        ids = got["input_ids"][row][got["attention_mask"][row].bool()].tolist()
        answer = bpe(r, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
        assert ids == bpe(p + "\nAnswer:")["input_ids"] + answer
        targets = got["shift_labels"][row]
        assert targets[targets != -100].tolist() == answer  # the loss: response and EOS only


def test_auto_with_a_template_is_the_chat_turns_then_response(tiny_chat_tokenizer) -> None:
    tok = tiny_chat_tokenizer
    got = encode_prompt_response(tok, ["hi there"], ["yo"], system="Be brief.")
    ids = got["input_ids"][0][got["attention_mask"][0].bool()].tolist()
    turns = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "hi there"}],
                                    add_generation_prompt=True, tokenize=False)
    prompt = tok(turns, add_special_tokens=False)["input_ids"]
    assert ids == prompt + tok("yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Truncation keeps the response whole and cuts the prompt from the left.
    short = encode_prompt_response(tok, ["hi there"], ["yo"], system="Be brief.", max_length=4)
    kept = short["input_ids"][0][short["attention_mask"][0].bool()].tolist()
    assert len(kept) == 4 and kept == ids[-4:]


@pytest.fixture(scope="module")
def tiny_chat_tokenizer(tiny_chat_lm_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_lm_dir)


@pytest.fixture(scope="module")
def lm(tiny_chat_lm_dir: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir, dtype=torch.float64).eval()
    with torch.no_grad():  # a random model whose choices differ
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


@torch.no_grad()
def _direct_scores(model, tok, prompt: str, choices: list[str], chat_template: str
                   ) -> list[float]:
    """Sum of log p over each choice's response tokens and EOS: one unpadded row at a time."""
    out = []
    for c in choices:
        b = encode_prompt_response(tok, [prompt], [c], chat_template=chat_template)
        n = int(b["attention_mask"].sum())
        ids = b["input_ids"][:, -n:]
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        targets = b["shift_labels"][0]
        k = targets.numel()
        rows = logp[-k:]
        out.append(float(sum(rows[j, t] for j, t in enumerate(targets.tolist()) if t != -100)))
    return out


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_accuracy_equals_a_direct_count(lm, tiny_chat_tokenizer, chat_template: str) -> None:
    tok = tiny_chat_tokenizer
    prompts = ["good film", "a dull plot here", "fine", "bad bad", "so so film", "x"]
    labels = [1, 0, 1, 0, 2, 2]
    choices = ["negative", "positive", "neutral"]
    out = evaluate_pairs(lambda b: lm(**b).logits, tok, prompts, labels=labels, choices=choices,
                         chat_template=chat_template, batch_size=4)
    scores = [_direct_scores(lm, tok, p, choices, chat_template) for p in prompts]
    predicted = [max(range(3), key=lambda j, s=s: s[j]) for s in scores]
    correct = sum(p == y for p, y in zip(predicted, labels, strict=True))
    assert 0 < correct < 6  # the test can tell right from wrong
    assert out["accuracy"] == correct / 6 and out["correct"] == correct
    nll = -sum(s[y] for s, y in zip(scores, labels, strict=True))
    tokens = sum(len(tok(choices[y], add_special_tokens=False)["input_ids"]) + 1 for y in labels)
    assert out["tokens"] == tokens and out["loss"] == pytest.approx(nll / tokens, rel=1e-10)


def test_loss_of_prompt_response_rows(lm, tiny_chat_tokenizer) -> None:
    tok = tiny_chat_tokenizer
    with torch.no_grad():
        out = evaluate_pairs(lambda b: lm(**b).logits, tok, ["a", "bb"], ["x", "yz"], batch_size=1)
    direct = [_direct_scores(lm, tok, p, [r], "auto")[0] for p, r in (("a", "x"), ("bb", "yz"))]
    assert out["loss"] == pytest.approx(-sum(direct) / 5, rel=1e-10) and "accuracy" not in out
    with pytest.raises(DataError):
        evaluate_pairs(lambda b: lm(**b).logits, tok, ["a"], ["x"], labels=[0], choices=["x"])


def test_response_nll_and_choice_accuracy_errors(lm, tiny_chat_tokenizer) -> None:
    nll, n = response_nll(torch.zeros(2, 3, 5), torch.tensor([[1, 2, -100], [-100, -100, 4]]))
    assert n.tolist() == [2, 1]
    torch.testing.assert_close(nll, torch.log(torch.tensor([5.0, 5.0], dtype=torch.float64))
                               * torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.raises(DataError, match="different tokens"):
        choice_accuracy(lm, tiny_chat_tokenizer, ["a"], [0], ["pos", "pot"])
