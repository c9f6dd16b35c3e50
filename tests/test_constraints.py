"""The built-in suite's constraints: IFEval's checkers (lm-eval), this suite's two own rules, phrases, conflicts."""

import os

import pytest

from instructgpt import constraints as C
from instructgpt.constraints import Constraint

# (constraint, answers that follow it, answers that do not): hand-written, in the suite's own style
CASES = [
    (Constraint("lowercase"), ["the red fox likes apples.", "* the fox.\n* it is tiny."],
     ["The red fox likes apples.", "the red fox likes APPLES.", "123."]),
    (Constraint("capitals"), ["THE RED FOX LIKES APPLES.", "<<THE FOX>>\nIT IS TINY. P.S. BYE."],
     ["THE RED FOX likes apples.", "The red fox."]),
    (Constraint("include", "apples"), ["The fox likes apples.", "APPLES are red."], ["The fox likes pears."]),
    (Constraint("exclude", "red"), ["The fox likes apples.", "The fox is reddish."],
     ["The red fox likes apples.", "RED it is."]),
    (Constraint("start", "Fun fact:"), ["Fun fact: the fox runs.", '  "fun fact: the fox runs."'],
     ["The fox runs. Fun fact: it is red.", "Fun the fox."]),
    (Constraint("end", "Any other questions?"), ["The fox runs. Any other questions?",
                                                 '"The fox runs. any other questions?"'],
     ["Any other questions? The fox runs.", "The fox runs."]),
    (Constraint("bullets", 3), ["* one.\n* two.\n* three.", "- one\n- two\n- three"],
     ["* one.\n* two.", "* one.\n* two.\n* three.\n* four.", "one. two. three."]),
    (Constraint("no_comma"), ["The fox likes apples and pears."], ["The fox likes apples, pears and plums."]),
    (Constraint("quotes"), ['"The fox runs."', '  "The fox runs."  '], ['The fox runs.', '"The fox runs.', '"']),
    (Constraint("title"), ["<<The fox>>\nThe fox runs.", "The fox <<runs>>."], ["<<>>\nThe fox.", "The fox."]),
    (Constraint("postscript"), ["The fox runs.\nP.S. It is red.", "the fox runs. p.s. it is red."],
     ["The fox runs.", "The fox runs. PS it is red."]),
    (Constraint("json"), ['{"answer": "The fox runs."}', '```json\n{"a": 1}\n```'],
     ["The fox runs.", '{"answer": "The fox runs."'"}"" Sure!"]),
    (Constraint("max_words", 6), ["The red fox likes apples."], ["The red fox likes apples and pears."]),
    (Constraint("max_sentences", 3), ["The fox runs. It is red.", "Mr. Fox runs. He is red."],
     ["The fox runs. It is red. It is fast.", "The fox runs! Does it? Yes."]),
]


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[c.kind for c, _, _ in CASES])
def test_each_constraint_on_answers_that_follow_it_and_answers_that_do_not(constraint, good, bad):
    for text in good:
        assert constraint.check(text), (constraint, text)
    for text in bad:
        assert not constraint.check(text), (constraint, text)


def test_every_kind_has_a_case_and_ifeval_checks_all_but_the_suites_own_rules():
    assert {c.kind for c, _, _ in CASES} == set(C.KINDS)
    assert {k for k, iid in C.KINDS.items() if iid is None} == {"start"}
    assert set(C.OWN_RULES) == {"start", "lowercase", "capitals"}
    # the case kinds keep IFEval's instruction id (its meaning) and drop only its language identification, which
    # calls a correct short answer in capitals German
    ifeval_capitals = C.checker("change_case:english_capital", ())
    assert not ifeval_capitals("THE OLD DRAGON WANTS SEEDS.") and Constraint("capitals").check(
        "THE OLD DRAGON WANTS SEEDS.")
    assert ifeval_capitals("THE RED FOX RUNS IN THE GREEN FIELD.")


def test_the_suites_own_rules_on_ifevals_own_examples():
    """IFEval's test examples (google-research instruction_following_eval/instructions_test.py) for the rules this
    suite applies itself: the two case checks word for word, and the end-phrase cases turned round for the start."""
    lower, upper = Constraint("lowercase"), Constraint("capitals")
    assert upper.check("\n  THIS IS AN ENGLISH SENTENCE. EVERY LETTER IS CAPITALIZED!!! AMAZING.\n  ")
    assert not upper.check("\n  Every Word Is Capitalized.\n  ")
    assert lower.check("\n  every letter is lowercase.\n  ")
    assert not lower.check("\n  Almost every letter is lowercase.\n  ")
    assert Constraint("start", "Any more questions?").check("\n  Any more questions? The answer is 7.\n  ")
    assert Constraint("start", "This is the end.").check(
        "\n  This is the end. At the start of this prompt I am required to say that.\n  ")
    assert not Constraint("start", "This will fail.").check("\n  Paris is cool. This will fail.\n  ")


def test_phrases_parse_back_and_anything_else_is_refused():
    cons = [Constraint("lowercase"), Constraint("end", "Is there anything else I can help with?"),
            Constraint("start", "Fun fact:"), Constraint("bullets", 3), Constraint("max_words", 12),
            Constraint("include", "apples")]
    assert C.parse_constraints(" ".join(c.phrase for c in cons)) == cons
    assert C.parse_constraints("") == []
    assert C.parse_constraints("Use only lowercase letters. Be nice.") is None
    assert C.parse_constraints("Use exactly 9 bullet points.") is None  # outside the suite's range
    with pytest.raises(ValueError, match="unknown constraint kind"):
        Constraint("rhymes")
    with pytest.raises(ValueError, match="argument"):
        Constraint("include")


def test_conflicts_hold_ifevals_table_and_are_symmetric():
    assert C.conflicts("json", "lowercase") and C.conflicts("lowercase", "json")  # IFEval: JSON goes with keywords only
    assert not C.conflicts("json", "include")
    assert C.conflicts("lowercase", "capitals") and C.conflicts("bullets", "max_words")
    assert not C.conflicts("lowercase", "end")
    kinds = list(C.KINDS)
    assert all(C.conflicts(a, b) == C.conflicts(b, a) for a in kinds for b in kinds)


def test_punkt_is_written_from_the_wheel_and_nothing_is_downloaded(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("INSTRUCTGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk tried to download"))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = C.ensure_punkt()
    lang = os.path.join(root, "tokenizers", "punkt_tab", "english")
    assert root.startswith(str(tmp_path)) and nltk.data.path[0] == root
    assert sorted(os.listdir(lang)) == sorted(C._PUNKT_FILES)
    tok = nltk.tokenize.PunktTokenizer("english")
    assert tok.tokenize("Mr. Smith went home. He was tired.") == ["Mr. Smith went home.", "He was tired."]
    assert C.ensure_punkt() == root  # a second call finds the files
