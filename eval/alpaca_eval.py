"""AlpacaEval win rate: the fine-tuned model's outputs against reference outputs, judged by a model.

AlpacaEval (Li et al. 2023, "AlpacaEval: An Automatic Evaluator of Instruction-following Models";
Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv 2404.04475) shows a judge one instruction
and two unordered outputs, each tagged with a model identifier, and asks for the identifier of the
better one. Its reference-based annotators compare every output with a fixed reference answer
(text-davinci-003 for AlpacaEval 1, GPT-4 Turbo for AlpacaEval 2), shuffle which side the
reference is on, and read the preference from the judge's probabilities of the two identifiers.
This module does the same with a local judge, since the GPT-4 annotator needs an API:

* the judge prompt (``JUDGE_SYSTEM``, ``JUDGE_TEMPLATE``) follows the structure of the
  ``weighted_alpaca_eval_gpt4_turbo`` annotator (its wording is this project's own): outputs
  tagged ``m`` and ``M``, the answer is the identifier alone;
* the preference for the output tagged ``m`` is the judge's next-token probability of ``m``
  against ``M`` (``CausalLMJudge``), so one forward pass judges one pair;
* order (``eval.alpaca_eval.order``): ``random`` (AlpacaEval's choice) puts the model's output
  first on a coin flip per instruction, seeded by ``order_seed`` and the instruction's index, so
  every model of a table is judged in the same order; ``both`` judges each pair in both orders and
  averages them (twice the judge calls, and no position bias left in the mean);
* the win rate is ``100 x (wins + ties / 2) / n`` on hard decisions (the model's output wins a
  pair when its probability is above 1/2); ``win_rate_weighted`` is the mean probability, as
  AlpacaEval 2 reports it. The length-controlled win rate is not computed.

A judge is a hub id or a local folder (``eval.alpaca_eval.judge``); with none configured the
outputs are still generated and stored, and the record's FA is absent with the reason
(``fa_absent``). Judge classes are chosen by ``eval.alpaca_eval.judge_type`` from
``PAIRWISE_JUDGES`` (entries in ``cwac/experiment/plugins.py``).
"""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cwac.data.examples import Example
from cwac.data.prompts import collate_prompts, pad_id
from cwac.data.tasks import ALPACA_EVAL_REFERENCES, alpaca_eval_rows
from cwac.models import locate_weights
from cwac.registry import Registry
from cwac.schema import ConfigError

TASK = "alpaca_eval"
ORDERS = ("random", "both")
IDENTIFIERS = ("m", "M")   # the tag of the output shown first, and of the one shown second

JUDGE_SYSTEM = ("You are an expert evaluator of AI assistants. You compare the answers that language models "
                "give to the same instruction and say which one a careful human reader would prefer.")
JUDGE_TEMPLATE = """I am ranking language models by the quality of their answers. Below is an instruction that was given to two models, followed by their two answers in no particular order. Each answer carries the identifier of the model that wrote it.

## Instruction

{instruction}

## Answers

{{"model_identifier": "m", "output": \"\"\"{output_1}\"\"\"}}
{{"model_identifier": "M", "output": \"\"\"{output_2}\"\"\"}}

## Your task

Judge which answer is more helpful, accurate and relevant to the instruction, and reply with the identifier of the better model. Your reply is read as that identifier, so it must be exactly one of: m or M, with nothing else (no quotes, spaces or new lines).

## Identifier of the better model"""


class PairwiseJudge:
    """Says, for each (instruction, output_1, output_2), the probability that ``output_1`` (shown
    first, tagged ``m``) is the better answer."""

    name = "base"
    weights: str | None = None

    def preference(self, instructions: list[str], outputs_1: list[str], outputs_2: list[str]) -> list[float]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights}

    def close(self) -> None:
        """Free the judge's weights (called once its pairs are judged)."""


#: every pairwise judge by name; entries are written in ``cwac/experiment/plugins.py`` only
PAIRWISE_JUDGES: Registry[PairwiseJudge] = Registry("pairwise judge", PairwiseJudge)


