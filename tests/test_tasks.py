"""Tests for the task suite, the gold labeler and the simulated demonstrator (numbers and properties)."""

from __future__ import annotations

import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

try:
    from instructgpt import tasks as T
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from instructgpt import tasks as T

# family -> (prompt, right answer, wrong answers, right answer with extra text)
HAND: dict[str, tuple[str, str, list[str], str]] = {
    "reverse_word": ("Reverse the word 'apple'.", "elppa", ["apple", "elpa", "eplpa", "banana"], "The word backwards is elppa."),
    "spell_word": ("Spell 'apple' with dashes between the letters.", "a-p-p-l-e", ["apple", "a-p-l-e", "e-l-p-p-a"], "Sure! a-p-p-l-e"),
    "sort_numbers": ("Sort these numbers from smallest to largest: 12, 3, 7.", "3, 7, 12", ["12, 3, 7", "12, 7, 3", "3, 7"], "The sorted list is 3, 7, 12."),
    "add": ("What is 12 plus 7?", "19", ["20", "18", "5", "127"], "The answer is 19."),
    "subtract": ("Subtract 7 from 12.", "5", ["4", "19", "-5", "seven"], "12 minus 7 is 5."),
    "count_letter": ("How many times does the letter 'p' appear in 'apple'?", "2", ["1", "3", "0", "apple"], "It appears 2 times."),
    "uppercase": ("Convert 'green apple' to uppercase.", "GREEN APPLE", ["green apple", "Green Apple", "GREEN APLE"], "Sure! GREEN APPLE"),
    "repeat_word": ("Repeat the word 'cat' 3 times, separated by spaces.", "cat cat cat", ["cat cat", "cat cat cat cat", "cat", "dog dog dog"], "Here you go: cat cat cat"),
    "largest": ("Which number is the largest: 12, 45, 7?", "45", ["12", "7", "44", "12, 45, 7"], "The largest number is 45."),
    "plural": ("What is the plural of 'mouse'?", "mice", ["mouses", "mouse", "mices"], "The plural of mouse is mice."),
    "first_word": ("Give the first word in 'small dogs like apples'.", "small", ["dogs", "apples", "small dogs like apples"], "The first word is small."),
    "last_word": ("Which word comes last in 'small dogs like apples'?", "apples", ["small", "like", "apple"], "The last word is apples."),
    "list_items": (
        "Make a bulleted list of these items: cats, dogs, hens.",
        "- cats\n- dogs\n- hens",
        ["cats, dogs, hens", "- cats\n- dogs", "- dogs\n- cats\n- hens", "- cats\n- dogs\n- hens\n- figs"],
        "Here is the list:\n- cats\n- dogs\n- hens",
    ),
}


def test_families_cover_the_suite() -> None:
    assert len(T.FAMILIES) >= 10 and len(set(T.FAMILIES)) == len(T.FAMILIES)
    assert set(HAND) == set(T.FAMILIES)
    for f in T._FAMILY_LIST:
        assert len(f.templates) >= 3, f.name


@pytest.mark.parametrize("family", sorted(HAND))
def test_gold_labeler_hand_written(family: str) -> None:
    prompt, right, wrongs, extra = HAND[family]
    task = T.parse_task(prompt)
    assert task is not None and task.family == family and task.answer == right
    assert T.gold_score(prompt, right) == 1.0
    assert T.gold_score(task, right) == 1.0
    assert T.gold_score(prompt, f"  {right}\n") == 1.0  # surrounding whitespace / one trailing newline
    for w in wrongs:
        assert T.gold_score(prompt, w) < 0.5, w
    assert 0.4 < T.gold_score(prompt, extra) < 0.9
    assert T.gold_score(prompt, "") == 0.0
    assert T.gold_score(prompt, "   \n") == 0.0


@pytest.mark.parametrize(
    ("prompt", "response"),
    [
        ("What is 12 plus 7?", "19."),
        ("What is 12 plus 7?", "nineteen"),
        ("Reverse the word 'apple'.", "'elppa'"),
        ("Spell 'apple' with dashes between the letters.", "a p p l e"),
        ("Sort these numbers from smallest to largest: 12, 3, 7.", "3 7 12"),
        ("Repeat the word 'cat' 3 times, separated by spaces.", "cat, cat, cat"),
        ("Make a bulleted list of these items: cats, dogs, hens.", "1. cats\n2. dogs\n3. hens"),
        ("Make a numbered list of these items: cats, dogs, hens.", "- cats\n- dogs\n- hens"),
    ],
)
def test_slightly_wrong_format_is_partial(prompt: str, response: str) -> None:
    assert 0.5 <= T.gold_score(prompt, response) <= 0.7


