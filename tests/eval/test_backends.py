"""Generation stops where the chat model ends its turn, not only at the tokenizer's EOS."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from cwac.data.examples import Example
from cwac.data.prompts import collate_prompts, pad_id
from cwac.generation import count_generated, stop_token_ids
from eval.backends import HFBackend
from eval.vllm_backend import saved_stop_ids


def test_stop_ids_join_eos_and_the_generation_configs_end_ids(tmp_path):
    tok = SimpleNamespace(eos_token_id=1)
    assert stop_token_ids(tok) == [1]
    assert stop_token_ids(tok, SimpleNamespace(eos_token_id=[1, 107])) == [1, 107]   # Gemma-2-it
    assert stop_token_ids(tok, {"eos_token_id": 5}) == [1, 5]
    assert saved_stop_ids(tmp_path, tok) == [1]                                       # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 107]}))
    assert saved_stop_ids(tmp_path, tok) == [1, 107]
    assert count_generated([[4, 107, 0, 0], [4, 4, 4], [1, 0]], [1, 107]) == 2 + 3 + 1


def test_hf_generation_stops_at_the_generation_configs_end_of_turn_id(tiny_model):
    model, tok, fmt, _ = tiny_model
    ex = [Example("Tell me a short story about a cat.")]
    with torch.no_grad():
        logits = model(**collate_prompts([fmt.prompt_ids(ex[0])], pad_id(tok))).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    turn_end = second if first == tok.eos_token_id else first     # the greedy first token, made an end id
    plain = HFBackend(model, tok, fmt, progress=False)
    plain.generate(ex, 8)
    assert plain.generated_tokens > 1
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    ended = HFBackend(model, tok, fmt, progress=False)
    ended.generate(ex, 8)
    assert ended.generated_tokens == 1