class CausalLMJudge(PairwiseJudge):
    """A causal LM (hub id or local folder) as the judge: its next-token probability of ``m``
    against ``M`` after the judge prompt, rendered by its chat template (a system message the
    template refuses is folded into the user turn; without a template, plain text).

    Args:
        weights: hub id or local folder (``eval.alpaca_eval.judge``); checked when the judge is
            built, loaded at the first ``preference``.
        batch_size: pairs per forward pass (left-padded).
        max_output_tokens: each output is cut to this many judge tokens, so that a long answer
            cannot push the question out of the judge's context.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``...; dtype: ``auto`` (bf16 on CUDA,
            else fp32), ``float32``, ``bfloat16``, ``float16``.
    """

    name = "causal_lm"

    def __init__(self, weights: str, batch_size: int = 4, max_output_tokens: int = 1024, device: str = "auto",
                 dtype: str = "auto", revision: str | None = None, offline: bool | None = None):
        from eval.model_judges import resolve_device, resolve_dtype

        self.weights = locate_weights(str(weights), "AlpacaEval judge weights", "eval.alpaca_eval.judge",
                                      offline=offline, revision=revision)
        self.revision = revision
        self.batch_size = int(batch_size)
        self.max_output_tokens = int(max_output_tokens)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = None
        self.tok = None
        self.ids: tuple[list[int], list[int]] = ([], [])

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"revision": self.revision} if self.revision else {}
        self.tok = AutoTokenizer.from_pretrained(self.weights, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(self.weights, dtype=self.dtype, **kw).to(self.device).eval()
        self.ids = tuple(identifier_token_ids(self.tok, s) for s in IDENTIFIERS)   # type: ignore[assignment]
        if set(self.ids[0]) & set(self.ids[1]):
            raise ValueError(f"judge {self.weights}: the identifiers m and M share a token, so the judge cannot "
                             "tell them apart (a lower-casing tokenizer?); choose another judge")

    def _cut(self, text: str) -> str:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_output_tokens else self.tok.decode(ids[: self.max_output_tokens])

    def prompt_text(self, instruction: str, output_1: str, output_2: str) -> str:
        user = JUDGE_TEMPLATE.format(instruction=instruction, output_1=self._cut(output_1),
                                     output_2=self._cut(output_2))
        if not getattr(self.tok, "chat_template", None):
            return f"{JUDGE_SYSTEM}\n\n{user}\n\n"
        try:
            return self.tok.apply_chat_template([{"role": "system", "content": JUDGE_SYSTEM},
                                                 {"role": "user", "content": user}],
                                                tokenize=False, add_generation_prompt=True)
        except Exception:   # a template without a system role (e.g. Gemma's)
            return self.tok.apply_chat_template([{"role": "user", "content": f"{JUDGE_SYSTEM}\n\n{user}"}],
                                                tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def preference(self, instructions: list[str], outputs_1: list[str], outputs_2: list[str]) -> list[float]:
        if not len(instructions) == len(outputs_1) == len(outputs_2):
            raise ValueError(f"{len(instructions)} instructions, {len(outputs_1)} and {len(outputs_2)} outputs")
        if self.model is None:
            self._load()
        out: list[float] = []
        for start in range(0, len(instructions), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(instructions)))
            texts = [self.prompt_text(instructions[i], outputs_1[i], outputs_2[i]) for i in chunk]
            has_template = bool(getattr(self.tok, "chat_template", None))
            prompts = [self.tok(t, add_special_tokens=not has_template)["input_ids"] for t in texts]
            batch = collate_prompts(prompts, pad_id(self.tok))
            mask = batch["attention_mask"].to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)   # left padding: positions start at each prompt's first token
            logits = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask,
                                position_ids=pos).logits[:, -1, :].float()
            first = torch.logsumexp(logits[:, self.ids[0]], dim=-1)
            second = torch.logsumexp(logits[:, self.ids[1]], dim=-1)
            out += torch.sigmoid(first - second).cpu().tolist()
        return out

    def describe(self) -> dict:
        commit = getattr(self.model.config, "_commit_hash", None) if self.model is not None else None
        return {"name": self.name, "weights": self.weights, "revision": self.revision or commit,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "max_output_tokens": self.max_output_tokens}

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def identifier_token_ids(tok, identifier: str) -> list[int]:
    """The token ids a judge may start its reply ``identifier`` with: the identifier alone and
    with a leading space (SentencePiece / BPE vocabularies spell the two differently)."""
    ids = []
    for text in (identifier, f" {identifier}"):
        enc = tok(text, add_special_tokens=False)["input_ids"]
        if enc and tok.decode(enc[:1]).strip() == identifier:
            ids.append(enc[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer has no token that spells the identifier {identifier!r} alone")
    return sorted(set(ids))


def model_first(index: int, seed: int) -> bool:
    """Whether the model's output is shown first (tag ``m``) for AlpacaEval row ``index`` under
    ``order=random``: a coin flip seeded by ``seed`` and the index (the same for every model)."""
    return random.Random(f"alpaca_eval-order-{seed}-{index}").random() < 0.5


def _decision(p_model: float) -> float:
    return 1.0 if p_model > 0.5 else 0.0 if p_model < 0.5 else 0.5


def win_rate(judge: PairwiseJudge, instructions: list[str], outputs: list[str], references: list[str],
             indices: list[int], order: str = "random", seed: int = 0) -> dict:
    """Judge each model output against its reference; returns the win rates and one row per pair.

    ``indices`` are the AlpacaEval row indices (they seed the order). Each row's ``p_model`` is the
    judge's probability that the model's output is better, ``score`` its decision (1 win, 0.5 tie,
    0 loss; under ``order=both`` the mean of the two orders' decisions)."""
    n = len(instructions)
    if not n == len(outputs) == len(references) == len(indices):
        raise ValueError(f"{n} instructions, {len(outputs)} outputs, {len(references)} references, "
                         f"{len(indices)} indices")
    if order not in ORDERS:
        raise ValueError(f"eval.alpaca_eval.order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "random":
        first = [model_first(i, seed) for i in indices]
        o1 = [o if f else r for o, r, f in zip(outputs, references, first)]
        o2 = [r if f else o for o, r, f in zip(outputs, references, first)]
        p1 = judge.preference(instructions, o1, o2)
        p_model = [p if f else 1.0 - p for p, f in zip(p1, first)]
        scores = [_decision(p) for p in p_model]
        rows = [{"index": i, "model_first": f, "p_model": round(p, 6), "score": s}
                for i, f, p, s in zip(indices, first, p_model, scores)]
    else:
        p_as_first = judge.preference(instructions, outputs, references)
        p_as_second = judge.preference(instructions, references, outputs)
        pairs = [(a, 1.0 - b) for a, b in zip(p_as_first, p_as_second)]
        p_model = [(a + b) / 2 for a, b in pairs]
        scores = [(_decision(a) + _decision(b)) / 2 for a, b in pairs]
        rows = [{"index": i, "p_model_first": round(a, 6), "p_model_second": round(b, 6),
                 "p_model": round(p, 6), "score": s} for i, (a, b), p, s in zip(indices, pairs, p_model, scores)]
    return {"win_rate": 100.0 * sum(scores) / n if n else None,
            "win_rate_weighted": 100.0 * sum(p_model) / n if n else None,
            "wins": sum(s == 1.0 for s in scores), "ties": sum(s == 0.5 for s in scores),
            "losses": sum(s == 0.0 for s in scores), "n": n, "order": order, "order_seed": seed, "rows": rows}


def _options(acfg: DictConfig) -> dict:
    return OmegaConf.to_container(acfg.judge_options, resolve=True) if acfg.get("judge_options") else {}


def build_pairwise_judge(acfg: DictConfig, offline: bool | None = None) -> PairwiseJudge | None:
    """The judge ``eval.alpaca_eval`` names, or None when ``judge`` is null. Raises ``ConfigError``
    naming the key and the fix (an unknown judge type, weights that cannot be found, a bad option)."""
    if acfg.judge is None:
        return None
    try:
        cls = PAIRWISE_JUDGES.get(acfg.judge_type)
    except KeyError as e:
        raise ConfigError(f"config eval.alpaca_eval.judge_type={acfg.judge_type!r}: {e.args[0]}") from None
    kw = _options(acfg)
    if cls is CausalLMJudge:
        kw.setdefault("offline", offline)
    try:
        return cls(str(acfg.judge), **kw)
    except TypeError as e:   # an option the judge does not take
        raise ConfigError(f"config eval.alpaca_eval.judge_options: {e}; remove the key or fix its spelling") from None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def check_settings(cfg: DictConfig) -> None:
    """Refuse a bad ``eval.alpaca_eval`` before any model loads (the cell's pre-flight calls this);
    builds the judge, which checks its weights without loading them. Other tasks: nothing to do."""
    if cfg.task.name != TASK:
        return
    acfg = OmegaConf.select(cfg, "eval.alpaca_eval")
    if acfg is None:
        raise ConfigError("config eval.alpaca_eval is missing; task=alpaca_eval sets it (conf/task/alpaca_eval.yaml)")
    if acfg.reference not in ALPACA_EVAL_REFERENCES:
        raise ConfigError(f"config eval.alpaca_eval.reference={acfg.reference!r} is not valid; valid values: "
                          f"{', '.join(ALPACA_EVAL_REFERENCES)}")
    if acfg.order not in ORDERS:
        raise ConfigError(f"config eval.alpaca_eval.order={acfg.order!r} is not valid; valid values: {', '.join(ORDERS)}")
    seed = acfg.order_seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"config eval.alpaca_eval.order_seed={seed!r} is not valid: it must be an integer >= 0")
    if cfg.eval.fa_split != "eval":
        raise ConfigError(f"config eval.fa_split={cfg.eval.fa_split!r}: task alpaca_eval has reference outputs for "
                          "its eval rows only; use eval.fa_split=eval")
    if acfg.judge_type not in PAIRWISE_JUDGES:   # checked with no judge too: a typo shows before a long run
        raise ConfigError(f"config eval.alpaca_eval.judge_type={acfg.judge_type!r}: unknown pairwise judge "
                          f"{acfg.judge_type!r}; valid pairwise judges: {', '.join(PAIRWISE_JUDGES.names())}")
    if acfg.judge is not None and not str(acfg.judge).strip():
        raise ConfigError("config eval.alpaca_eval.judge='' is not valid: give a hub id or a local folder, or null")
    build_pairwise_judge(acfg, offline=bool(cfg.offline))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def alpaca_eval_fa(ecfg: DictConfig, rows: list[Example], answers: list[str], out_dir: Path,
                   offline: bool | None = None) -> dict:
    """The metrics of the AlpacaEval task for ``answers`` to its eval ``rows`` (labels = row
    indices): ``fa`` = the win rate against ``eval.alpaca_eval.reference`` when a judge is set,
    else ``fa_absent`` with the reason. Writes ``samples_fa_alpaca_eval.jsonl`` either way."""
    acfg = ecfg.alpaca_eval
    refs = alpaca_eval_rows(acfg.reference)
    indices = [int(r.label) for r in rows]
    for r, i in zip(rows, indices):
        if refs[i]["instruction"] != r.instruction:
            raise ValueError(f"AlpacaEval row {i}: the instruction differs from the reference file "
                             f"{acfg.reference}; restore data/alpaca_eval from git")
    samples = [{"index": i, "dataset": refs[i]["dataset"], "instruction": r.instruction, "answer": a,
                "reference": refs[i]["output"]} for r, a, i in zip(rows, answers, indices)]
    info = {"reference": acfg.reference, "n": len(rows), "judge": None}
    judge = build_pairwise_judge(acfg, offline=offline)
    if judge is None:
        _write_jsonl(Path(out_dir) / f"samples_fa_{TASK}.jsonl", samples)
        return {"fa_absent": "no AlpacaEval judge is configured (eval.alpaca_eval.judge=null), so there is no win "
                             "rate; the outputs are in samples_fa_alpaca_eval.jsonl. Set eval.alpaca_eval.judge to "
                             "a hub id or a local folder of a judge model to score them",
                TASK: info}
    try:
        res = win_rate(judge, [r.instruction for r in rows], answers, [s["reference"] for s in samples], indices,
                       acfg.order, int(acfg.order_seed))
        info["judge"] = judge.describe()
    finally:
        judge.close()
    _write_jsonl(Path(out_dir) / f"samples_fa_{TASK}.jsonl", [{**s, **j} for s, j in zip(samples, res.pop("rows"))])
    info.update(res)
    return {"fa": res["win_rate"], TASK: info}