def test_case_matters_only_for_case_family() -> None:
    assert T.gold_score("Reverse the word 'apple'.", "ELPPA") == 1.0
    assert T.gold_score("Convert 'apple' to uppercase.", "APPLE") == 1.0
    assert T.gold_score("Convert 'apple' to uppercase.", "Apple") < 0.5
    assert T.gold_score("Convert 'apple' to uppercase.", "apple") < 0.5


def test_hedging_and_copying_do_not_count_as_extra_text() -> None:
    assert T.gold_score("What is 12 plus 7?", "19 or 20") < 0.5
    assert T.gold_score("Which number is the largest: 12, 45, 7?", "12, 45, 7") < 0.5
    assert T.gold_score("Give the first word in 'small dogs like apples'.", "small dogs like apples") < 0.5


def test_partial_credit_is_monotone() -> None:
    add = "What is 40 plus 39?"  # 79
    s = [T.gold_score(add, str(79 + d)) for d in (1, 5, 20, 50)]
    assert s == sorted(s, reverse=True) and s[0] > s[-1] + 0.2 and s[0] < 0.5
    rev = "Reverse the word 'garden'."  # nedrag
    assert T.gold_score(rev, "nedrg") > T.gold_score(rev, "nxdxxg") > T.gold_score(rev, "zzzzzz")
    srt = "Sort these numbers from smallest to largest: 50, 10, 40, 20, 30."
    assert T.gold_score(srt, "10, 20, 40, 30, 50") > T.gold_score(srt, "50, 40, 30, 20, 10")
    spell = "Spell 'garden' with dashes between the letters."
    assert T.gold_score(spell, "g-a-r-d-n") > T.gold_score(spell, "garden") > T.gold_score(spell, "x")


def test_gold_score_rejects_foreign_prompts() -> None:
    for bad in ["Tell me a joke.", "What is 12 times 7?", "What is the plural of 'xyzzy'?", ""]:
        assert T.parse_task(bad) is None
        with pytest.raises(ValueError):
            T.gold_score(bad, "19")


def test_gold_score_always_in_unit_interval() -> None:
    rng = random.Random(7)
    tasks = T.make_tasks("train", 260, seed=3)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABC0123456789-,.\n'!"
    for t in tasks:
        a = t.answer
        candidates = [
            a,
            a[::-1],
            a + a,
            a[: len(a) // 2],
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))),
            f"Well, {a} or maybe {a[::-1]}",
            t.prompt,
            "x" * 5000,
        ]
        for c in candidates:
            s = T.gold_score(t, c)
            assert 0.0 <= s <= 1.0
            if s == 1.0:  # only the exact answer reaches 1; everything else stays at or below 0.7
                assert c.strip().lower() == a.lower()
            else:
                assert s <= 0.7


def test_make_tasks_deterministic_and_covering() -> None:
    a = T.make_tasks("train", 500, seed=11)
    assert a == T.make_tasks("train", 500, seed=11)
    assert a != T.make_tasks("train", 500, seed=12)
    assert T.make_tasks("train", 100, seed=11) == a[:100]  # prefix-stable
    assert set(t.family for t in a[: len(T.FAMILIES)]) == set(T.FAMILIES)  # round-robin
    counts = Counter(t.family for t in a)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all(re.fullmatch(r"[a-z_]+-[0-9a-f]{10}", t.id) and t.id.startswith(t.family) for t in a)
    assert [t.family for t in T.make_tasks("heldout", 6, families=["add", "plural"])] == ["add", "plural"] * 3


def test_make_tasks_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        T.make_tasks("test", 10)
    with pytest.raises(ValueError):
        T.make_tasks("train", 10, families=["add", "multiply"])
    with pytest.raises(ValueError):
        T.make_tasks("heldout", 10**6, families=["spell_word"])  # more than the family can supply


def test_large_train_and_heldout_are_distinct_and_disjoint() -> None:
    t0 = time.perf_counter()
    train = T.make_tasks("train", 20000, seed=0)
    heldout = T.make_tasks("heldout", 2000, seed=0)
    assert time.perf_counter() - t0 < 5.0
    assert len({t.prompt for t in train}) == 20000 and len({t.id for t in train}) == 20000
    assert len({t.prompt for t in heldout}) == 2000
    assert set(Counter(t.family for t in heldout)) == set(T.FAMILIES)
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    # By instance: the same word / numbers / sentence / items never crosses splits within a family,
    # whatever the seed of the train draw.
    other_seed = T.make_tasks("train", 2000, seed=99)
    held_keys = {T.instance_key(t) for t in heldout}
    assert not held_keys & {T.instance_key(t) for t in train[::7] + other_seed}
    assert all(T.split_of(t) == "heldout" for t in heldout[:300])
    assert all(T.split_of(t) == "train" for t in train[:300])
    # Short answers for a tiny policy.
    assert max(len(t.answer) for t in train) <= 60


def test_commutative_instances_share_a_split() -> None:
    assert T.split_of("What is 12 plus 7?") == T.split_of("Add 7 and 12.")
    assert T.instance_key("Put 3, 1, 2 in increasing order.") == T.instance_key("Put 2, 3, 1 in increasing order.")


