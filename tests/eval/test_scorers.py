"""PubMedQA's yes/no/maybe scorer: the decision parsed from the answer; wrong answers score wrong."""

from __future__ import annotations

import pytest

from eval.scorers import pubmedqa_extract, score


@pytest.mark.parametrize("answer,label,match,ok", [
    ("yes", "yes", "exact", True),
    ("Yes.", "yes", "exact", True),                       # case and punctuation around the word
    ("No, the data do not support it", "no", "exact", True),
    ("maybe", "maybe", "exact", True),
    ("yes", "no", "exact", False),                        # the wrong decision
    ("no", "yes", "exact", False),
    ("maybe", "yes", "exact", False),                     # a hedge is not the gold "yes"
    ("maybe", "no", "substring", False),
    ("yes", "maybe", "exact", False),
    ("Nobody knows", "no", "exact", False),               # "no" must be a whole word
    ("The answer is yes", "yes", "exact", False),         # non-conforming: exact reads the first word only
    ("The answer is yes", "yes", "substring", True),
    ("I cannot tell from the abstract", "no", "substring", False),   # no decision at all
    ("", "yes", "exact", False),
    ("", "yes", "substring", False),
    ("positive", "yes", "substring", False),              # another task's label word
])
def test_pubmedqa(answer, label, match, ok):
    assert score("pubmedqa", answer, label, match) is ok


def test_pubmedqa_extract_parses_the_decision_or_nothing():
    assert pubmedqa_extract("  MAYBE — the evidence is mixed") == "maybe"
    assert pubmedqa_extract("Unclear; maybe") is None
    assert pubmedqa_extract("Unclear; maybe", "substring") == "maybe"
    assert pubmedqa_extract("There is no yes or no answer", "substring") == "no"   # the first of the three words
    with pytest.raises(ValueError, match="eval.fa_match"):
        pubmedqa_extract("yes", "fuzzy")


def test_alpaca_eval_has_no_per_answer_score():
    with pytest.raises(KeyError, match="win rate"):
        score("alpaca_eval", "an answer", "0")
