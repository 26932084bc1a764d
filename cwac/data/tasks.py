"""Benign fine-tuning tasks (SST-2, AG News, GSM8K) as ``Example`` rows.

Prompts follow the harmful-fine-tuning literature (Vaccine / Lisa / Booster; see
``docs/baselines.md``): the task instruction plus the input, the label word (or
the GSM8K solution with ``#### `` replaced by ``The final answer is: ``) as the target.
Rows are returned in file order; the mix builder takes the first ones and shuffles.
"""

from __future__ import annotations

from typing import Callable

from cwac.data.examples import Example
from cwac.data.files import DataError, data_path, read_csv, read_jsonl

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = "Categorize the news article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n"
AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
SST2_LABELS = {"0": "negative", "1": "positive"}


def _sst2(split: str) -> list[Example]:
    fname = {"train": "sst2/train.tsv", "eval": "sst2/dev.tsv"}[split]
    path = data_path(fname)
    rows = read_csv(path, ["sentence", "label"], delimiter="\t", nonempty=["sentence"],
                    check=lambda r: None if r["label"] in SST2_LABELS else f"label {r['label']!r} is not 0 or 1")
    out = []
    for r in rows:
        word = SST2_LABELS[r["label"]]
        out.append(Example(SST2_INSTRUCTION, r["sentence"].strip(), word, "sst2", word))
    return out


def _agnews(split: str) -> list[Example]:
    if split == "train":
        # valid.csv: headerless "class","title","description" with class 1..4 (a 5k subset of the official train split)
        path = data_path("ag_news/valid.csv")
        rows = read_csv(path, ["cls", "title", "description"], fieldnames=["cls", "title", "description"],
                        check=lambda r: _agnews_problem(r, "cls", {"1", "2", "3", "4"}, "1-4"))
        label = lambda r: AGNEWS_CLASSES[int(r["cls"]) - 1]  # noqa: E731
    else:
        path = data_path("ag_news/test.csv")
        rows = read_csv(path, ["title", "description", "class"],
                        check=lambda r: _agnews_problem(r, "class", set(AGNEWS_CLASSES), str(AGNEWS_CLASSES)))
        label = lambda r: r["class"].strip()  # noqa: E731
    return [Example(AGNEWS_INSTRUCTION, f"{r['title'].strip()} {r['description'].strip()}", label(r), "agnews",
                    label(r)) for r in rows]


def _agnews_problem(row: dict, key: str, valid: set[str], valid_text: str) -> str | None:
    if row[key].strip() not in valid:
        return f"class {row[key]!r} is not one of {valid_text}"
    if not f"{row['title']}{row['description']}".strip():
        return "empty text: both title and description are blank"
    return None


def _gsm8k(split: str) -> list[Example]:
    path = data_path({"train": "gsm8k/train.jsonl", "eval": "gsm8k/test.jsonl"}[split])
    out = []
    no_final = lambda r: None if "#### " in r["answer"] else "answer has no '#### <number>' final answer"  # noqa: E731
    for r in read_jsonl(path, ["question", "answer"], nonempty=["question", "answer"], check=no_final):
        target = r["answer"].replace("#### ", "The final answer is: ")
        final = r["answer"].split("#### ")[-1].strip()
        out.append(Example(r["question"], "", target, "gsm8k", final))
    return out


def _hub(name: str, split: str) -> list[Example]:
    """Read a task from the Hugging Face hub (opt-in, needs network)."""
    from datasets import load_dataset

    if name == "sst2":
        ds = load_dataset("stanfordnlp/sst2", split={"train": "train", "eval": "validation"}[split])
        return [Example(SST2_INSTRUCTION, r["sentence"].strip(), SST2_LABELS[str(r["label"])], "sst2",
                        SST2_LABELS[str(r["label"])]) for r in ds]
    if name == "agnews":
        ds = load_dataset("fancyzhx/ag_news", split={"train": "train", "eval": "test"}[split])
        return [Example(AGNEWS_INSTRUCTION, r["text"], AGNEWS_CLASSES[r["label"]], "agnews",
                        AGNEWS_CLASSES[r["label"]]) for r in ds]
    if name == "gsm8k":
        ds = load_dataset("openai/gsm8k", "main", split={"train": "train", "eval": "test"}[split])
        return [Example(r["question"], "", r["answer"].replace("#### ", "The final answer is: "), "gsm8k",
                        r["answer"].split("#### ")[-1].strip()) for r in ds]
    raise KeyError(name)


TASKS: dict[str, Callable[[str], list[Example]]] = {"sst2": _sst2, "agnews": _agnews, "gsm8k": _gsm8k}


def load_task(name: str, split: str, n: int | None = None, source: str = "local") -> list[Example]:
    """First ``n`` rows (file order) of a task split (``train`` or ``eval``), or with ``heldout`` the
    last ``n`` train rows: the fine-tuning mix takes train rows from the front, so these are never
    trained on (as long as the mix and ``n`` together stay within the split), which makes them the
    place to choose a recipe without touching the FA evaluation rows."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    if split not in ("train", "eval", "heldout"):
        raise ValueError(f"split must be 'train', 'eval' or 'heldout', got {split!r}")
    heldout = split == "heldout"
    if heldout and n is None:
        raise ValueError("the heldout split needs a row count (eval.fa_n)")
    base = "train" if heldout else split
    if source == "local":
        rows = TASKS[name](base)
    elif source == "hub":
        rows = _hub(name, base)
    else:
        raise ValueError(f"task source must be 'local' or 'hub', got {source!r}")
    if n is not None:
        if n > (len(rows) // 2 if heldout else len(rows)):
            what = f"at most half of its {len(rows)} train rows" if heldout else f"{len(rows)} rows"
            raise DataError(f"task {name} {split} split has {what}, {n} were asked for; lower the count")
        rows = rows[len(rows) - n:] if heldout else rows[:n]
    return rows
