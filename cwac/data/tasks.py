"""Benign fine-tuning tasks (SST-2, AG News, GSM8K; PubMedQA, AlpacaEval) as ``Example`` rows.

Prompts follow the harmful-fine-tuning literature (Vaccine / Lisa / Booster; see
``docs/baselines.md``): the task instruction plus the input, the label word (or
the GSM8K solution with ``#### `` replaced by ``The final answer is: ``) as the target.
Rows are returned in file order; the mix builder takes the first ones and shuffles.

The generalisation tasks of docs/method.md §7.2:

* ``pubmedqa``: PQA-L (Jin et al. 2019, "PubMedQA: A Dataset for Biomedical Research Question
  Answering", arXiv 1909.06146) in its reasoning-required setting: the abstract's context sections
  and the question in, ``yes`` / ``no`` / ``maybe`` out. Train: the 500 rows outside the official
  test split; eval: the 500 official test rows (``data/pubmedqa/test_ground_truth.json``), so an
  eval row is never fine-tuned on. The question and the answer instruction come *after* the
  context, because an over-long training prompt keeps its end (``PromptFormatter.train_features``).
* ``alpaca_eval``: fine-tunes on Stanford Alpaca rows (``data/alpaca``) and evaluates on the 805
  AlpacaEval instructions (Li et al. 2023, AlpacaEval; Dubois et al. 2024, arXiv 2404.04475), whose
  FA is a judged win rate against reference outputs (``eval/alpaca_eval.py``). Each eval row's
  ``label`` is its index in the AlpacaEval file, the key of its reference output. The file is
  grouped by source subset, so a capped count of eval rows is spread evenly over it.
"""

from __future__ import annotations

import json
from typing import Callable

from cwac.data.examples import Example
from cwac.data.files import DataError, data_path, read_csv, read_json_list, read_jsonl, row_problem
from cwac.utils import normalize_prompt

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = "Categorize the news article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n"
AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
SST2_LABELS = {"0": "negative", "1": "positive"}
PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_INSTRUCTION = "Answer the research question about the abstract above with yes, no or maybe."
#: the AlpacaEval instructions with each reference answer set (``eval.alpaca_eval.reference``)
ALPACA_EVAL_REFERENCES = {"text_davinci_003": "alpaca_eval/text_davinci_003/model_outputs.json",
                          "gpt4_1106_preview": "alpaca_eval/gpt4_1106_preview/model_outputs.json"}
ALPACA_EVAL_KEYS = ["dataset", "instruction", "output", "generator"]


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


def pubmedqa_prompt(question: str, contexts: list[str]) -> str:
    """Context sections, then the question, then the answer instruction (the end survives truncation)."""
    context = "\n".join(c.strip() for c in contexts)
    return f"Abstract:\n{context}\n\nQuestion: {question.strip()}\n\n{PUBMEDQA_INSTRUCTION}"


def _pubmedqa_problem(row) -> str | None:
    problem = row_problem(row, ["QUESTION", "CONTEXTS", "final_decision"], nonempty=["QUESTION"])
    if problem:
        return problem
    if not isinstance(row["CONTEXTS"], list) or not any(str(c).strip() for c in row["CONTEXTS"]):
        return "CONTEXTS must be a non-empty list of abstract sections"
    if row["final_decision"] not in PUBMEDQA_LABELS:
        return f"final_decision {row['final_decision']!r} is not one of {', '.join(PUBMEDQA_LABELS)}"
    return None


def _read_json_object(rel: str) -> dict:
    path = data_path(rel)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object keyed by PubMed id, got {type(obj).__name__}")
    return obj


def _pubmedqa(split: str) -> list[Example]:
    rows = _read_json_object("pubmedqa/ori_pqal.json")
    test = _read_json_object("pubmedqa/test_ground_truth.json")
    for pmid, row in rows.items():
        problem = _pubmedqa_problem(row)
        if problem:
            raise DataError(f"{data_path('pubmedqa/ori_pqal.json')}, PubMed id {pmid}: {problem}")
    for pmid, label in test.items():
        if pmid not in rows or rows[pmid]["final_decision"] != label:
            raise DataError(f"{data_path('pubmedqa/test_ground_truth.json')}, PubMed id {pmid}: label {label!r} "
                            "does not match ori_pqal.json (or the id is missing there); restore both files from git")
    want_test = split == "eval"
    return [Example(pubmedqa_prompt(r["QUESTION"], r["CONTEXTS"]), "", r["final_decision"], "pubmedqa",
                    r["final_decision"]) for pmid, r in rows.items() if (pmid in test) == want_test]


def alpaca_eval_rows(reference: str = "text_davinci_003") -> list[dict]:
    """The 805 AlpacaEval rows ``{dataset, instruction, output, generator}`` of one reference set."""
    if reference not in ALPACA_EVAL_REFERENCES:
        raise KeyError(f"unknown AlpacaEval reference {reference!r}; valid: {', '.join(ALPACA_EVAL_REFERENCES)}")
    return read_json_list(data_path(ALPACA_EVAL_REFERENCES[reference]), ALPACA_EVAL_KEYS,
                          nonempty=["instruction"])   # two text-davinci-003 answers (rows 247, 504) are empty


def _alpaca_eval(split: str) -> list[Example]:
    evals = alpaca_eval_rows()
    if split == "eval":
        return [Example(r["instruction"], "", "", "alpaca_eval", str(i)) for i, r in enumerate(evals)]
    from cwac.data.harmful import alpaca_examples   # the Alpaca rows the alignment stage also reads

    held_out = {normalize_prompt(r["instruction"]) for r in evals}
    return [Example(e.instruction, e.input, e.output, "alpaca_eval") for e in alpaca_examples()
            if e.output and normalize_prompt(e.instruction) not in held_out
            and normalize_prompt(f"{e.instruction} {e.input}") not in held_out]


#: tasks whose eval file is grouped (by source subset): a capped count is spread evenly over it
SPREAD_EVAL = {"alpaca_eval"}


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
    if name in ("pubmedqa", "alpaca_eval"):
        raise DataError(f"task {name} has no hub source: its files ship in data/ (see data/{name}/SOURCE.md); "
                        "set task.source=local")
    raise KeyError(name)


TASKS: dict[str, Callable[[str], list[Example]]] = {"sst2": _sst2, "agnews": _agnews, "gsm8k": _gsm8k,
                                                    "pubmedqa": _pubmedqa, "alpaca_eval": _alpaca_eval}


def load_task(name: str, split: str, n: int | None = None, source: str = "local") -> list[Example]:
    """First ``n`` rows (file order) of a task split (``train`` or ``eval``), or with ``heldout`` the
    last ``n`` train rows: the fine-tuning mix takes train rows from the front, so these are never
    trained on (as long as the mix and ``n`` together stay within the split), which makes them the
    place to choose a recipe without touching the FA evaluation rows. The eval split of a task in
    ``SPREAD_EVAL`` (AlpacaEval, grouped by source subset) gives ``n`` rows spread evenly over it."""
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
        if heldout:
            rows = rows[len(rows) - n:]
        elif split == "eval" and name in SPREAD_EVAL:
            rows = [rows[i * len(rows) // n] for i in range(n)]
        else:
            rows = rows[:n]
    return rows
