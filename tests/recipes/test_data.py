"""spdelta.recipes.data on a tiny word-level tokenizer and a tiny Llama (no downloads)."""

from __future__ import annotations

import pytest
import torch

from spdelta.recipes.data import encode_prompt_response
from spdelta.recipes.evaluate import sentiment_accuracy

WORDS = [
    "<pad>",
    "<eos>",
    "is",
    "this",
    "movie",
    "review",
    "positive",
    "or",
    "negative",
    "?",
    "good",
    "bad",
    "film",
    "answer",
    ":",
    "great",
    "dull",
    "a",
]


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_left_padded_batch_puts_the_answer_last(tokenizer) -> None:
    # No chat template: the prompt gets "\nAnswer:" (unknown here: one <pad>-id token, "?").
    batch = encode_prompt_response(tokenizer, ["good film", "film"], ["bad film", "positive"])
    ids, mask, keep = batch["input_ids"], batch["attention_mask"], batch["logits_to_keep"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    good, film, bad, positive = (WORDS.index(w) for w in ("good", "film", "bad", "positive"))
    assert ids.tolist() == [[good, film, pad, bad, film, eos], [pad, pad, film, pad, positive, eos]]
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert keep == 4  # the longest answer: 2 tokens + EOS, predicted from the 3 positions before
    assert batch["shift_labels"].tolist() == [[bad, film, eos, -100], [-100, positive, eos, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]


def test_hf_loss_on_kept_logits_equals_full_reference(tokenizer, tiny_llama) -> None:
    batch = encode_prompt_response(
        tokenizer, ["a good film", "a dull film"], ["positive", "negative"]
    )
    out = tiny_llama(**batch)
    full = tiny_llama(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    ).logits
    keep = batch["logits_to_keep"]
    ref = torch.nn.functional.cross_entropy(
        full[:, -keep:].reshape(-1, full.shape[-1]).float(), batch["shift_labels"].reshape(-1)
    )
    torch.testing.assert_close(out.loss, ref)


def test_sentiment_accuracy_matches_a_direct_count(tokenizer, tiny_llama) -> None:
    from datasets import Dataset

    rows = Dataset.from_dict(
        {"text": ["a good film", "a dull film", "great", "bad"], "label": [1, 0, 1, 0]}
    )
    acc = sentiment_accuracy(tiny_llama, tokenizer, rows, batch_size=3)
    pos, neg = WORDS.index("positive"), WORDS.index("negative")
    correct = 0
    for text, label in zip(rows["text"], rows["label"], strict=True):
        b = encode_prompt_response(
            tokenizer, [f"Is this movie review positive or negative?\nReview: {text}"], ["positive"]
        )
        logits = tiny_llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[
            0, -3
        ]
        correct += int((logits[pos] > logits[neg]) == bool(label))
    assert acc == correct / 4


def test_shared_prefix_cache_gives_each_reviews_own_logits(tokenizer, tiny_llama) -> None:
    from spdelta.recipes.evaluate import _cache_keyword, _SharedPrefix

    model = tiny_llama.eval()  # float64, but HF's eager attention takes its softmax in fp32
    prompts = ["Is this movie review positive or negative?\nReview: " + t
               for t in ("a good film", "bad", "a dull dull film", "good good")]
    batch = encode_prompt_response(tokenizer, prompts, ["positive"] * 4)
    keep = batch["logits_to_keep"]
    for key in ("labels", "shift_labels"):
        del batch[key]
    prefix = _SharedPrefix(model, _cache_keyword(model))
    with torch.no_grad():
        cut = prefix.inputs(batch)
        assert cut["input_ids"].shape[1] < batch["input_ids"].shape[1]  # a prefix was cut
        got = model(**cut).logits
        again = model(**prefix.inputs(batch)).logits  # the cached prefix, reused
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"],
                                               strict=True)):
            alone = model(input_ids=ids[mask.bool()][None]).logits[0, -keep:]  # no padding
            torch.testing.assert_close(got[row], alone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(again[row], alone, rtol=1e-5, atol=1e-6)


def test_shared_prefix_never_takes_the_kept_positions(tokenizer, tiny_llama) -> None:
    from spdelta.recipes.evaluate import _cache_keyword, _SharedPrefix

    prompts = ["Is this movie review positive or negative?\nReview: good"] * 3  # identical rows
    batch = encode_prompt_response(tokenizer, prompts, ["positive"] * 3)
    keep = batch["logits_to_keep"]
    for key in ("labels", "shift_labels"):
        del batch[key]
    with torch.no_grad():
        cut = _SharedPrefix(tiny_llama.eval(), _cache_keyword(tiny_llama)).inputs(batch)
        assert cut["input_ids"].shape[1] == keep  # everything else is the shared prefix
        alone = tiny_llama(input_ids=batch["input_ids"][:1]).logits[0, -keep:]
        torch.testing.assert_close(tiny_llama(**cut).logits[0], alone, rtol=1e-5, atol=1e-6)