def test_heldout_plurals_never_shown_in_training_data() -> None:
    held = T.make_tasks("heldout", 280, families=["plural"])
    # "sheep" -> "sheep": a plural spelled like its singular cannot be hidden.
    held_plurals = {t.answer for t in held if f"'{t.answer}'" not in t.prompt}
    assert len(held_plurals) > 40
    shown = T.make_tasks("train", 1500, families=["list_items", "first_word", "last_word"])
    words = {w for t in shown for w in re.findall(r"[a-z]+", t.prompt)}
    words |= {w for s in T.pretraining_text(2000) for w in re.findall(r"[a-z]+", s.lower())}
    assert not held_plurals & words


def test_no_template_word_is_a_noun_plural() -> None:
    plurals = {T.plural_of(n) for n in T._NOUNS} - set(T._NOUNS)
    template_words = {w for f in T._FAMILY_LIST for t in f.templates for w in re.findall(r"[a-z]+", t.lower())}
    assert not plurals & template_words


def test_parse_task_round_trips() -> None:
    sample = T.make_tasks("train", 3000, seed=5) + T.make_tasks("heldout", 1000, seed=5)
    for t in sample:
        assert T.parse_task(t.prompt) == t
        assert T.parse_task(f"  {t.prompt}\n") == t
        assert len(T._all_matches(t.prompt)) == 1  # phrasings never collide
        assert T.gold_score(t.prompt, t.answer) == 1.0


def test_demonstrate_error_rate() -> None:
    tasks = T.make_tasks("train", 2000, seed=2)
    rng = random.Random(0)
    scores = [T.gold_score(t, T.demonstrate(t, rng, error_rate=0.2)) for t in tasks]
    assert abs(sum(s == 1.0 for s in scores) / len(scores) - 0.8) <= 0.03
    imperfect = [s for s in scores if s < 1.0]
    assert any(s < 0.5 for s in imperfect) and any(s >= 0.5 for s in imperfect)  # wrong and chatty both occur
    rng0 = random.Random(0)
    assert all(T.gold_score(t, T.demonstrate(t, rng0, error_rate=0.0)) == 1.0 for t in tasks[:500])
    rng1 = random.Random(0)
    assert all(T.gold_score(t, T.demonstrate(t, rng1, error_rate=1.0)) < 1.0 for t in tasks[:500])


def test_demonstrate_chatty_rate() -> None:
    """Right answers wrapped in filler at `chatty_rate`: still the right content (0.55-0.65), never exact."""
    tasks = T.make_tasks("train", 2000, seed=3)
    rng = random.Random(0)
    scores = [T.gold_score(t, T.demonstrate(t, rng, error_rate=0.0, chatty_rate=0.5)) for t in tasks]
    chatty = [s for s in scores if s < 1.0]
    assert abs(len(chatty) / len(scores) - 0.5) <= 0.04
    assert all(0.55 <= s <= 0.65 for s in chatty)
    # chatty_rate = 0 draws nothing extra from the rng: the default demonstrations are unchanged
    a = [T.demonstrate(t, random.Random(i), 0.3) for i, t in enumerate(tasks[:300])]
    b = [T.demonstrate(t, random.Random(i), 0.3, chatty_rate=0.0) for i, t in enumerate(tasks[:300])]
    assert a == b


def test_demonstrate_is_deterministic() -> None:
    tasks = T.make_tasks("train", 200, seed=4)
    a = [T.demonstrate(t, random.Random(i), 0.5) for i, t in enumerate(tasks)]
    b = [T.demonstrate(t, random.Random(i), 0.5) for i, t in enumerate(tasks)]
    assert a == b


def test_pretraining_text() -> None:
    text = T.pretraining_text(3000, seed=0)
    assert text == T.pretraining_text(3000, seed=0) and text != T.pretraining_text(3000, seed=1)
    assert len(text) == 3000 and all(s.strip() for s in text)
    assert len(set(text)) > 2000
    assert all(T.parse_task(s) is None for s in text)  # no prompts
    blob = "\n".join(text)
    heldout = T.make_tasks("heldout", 2000)
    assert not any(t.prompt in blob for t in heldout)
    # Held-out arithmetic facts are absent too, in digits and in words.
    train_facts = set(re.findall(r"\b(\d+) plus (\d+) makes", blob))
    words = {T.number_words(i): str(i) for i in range(100)}
    train_facts |= {(words[a], words[b]) for a, b in re.findall(r"\b([a-z-]+) plus ([a-z-]+) makes", blob.lower())}
    held_facts = set()
    for t in heldout:
        if t.family == "add":
            a, b = re.findall(r"\d+", t.prompt)
            held_facts |= {(a, b), (b, a)}
    assert len(train_facts) > 50 and held_facts and not held_facts & train_facts
