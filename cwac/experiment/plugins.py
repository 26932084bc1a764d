"""The one registration site: every method and every judge, by name, as a lazy
``"module:attr"`` entry (cf. lm-evaluation-harness' ``lm_eval/api/registry.py``). Nothing is
imported until a cell looks a name up, so the library below never imports what is built on it.

Adding a defence: write ``baselines/<name>.py`` with a ``cwac.api.Method`` subclass, add one
line below, and add ``conf/method/<name>.yaml``.
"""

from __future__ import annotations

from cwac.api import METHODS, Method
from eval.alpaca_eval import PAIRWISE_JUDGES
from eval.judges import JUDGES, Judge

_METHODS = {
    "sft": "baselines.sft:SFT",
    "cwac": "cwac.constraints.method:CWAC",
    "cwac_weight_only": "cwac.constraints.method:CWACWeightOnly",
    "cwac_act_only": "cwac.constraints.method:CWACActOnly",
    "asft": "baselines.asft:AsFT",
    "safeinstr": "baselines.safeinstr:SafeInstr",
    "sppft": "baselines.sppft:SPPFT",
    "lisa": "baselines.lisa:Lisa",
    "safelora": "baselines.safelora:SafeLoRA",
    "vaccine": "baselines.vaccine:Vaccine",
    "booster": "baselines.booster:Booster",
    "tvaccine": "baselines.tvaccine:TVaccine",
    "repnoise": "baselines.repnoise:RepNoise",
    "ldifs": "baselines.ldifs:LDIFS",
    "antidote": "baselines.antidote:Antidote",
}
_JUDGES = {
    "keyword": "eval.judges:KeywordRefusalJudge",
    "beaver_dam": "eval.model_judges:BeaverDamJudge",
    "llama_guard": "eval.model_judges:LlamaGuardJudge",
}

_PAIRWISE_JUDGES = {   # AlpacaEval win-rate judges (eval.alpaca_eval.judge_type)
    "causal_lm": "eval.alpaca_eval:CausalLMJudge",
}

for _name, _target in _PAIRWISE_JUDGES.items():
    PAIRWISE_JUDGES.register_lazy(_name, _target)
for _name, _target in _METHODS.items():
    METHODS.register_lazy(_name, _target)
for _name, _target in _JUDGES.items():
    JUDGES.register_lazy(_name, _target)


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def get_judge(name: str) -> type[Judge]:
    return JUDGES.get(name)
