"""Program-checkable instruction tasks, the hidden gold labeler, and a simulated (imperfect) demonstrator.

Every task is a short natural-language instruction whose correct answer a program can compute, so a
"gold labeler" can score any response. Later stages use `gold_score` only to simulate human labelers
(rankings, demonstrations) and to judge; training never sees it directly.

Splits are fixed by a stable hash of (family, instance), independent of the seed, so train tasks drawn
with any seed never share an instance (word, numbers, sentence, items) with held-out tasks of the same
family. Nouns whose plural is held out are also kept out of every other family and of `pretraining_text`,
so held-out plurals are unseen anywhere in training data.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import re
import string
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Sequence

__all__ = [
    "FAMILIES",
    "HELDOUT_FRACTION",
    "Task",
    "make_tasks",
    "parse_task",
    "gold_score",
    "RIGHT_CONTENT",
    "demonstrate",
    "pretraining_text",
    "instance_key",
    "split_of",
    "plural_of",
    "number_words",
    "NOUNS",
    "ADJECTIVES",
    "VERBS",
    "PLURAL_SAFE_NOUNS",
    "stable_hash",
]

HELDOUT_FRACTION = 0.2

# --------------------------------------------------------------------------------------------- word data
# Common concrete nouns (3-8 letters). Plurals follow `_regular_plural` unless listed in _IRREGULAR.
# No noun whose plural is a word of the prompt templates or pretraining text ("letters", "caps"), so a
# held-out plural is never shown by accident.
_NOUNS: tuple[str, ...] = tuple(
    """
    ant apple apron arm arrow axe baby badge bag ball banana bank barn basket bat beach bean bear bed bee
    bell belt bench berry bike bird blanket boat body bone book boot bottle bowl box boy brain branch bread
    brick bridge brush bubble bucket bus bush button cabin cake calf camera candle car card carrot cart
    castle cat chain chair cheese cherry chicken child church circle city class cliff clock cloud coat coin
    comb cookie corn cousin cow crab crayon crown cup curtain daisy deer desk diamond dish doctor dog doll
    donkey door dragon dream dress drum duck eagle egg engine eye face fairy farm farmer feather fence field
    finger fish flag flower flute foot forest fork fox friend frog garden gate ghost gift girl glass globe
    glove goat goose grape guitar hammer hand hat heart helmet hen hero hill hole horn horse hotel house
    insect island jacket jar jewel jug kettle key king kite kitten knife koala ladder lady lake lamb lamp
    leaf lemon lily lion lizard loaf lock magnet man map market match melon mirror mitten monkey moon
    moose mop mouse mouth mug nail needle nest night nose nurse nut ocean onion orange oven owl page pan
    panda paper park parrot party peach pear pearl pen pencil penny pepper person piano picnic pie pig
    pillow pilot pipe pirate pizza planet plant plate plum pocket pond pot potato prince pumpkin puppy
    puzzle queen rabbit radio raft rat ring river road robot rock rocket roof room rope rose ruler sack
    saddle sailor salad sandal saw scarf school sea seal seed shadow shark sheep sheet shelf shell ship shirt
    shoe shop shovel singer sink sister skirt sled slide snack snail snake sock sofa song spade spider spoon
    square stamp star statue stick stone stove story street sun swan sword table tail taxi teacher tent
    thief tiger toe tomato tongue tooth torch towel tower town toy tractor train tray tree truck trumpet
    tulip tunnel turtle uncle vase violin wagon wall wallet wand watch web whale wheel wife window wing
    witch wolf woman word worm yard zebra
    """.split()
)
_IRREGULAR: Mapping[str, str] = MappingProxyType(
    {
        "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese", "mouse": "mice",
        "man": "men", "woman": "women", "person": "people", "sheep": "sheep", "fish": "fish",
        "deer": "deer", "moose": "moose", "knife": "knives", "leaf": "leaves", "wolf": "wolves",
        "loaf": "loaves", "wife": "wives", "shelf": "shelves", "thief": "thieves", "scarf": "scarves",
        "calf": "calves", "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes",
    }
)
_ADJECTIVES: tuple[str, ...] = tuple(
    """
    big small red blue green old new happy sad hot cold tall short fast slow young soft hard dark bright
    quiet loud warm brave tiny huge clean dirty funny lazy busy sweet sour round heavy light rich poor wild
    kind pink brown black white yellow
    """.split()
)
# Base-form verbs: sentences use plural subjects ("small dogs like apples").
_VERBS: tuple[str, ...] = tuple(
    """
    like want need find help watch love follow chase carry draw visit count catch hide move push pull hold
    paint wash keep bring hear meet miss know share buy
    """.split()
)
_END_ADVERBS: tuple[str, ...] = ("today", "again", "daily", "outside", "together", "slowly")
_START_ADVERBS: tuple[str, ...] = ("often", "sometimes", "usually", "never", "rarely")

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999, e.g. 42 -> 'forty-two'."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + (" and " + number_words(rest) if rest else "")


_WORD_TO_NUM: Mapping[str, int] = MappingProxyType({number_words(i): i for i in range(100)})


def _regular_plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def plural_of(noun: str) -> str:
    """Plural of a noun from the built-in list (irregulars included)."""
    return _IRREGULAR.get(noun) or _regular_plural(noun)


# Words for letter-level tasks: short ones (byte-level BPE makes letters hard), no palindromes
# (reversing those is a no-op, which would teach "copy the word").
_ALL_WORDS: tuple[str, ...] = tuple(sorted(set(_NOUNS) | set(_ADJECTIVES) | set(_VERBS)))
_SHORT_WORDS: tuple[str, ...] = tuple(w for w in _ALL_WORDS if 3 <= len(w) <= 6 and w != w[::-1])


# ---------------------------------------------------------------------------------------------- hashing
def stable_hash(text: str) -> int:
    """A seed- and process-independent 64-bit hash (Python's hash() is salted per process): splits and streams."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _split_for(family: str, key: str) -> str:
    # Seed-independent on purpose: train drawn with any seed stays disjoint from held-out.
    return "heldout" if stable_hash(f"split|{family}|{key}") % 10_000 < HELDOUT_FRACTION * 10_000 else "train"


# Nouns whose plural is held out: no other family (nor pretraining text) shows their plural form.
_PLURAL_SAFE_NOUNS: tuple[str, ...] = tuple(n for n in _NOUNS if _split_for("plural", n) == "train")

# The words of the base model's task-domain pretraining sentences, for the other built-in suite to write with
NOUNS, ADJECTIVES, VERBS, PLURAL_SAFE_NOUNS = _NOUNS, _ADJECTIVES, _VERBS, _PLURAL_SAFE_NOUNS

# ------------------------------------------------------------------------------------------- families
Params = Mapping[str, object]

_FIELD_RE: Mapping[str, str] = MappingProxyType(
    {
        "word": r"[a-z]{1,20}",
        "phrase": r"[a-z]{1,20}(?: [a-z]{1,20})?",
        "letter": r"[a-z]",
        "a": r"\d{1,4}",
        "b": r"\d{1,4}",
        "n": r"[2-9]",
        "n_word": r"two|three|four|five|six|seven|eight|nine",
        "nums": r"\d{1,4}(?:, \d{1,4}){1,9}",
        "nums_and": r"\d{1,4}(?:, \d{1,4}){0,8} and \d{1,4}",
        "items": r"[a-z]{1,20}(?:, [a-z]{1,20}){1,9}",
        "items_and": r"[a-z]{1,20}(?:, [a-z]{1,20}){0,8} and [a-z]{1,20}",
        "sentence": r"[a-z]{1,20}(?: [a-z]{1,20}){1,11}",
    }
)


@dataclass(frozen=True)
class _Family:
    name: str
    templates: tuple[str, ...]
    kind: str  # scoring kind: int | numlist | word | spell | repeat | lines
    answer: Callable[[Params, int], str]  # (params, template index) -> canonical answer
    key: Callable[[Params], str]  # instance identity; decides the split
    valid: Callable[[Params], bool] = lambda p: True
    sample: Callable[[random.Random], Params] | None = None  # large instance spaces
    pool: Callable[[], list[Params]] | None = None  # small ones, enumerated exactly
    case_sensitive: bool = False
    allowed_numbers: Callable[[Params], frozenset[int]] = lambda p: frozenset()
    forbidden_words: Callable[[Params], frozenset[str]] = lambda p: frozenset()


def _sample_distinct_nums(rng: random.Random) -> Params:
    return {"nums": tuple(rng.sample(range(100), rng.choice((3, 4, 5))))}


def _sample_sentence(rng: random.Random) -> Params:
    def pl() -> str:
        return plural_of(rng.choice(_PLURAL_SAFE_NOUNS))

    adj, verb = rng.choice(_ADJECTIVES), rng.choice(_VERBS)
    shape = rng.randrange(6)
    if shape == 0:
        s = f"{pl()} {verb} {pl()}"
    elif shape == 1:
        s = f"{adj} {pl()} {verb} {pl()}"
    elif shape == 2:
        s = f"{pl()} {verb} {adj} {pl()}"
    elif shape == 3:
        s = f"{adj} {pl()} {verb} {rng.choice(_ADJECTIVES)} {pl()}"
    elif shape == 4:
        s = f"{pl()} {verb} {pl()} {rng.choice(_END_ADVERBS)}"
    else:
        s = f"{rng.choice(_START_ADVERBS)} {pl()} {verb} {pl()}"
    return {"sentence": s}


def _sample_items(rng: random.Random) -> Params:
    nouns = rng.sample(_PLURAL_SAFE_NOUNS, rng.choice((3, 4)))
    return {"items": tuple(plural_of(n) for n in nouns)}


def _sample_phrase(rng: random.Random) -> Params:
    if rng.random() < 0.3:
        return {"phrase": rng.choice(_ALL_WORDS)}
    return {"phrase": f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"}


def _sample_sub(rng: random.Random) -> Params:
    a = rng.randrange(100)
    return {"a": a, "b": rng.randrange(a + 1)}


def _absent_letter(word: str) -> str:
    # A deterministic letter not in the word, so "0" answers exist without growing the pool much.
    missing = [c for c in string.ascii_lowercase if c not in word]
    return missing[stable_hash("absent|" + word) % len(missing)]


def _count_pool() -> list[Params]:
    out: list[Params] = []
    for w in _ALL_WORDS:
        for c in sorted(set(w)) + [_absent_letter(w)]:
            out.append({"word": w, "letter": c})
    return out


def _repeat_pool() -> list[Params]:
    return [{"word": w, "n": n} for w in _ALL_WORDS for n in (2, 3, 4)]


def _dashes(items: Sequence[str]) -> str:
    return "\n".join(f"- {x}" for x in items)


def _numbered(items: Sequence[str]) -> str:
    return "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))


def _nums_ok(p: Params) -> bool:
    return 2 <= len(p["nums"]) <= 10  # type: ignore[arg-type]


def _words_of(p: Params) -> list[str]:
    return str(p["sentence"]).split()


_LIST_DASH_TEMPLATES = 3  # list_items templates [0, 3) ask for dashes, the rest for numbers

_FAMILY_LIST: tuple[_Family, ...] = (
    _Family(
        "reverse_word",
        (
            "Reverse the word '{word}'.",
            "Write '{word}' backwards.",
            "What is '{word}' written backwards?",
            "Write the letters of '{word}' in reverse order.",
        ),
        "word",
        answer=lambda p, t: str(p["word"])[::-1],
        key=lambda p: str(p["word"]),
        pool=lambda: [{"word": w} for w in _SHORT_WORDS],
    ),
    _Family(
        "spell_word",
        (
            "Spell '{word}' with dashes between the letters.",
            "Spell out the word '{word}', putting a dash between each letter.",
            "Write the letters of '{word}' separated by dashes.",
        ),
        "spell",
        answer=lambda p, t: "-".join(str(p["word"])),
        key=lambda p: str(p["word"]),
        pool=lambda: [{"word": w} for w in _SHORT_WORDS],
    ),
    _Family(
        "sort_numbers",
        (
            "Sort these numbers from smallest to largest: {nums}.",
            "Put {nums} in increasing order.",
            "Arrange {nums_and} in ascending order.",
            "List the numbers {nums} from lowest to highest.",
        ),
        "numlist",
        answer=lambda p, t: ", ".join(str(x) for x in sorted(p["nums"])),  # type: ignore[call-overload]
        key=lambda p: ",".join(str(x) for x in sorted(p["nums"])),  # type: ignore[call-overload]
        valid=_nums_ok,
        sample=_sample_distinct_nums,
    ),
    _Family(
        "add",
        (
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "Compute {a} + {b}.",
            "What is the sum of {a} and {b}?",
        ),
        "int",
        answer=lambda p, t: str(int(p["a"]) + int(p["b"])),  # type: ignore[call-overload]
        # Commutative: 12+7 and 7+12 are one instance, so both land in the same split.
        key=lambda p: ",".join(str(x) for x in sorted((p["a"], p["b"]))),  # type: ignore[type-var]
        sample=lambda rng: {"a": rng.randrange(100), "b": rng.randrange(100)},
        allowed_numbers=lambda p: frozenset((int(p["a"]), int(p["b"]))),  # type: ignore[call-overload]
    ),
    _Family(
        "subtract",
        (
            "What is {a} minus {b}?",
            "Subtract {b} from {a}.",
            "Compute {a} - {b}.",
            "What do you get if you take {b} away from {a}?",
        ),
        "int",
        answer=lambda p, t: str(int(p["a"]) - int(p["b"])),  # type: ignore[call-overload]
        key=lambda p: f"{p['a']},{p['b']}",
        sample=_sample_sub,
        allowed_numbers=lambda p: frozenset((int(p["a"]), int(p["b"]))),  # type: ignore[call-overload]
    ),
    _Family(
        "count_letter",
        (
            "How many times does the letter '{letter}' appear in '{word}'?",
            "Count how many times '{letter}' occurs in the word '{word}'.",
            "In the word '{word}', how many letters are '{letter}'?",
        ),
        "int",
        answer=lambda p, t: str(str(p["word"]).count(str(p["letter"]))),
        key=lambda p: str(p["word"]),  # by word: a word never appears in both splits
        pool=_count_pool,
    ),
    _Family(
        "uppercase",
        (
            "Write '{phrase}' in capital letters.",
            "Convert '{phrase}' to uppercase.",
            "Rewrite '{phrase}' in all caps.",
        ),
        "word",
        answer=lambda p, t: str(p["phrase"]).upper(),
        key=lambda p: str(p["phrase"]),
        sample=_sample_phrase,
        case_sensitive=True,
    ),
    _Family(
        "repeat_word",
        (
            "Repeat the word '{word}' {n} times, separated by spaces.",
            "Write '{word}' {n_word} times with a space between each.",
            "Say '{word}' {n} times in a row, separated by spaces.",
        ),
        "repeat",
        answer=lambda p, t: " ".join([str(p["word"])] * int(p["n"])),  # type: ignore[call-overload]
        key=lambda p: str(p["word"]),
        pool=_repeat_pool,
    ),
    _Family(
        "largest",
        (
            "Which number is the largest: {nums}?",
            "What is the biggest number in {nums_and}?",
            "Pick the largest of these numbers: {nums}.",
            "Find the maximum of {nums}.",
        ),
        "int",
        answer=lambda p, t: str(max(p["nums"])),  # type: ignore[call-overload]
        key=lambda p: ",".join(str(x) for x in sorted(p["nums"])),  # type: ignore[call-overload]
        valid=_nums_ok,
        sample=_sample_distinct_nums,
    ),
    _Family(
        "plural",
        (
            "What is the plural of '{word}'?",
            "Give the plural form of the noun '{word}'.",
            "Write the plural of '{word}'.",
            "What do you call more than one '{word}'?",
        ),
        "word",
        answer=lambda p, t: plural_of(str(p["word"])),
        key=lambda p: str(p["word"]),
        valid=lambda p: p["word"] in _NOUNS,  # only nouns whose plural we know
        pool=lambda: [{"word": w} for w in _NOUNS],
    ),
    _Family(
        "first_word",
        (
            "What is the first word of the sentence '{sentence}'?",
            "Give the first word in '{sentence}'.",
            "Which word comes first in '{sentence}'?",
        ),
        "word",
        answer=lambda p, t: _words_of(p)[0],
        key=lambda p: str(p["sentence"]),
        sample=_sample_sentence,
        forbidden_words=lambda p: frozenset(_words_of(p)) - {_words_of(p)[0]},
    ),
    _Family(
        "last_word",
        (
            "What is the last word of the sentence '{sentence}'?",
            "Give the last word in '{sentence}'.",
            "Which word comes last in '{sentence}'?",
        ),
        "word",
        answer=lambda p, t: _words_of(p)[-1],
        key=lambda p: str(p["sentence"]),
        sample=_sample_sentence,
        forbidden_words=lambda p: frozenset(_words_of(p)) - {_words_of(p)[-1]},
    ),
    _Family(
        "list_items",
        (
            "Make a bulleted list of these items: {items}.",
            "Write {items_and} as a list, one per line, each starting with a dash.",
            "Format these items as a dash list: {items}.",
            "Make a numbered list of these items: {items}.",
            "Write {items_and} as a numbered list.",
            "Number these items, one per line: {items}.",
        ),
        "lines",
        answer=lambda p, t: (_dashes if t < _LIST_DASH_TEMPLATES else _numbered)(p["items"]),  # type: ignore[arg-type]
        # The instance is the set of items; the list style belongs to the phrasing.
        key=lambda p: ",".join(sorted(p["items"])),  # type: ignore[call-overload]
        valid=lambda p: 2 <= len(p["items"]) <= 10,  # type: ignore[arg-type]
        sample=_sample_items,
    ),
)

_BY_NAME: Mapping[str, _Family] = MappingProxyType({f.name: f for f in _FAMILY_LIST})
FAMILIES: tuple[str, ...] = tuple(f.name for f in _FAMILY_LIST)


def _template_regex(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>{_FIELD_RE[field]})")
    return re.compile("".join(parts))


_PATTERNS: tuple[tuple[_Family, int, re.Pattern[str]], ...] = tuple(
    (f, i, _template_regex(t)) for f in _FAMILY_LIST for i, t in enumerate(f.templates)
)


def _and_join(xs: Sequence[str]) -> str:
    return ", ".join(xs[:-1]) + " and " + xs[-1]


def _render(fam: _Family, p: Params, t: int) -> str:
    fields: dict[str, str] = {}
    for k, v in p.items():
        if k in ("nums", "items"):
            xs = [str(x) for x in v]  # type: ignore[attr-defined]
            fields[k], fields[k + "_and"] = ", ".join(xs), _and_join(xs)
        elif k == "n":
            fields["n"], fields["n_word"] = str(v), number_words(int(v))  # type: ignore[call-overload]
        else:
            fields[k] = str(v)
    return fam.templates[t].format(**fields)


def _decode(groups: Mapping[str, str]) -> dict[str, object]:
    p: dict[str, object] = {}
    for name, s in groups.items():
        if name in ("a", "b", "n"):
            p[name] = int(s)
        elif name == "n_word":
            p["n"] = _WORD_TO_NUM[s]
        elif name in ("nums", "nums_and"):
            p["nums"] = tuple(int(x) for x in re.split(r", | and ", s))
        elif name in ("items", "items_and"):
            p["items"] = tuple(re.split(r", | and ", s))
        else:
            p[name] = s
    return p


# ------------------------------------------------------------------------------------------ public API
@dataclass(frozen=True)
class Task:
    """One instruction with its canonical, exactly formatted answer."""

    id: str
    family: str
    prompt: str
    answer: str


def _task(fam: _Family, p: Params, t: int, prompt: str) -> Task:
    tid = hashlib.sha256(f"{fam.name}\x1f{prompt}".encode("utf-8")).hexdigest()[:10]
    return Task(id=f"{fam.name}-{tid}", family=fam.name, prompt=prompt, answer=fam.answer(p, t))


def _parse(prompt: str) -> tuple[_Family, Params, int] | None:
    text = prompt.strip()
    for fam, t, rx in _PATTERNS:
        m = rx.fullmatch(text)
        if m is not None:
            p = _decode(m.groupdict())
            if fam.valid(p):
                return fam, p, t
    return None


def _all_matches(prompt: str) -> list[tuple[str, int]]:
    """(family, template index) of every template matching `prompt`; used to test for collisions."""
    return [(f.name, t) for f, t, rx in _PATTERNS if rx.fullmatch(prompt.strip())]


def parse_task(prompt: str) -> Task | None:
    """Recover the Task from its prompt text (surrounding whitespace tolerated); None if not in the suite."""
    parsed = _parse(prompt)
    if parsed is None:
        return None
    fam, p, t = parsed
    return _task(fam, p, t, prompt.strip())


def instance_key(task: Task | str) -> str:
    """'family|instance' identity of a task (phrasing excluded); the unit the train/held-out split is made on."""
    parsed = _parse(task.prompt if isinstance(task, Task) else task)
    if parsed is None:
        raise ValueError("not a task of the suite")
    fam, p, _ = parsed
    return f"{fam.name}|{fam.key(p)}"


def split_of(task: Task | str) -> str:
    """'train' or 'heldout': the split a task's instance belongs to (fixed, seed-independent)."""
    fam_name, key = instance_key(task).split("|", 1)
    return _split_for(fam_name, key)


def _family_stream(fam: _Family, split: str, seed: int) -> Iterator[Task]:
    rng = random.Random(stable_hash(f"stream|{seed}|{split}|{fam.name}"))
    if fam.pool is not None:
        cands = [(p, t) for p in fam.pool() if _split_for(fam.name, fam.key(p)) == split
                 for t in range(len(fam.templates))]
        rng.shuffle(cands)
        for p, t in cands:
            yield _task(fam, p, t, _render(fam, p, t))
        return
    assert fam.sample is not None
    seen: set[str] = set()
    misses = 0
    # Huge instance spaces: rejection-sample; many consecutive misses means the split is exhausted.
    while misses < 2000:
        p = fam.sample(rng)
        t = rng.randrange(len(fam.templates))
        if _split_for(fam.name, fam.key(p)) != split:
            misses += 1
            continue
        prompt = _render(fam, p, t)
        if prompt in seen:
            misses += 1
            continue
        seen.add(prompt)
        misses = 0
        yield _task(fam, p, t, prompt)


def make_tasks(split: str, n: int, seed: int = 0, families: Sequence[str] | None = None) -> list[Task]:
    """`n` distinct tasks of `split` ("train" | "heldout"), families interleaved round-robin.

    Deterministic for (split, n, seed, families), and prefix-stable: make_tasks(s, k) == make_tasks(s, n)[:k]
    for k <= n, so disjoint subsets for different stages are slices of one call. A family whose split runs
    out of distinct tasks drops out of the rotation. Raises ValueError for an unknown split/family, or
    when the families cannot supply n distinct tasks.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    if n < 0:
        raise ValueError("n must be >= 0")
    names = list(dict.fromkeys(FAMILIES if families is None else families))
    unknown = [f for f in names if f not in _BY_NAME]
    if unknown or not names:
        raise ValueError(f"unknown families {unknown}; known: {FAMILIES}")
    streams = [_family_stream(_BY_NAME[f], split, seed) for f in names]
    out: list[Task] = []
    while len(out) < n and streams:
        alive = []
        for s in streams:
            if len(out) >= n:
                break
            task = next(s, None)
            if task is not None:
                out.append(task)
                alive.append(s)
        else:
            streams = alive
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {split} tasks available for families {names}")
    return out


# ------------------------------------------------------------------------------------------ gold labeler
_SCORE_FORMAT = 0.7  # right content, slightly wrong format, nothing else
_SCORE_EXTRA = (0.55, 0.1)  # right answer inside extra text: base + span * (answer share of the response)
_PARTIAL_MAX = 0.45  # wrong answers: closeness scaled into [0, 0.45]
# A gold score at or above this is an answer with the right content (exact 1.0, wrong format 0.7, inside extra text
# 0.55-0.65); below it the answer is wrong and the score is partial credit (at most _PARTIAL_MAX)
RIGHT_CONTENT = 0.5
assert _PARTIAL_MAX < RIGHT_CONTENT <= min(_SCORE_EXTRA[0], _SCORE_FORMAT)
_MAX_CHARS = 2000  # bounds the cost of similarity on runaway generations

_NUM_RE = re.compile(r"(?<![A-Za-z0-9])-?\d+(?![0-9])")
_NUM_TOKEN_RE = re.compile(r"-?\d+|[a-z]+(?:-[a-z]+)?")
_MARKER_RE = re.compile(r"^(?:[-*+\u2022]|\d+[.)])\s*")


@dataclass(frozen=True)
class _Ctx:
    fam: _Family
    params: Params
    answer: str


def _loose(s: str) -> str:
    # Forgive wrapping quotes/emphasis and closing punctuation: "'elppa'." -> "elppa".
    s = s.strip()
    for _ in range(3):
        s = s.rstrip(".!").strip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"`*_":
            s = s[1:-1].strip()
    return re.sub(r"[ \t]+", " ", s)


def _eq(a: str, b: str, cs: bool) -> bool:
    return a == b if cs else a.lower() == b.lower()


def _to_int(s: str) -> int | None:
    s = s.strip().lower()
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    return _WORD_TO_NUM.get(s)


def _numbers_in(s: str) -> list[int]:
    out = []
    for tok in _NUM_TOKEN_RE.findall(s.lower()):
        v = _to_int(tok)
        if v is not None:
            out.append(v)
    return out


def _items_of_lines(s: str) -> list[str]:
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    return [_MARKER_RE.sub("", ln).strip().rstrip(".").lower() for ln in lines]


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _relaxed(ctx: _Ctx, r: str) -> bool:
    """Right content in a slightly wrong format, with nothing else added."""
    fam, p, ans = ctx.fam, ctx.params, ctx.answer
    s = _loose(r)
    if not s:
        return False
    if _eq(s, ans, fam.case_sensitive):
        return True
    low = s.lower()
    if fam.kind == "int":
        return _to_int(s) == int(ans)
    if fam.kind == "numlist":
        bare = re.fullmatch(r"[\[(]?\s*-?\d+(?:\s*[,;]?\s*-?\d+)*\s*[\])]?", s)
        return bare is not None and [int(x) for x in _NUM_RE.findall(s)] == sorted(p["nums"])  # type: ignore[call-overload]
    if fam.kind == "spell":
        toks = [x for x in re.split(r"[\s,\-\u2013.;/|]+", low) if x]
        return len(toks) > 1 and all(len(x) == 1 for x in toks) and "".join(toks) == p["word"]
    if fam.kind == "repeat":
        toks = [x for x in re.split(r"[\s,;]+", low) if x]
        return toks == [p["word"]] * int(p["n"])  # type: ignore[call-overload]
    if fam.kind == "lines":
        return len(s.splitlines()) > 1 and _items_of_lines(s) == [x.lower() for x in p["items"]]  # type: ignore[attr-defined]
    return False


def _extra_text(ctx: _Ctx, r: str) -> float | None:
    """Score for the exact answer embedded in extra text, or None if absent or hedged."""
    fam, p, ans = ctx.fam, ctx.params, ctx.answer
    flags = 0 if fam.case_sensitive else re.IGNORECASE
    # Token boundaries; a number must not be the tail of "-5" or the head of "19.5".
    rx = re.compile(r"(?<![A-Za-z0-9-])" + re.escape(ans) + r"(?![A-Za-z0-9]|\.\d)", flags)
    m = rx.search(r)
    if m is None:
        return None
    rest = r[: m.start()] + " " + r[m.end():]
    if rx.search(rest):  # the answer twice is a different (wrong) answer, e.g. one repeat too many
        return None
    # Hedging or copying the input is not "correct with extra text".
    if fam.kind == "int" and not set(_numbers_in(rest)) <= fam.allowed_numbers(p):
        return None
    if fam.kind == "numlist" and re.search(r"\d", rest):
        return None
    if fam.kind == "lines" and any(_MARKER_RE.match(ln.strip()) for ln in rest.splitlines() if ln.strip()):
        return None
    if fam.kind == "repeat" and re.search(rf"\b{re.escape(str(p['word']))}\b", rest, re.IGNORECASE):
        return None
    if set(re.findall(r"[a-z]+", rest.lower())) & fam.forbidden_words(p):
        return None
    base, span = _SCORE_EXTRA
    return base + span * len(ans) / max(len(r), 1)


def _closeness(ctx: _Ctx, r: str) -> float:
    """How close a wrong response is, in [0, 1]."""
    fam, p, ans = ctx.fam, ctx.params, ctx.answer
    s = _loose(r)[:_MAX_CHARS]
    if fam.kind == "int":
        nums = _numbers_in(s)
        if not nums:
            return 0.0
        target = int(ans)
        # Relative scale: off by one matters more for a count of 2 than for a sum of 150.
        return math.exp(-abs(nums[-1] - target) / (1.0 + 0.15 * abs(target)))
    if fam.kind == "numlist":
        got = [int(x) for x in _NUM_RE.findall(s)]
        return difflib.SequenceMatcher(None, got, sorted(p["nums"]), autojunk=False).ratio() if got else 0.0  # type: ignore[call-overload]
    if fam.kind == "spell":
        low = s.lower()
        toks = [x for x in re.split(r"[^a-z]+", low) if x]
        spelled = len(toks) > 1 and all(len(x) == 1 for x in toks)
        return _ratio("".join(toks), str(p["word"])) * (1.0 if spelled else 0.5)
    if fam.case_sensitive:  # half credit for the right letters in the wrong case
        return 0.5 * _ratio(s, ans) + 0.5 * _ratio(s.lower(), ans.lower())
    return _ratio(s.lower(), ans.lower())


def _score(ctx: _Ctx, response: str) -> float:
    r = response.strip()
    if not r:
        return 0.0
    if _eq(r, ctx.answer, ctx.fam.case_sensitive):
        return 1.0
    if _relaxed(ctx, r):
        return _SCORE_FORMAT
    extra = _extra_text(ctx, r)
    if extra is not None:
        return extra
    return _PARTIAL_MAX * min(max(_closeness(ctx, r), 0.0), 1.0)


def _ctx_of(prompt: str | Task) -> _Ctx:
    parsed = _parse(prompt.prompt if isinstance(prompt, Task) else prompt)
    if parsed is None:
        raise ValueError(f"not a task of the suite: {str(prompt)[:80]!r}")
    fam, p, t = parsed
    return _Ctx(fam, p, fam.answer(p, t))


def gold_score(prompt: str | Task, response: str) -> float:
    """Gold labeler, in [0, 1].

    1.0: exact answer in the requested format (surrounding whitespace ok; case matters only for
    `uppercase`). 0.7: right content, slightly wrong format ("19.", "a p p l e", "3 7 12").
    0.55-0.65: right answer plus extra text ("The answer is 19."). Below 0.5: wrong, with partial credit
    up to 0.45 that grows as the response gets closer. Raises ValueError for a prompt outside the suite.
    """
    return _score(_ctx_of(prompt), response)


# ------------------------------------------------------------------------------- simulated demonstrator
_CHATTY = (
    "Sure! {a}",
    "The answer is {a}.",
    "Here you go: {a}",
    "{a}\nHope this helps!",
    "Answer: {a}",
    "OK, {a}",
)
_CHATTY_LINES = ("Sure! Here is the list:\n{a}", "Here you go:\n{a}", "{a}\nHope this helps!")


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word + word
    i = rng.randrange(len(word) - 1)
    op = rng.randrange(3)
    if op == 0:  # dropped letter
        return word[:i] + word[i + 1:]
    if op == 1:  # swapped neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[: i + 1] + word[i] + word[i + 1:]  # doubled letter


def _content_error(ctx: _Ctx, rng: random.Random) -> str:
    fam, p, ans = ctx.fam, ctx.params, ctx.answer
    name = fam.name
    if name in ("add", "subtract"):
        return str(max(0, int(ans) + rng.choice((-10, -2, -1, -1, 1, 1, 2, 10))))
    if name == "count_letter":
        return str(max(0, int(ans) + rng.choice((-1, 1, 1))))
    if name == "largest":
        nums = sorted(p["nums"])  # type: ignore[call-overload]
        return str(rng.choice((nums[-2], nums[0], nums[-1] + 1)))
    if name == "sort_numbers":
        nums = sorted(p["nums"])  # type: ignore[call-overload]
        op = rng.randrange(4)
        if op == 0:
            i = rng.randrange(len(nums) - 1)
            nums[i], nums[i + 1] = nums[i + 1], nums[i]
        elif op == 1:
            del nums[rng.randrange(len(nums))]
        elif op == 2:
            nums.reverse()
        else:
            return " ".join(str(x) for x in nums)
        return ", ".join(str(x) for x in nums)
    if name == "spell_word":
        word = str(p["word"])
        op = rng.randrange(3)
        if op == 0:
            return "-".join(_typo(word, rng))
        if op == 1:
            return " ".join(word)
        return word
    if name == "uppercase":
        phrase = str(p["phrase"])
        return rng.choice((phrase, phrase.capitalize(), _typo(ans, rng)))
    if name == "repeat_word":
        word, n = str(p["word"]), int(p["n"])  # type: ignore[call-overload]
        op = rng.randrange(3)
        if op == 0:
            return " ".join([word] * (n - 1))
        if op == 1:
            return " ".join([word] * (n + 1))
        return ", ".join([word] * n)
    if name == "plural":
        word = str(p["word"])
        return rng.choice((_regular_plural(word), word + "s", word, _typo(ans, rng)))
    if name in ("first_word", "last_word"):
        words = _words_of(p)
        near = words[1] if name == "first_word" else words[-2]
        return rng.choice((near, near, _typo(ans, rng)))
    if name == "list_items":
        items = list(p["items"])  # type: ignore[call-overload]
        op = rng.randrange(4)
        if op == 0:
            del items[rng.randrange(len(items))]
            return _dashes(items) if ans.startswith("-") else _numbered(items)
        if op == 1:
            return "\n".join(f"* {x}" for x in items)
        if op == 2:
            return ", ".join(items)
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
        return _dashes(items) if ans.startswith("-") else _numbered(items)
    # reverse_word
    word = str(p["word"])
    return rng.choice((_typo(ans, rng), _typo(ans, rng), word, word[0] + word[1:][::-1]))


def demonstrate(task: Task, rng: random.Random, error_rate: float = 0.2, chatty_rate: float = 0.0) -> str:
    """Simulated human demonstration: with prob `error_rate` a plausible imperfect answer (typo, off-by-one,
    missing item, chatty words, wrong case...) that scores < 1; otherwise the right answer, wrapped with prob
    `chatty_rate` in chat filler ("Sure! ...", "The answer is ..."), which the gold labeler scores 0.55-0.65.

    `chatty_rate` is the gap between what demonstrators write and what labelers prefer: SFT imitates the filler,
    rankings of SFT samples penalise it (the paper's labelers, too, preferred answers to their own demonstrations).
    """
    ctx = _ctx_of(task)
    chatty = _CHATTY_LINES if ctx.fam.kind == "lines" else _CHATTY
    if rng.random() >= error_rate:
        if chatty_rate > 0 and rng.random() < chatty_rate:
            return rng.choice(chatty).format(a=ctx.answer)
        return ctx.answer
    for _ in range(8):
        if rng.random() < 0.35:
            out = rng.choice(chatty).format(a=ctx.answer)
        else:
            out = _content_error(ctx, rng)
        if out.strip() and _score(ctx, out) < 1.0:
            return out
    return "Sure! " + ctx.answer  # always < 1: extra text


# ------------------------------------------------------------------------------------ pretraining text
def _nums_as(rng: random.Random, *vs: int) -> list[str]:
    # One style per sentence: all digits or all words.
    return [number_words(v) for v in vs] if rng.random() < 0.5 else [str(v) for v in vs]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pt_sentence(rng: random.Random) -> str | None:
    """One domain sentence, or None when it would touch a held-out instance."""
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        if _split_for("add", ",".join(str(x) for x in sorted((a, b)))) != "train":
            return None
        form = rng.choice(("{A} plus {B} makes {C}.", "{A} and {B} add up to {C}.", "If you add {B} to {A}, you get {C}."))
        A, B, C = _nums_as(rng, a, b, a + b)
        return _cap(form.format(A=A, B=B, C=C))
    if kind == 1:
        a = rng.randrange(100)
        b = rng.randrange(a + 1)
        if _split_for("subtract", f"{a},{b}") != "train":
            return None
        form = rng.choice(("{A} minus {B} equals {C}.", "{A} take away {B} is {C}."))
        A, B, C = _nums_as(rng, a, b, a - b)
        return _cap(form.format(A=A, B=B, C=C))
    if kind == 2:
        noun = rng.choice(_PLURAL_SAFE_NOUNS)
        form = rng.choice(("One {s}, two {p}.", "I saw one {s} and then {k} {p}.", "There are {k} {p} near the {o}."))
        return form.format(s=noun, p=plural_of(noun), k=number_words(rng.randrange(2, 13)),
                           o=rng.choice(_NOUNS))
    if kind == 3:
        w = rng.choice(_ALL_WORDS)
        form = rng.choice(("The word {w} has {k} letters.", "The word {w} starts with the letter {c}."))
        return form.format(w=w, k=number_words(len(w)), c=w[0])
    if kind == 4:
        items = _sample_items(rng)["items"]
        if _split_for("list_items", ",".join(sorted(items))) != "train":  # type: ignore[call-overload]
            return None
        form = rng.choice(("We bought {x}.", "The basket had {x} in it.", "On the table were {x}."))
        return form.format(x=_and_join(list(items)))  # type: ignore[call-overload]
    if kind == 5:
        s = str(_sample_sentence(rng)["sentence"])
        if _split_for("first_word", s) != "train" or _split_for("last_word", s) != "train":
            return None
        return _cap(s) + "."
    if kind == 6:
        a, b = rng.sample(range(100), 2)
        hi, lo = max(a, b), min(a, b)
        form = rng.choice(("{H} is bigger than {L}.", "{L} is smaller than {H}.", "{L} comes before {H} when you count up."))
        H, L = _nums_as(rng, hi, lo)
        return _cap(form.format(H=H, L=L))
    if kind == 7:
        phrase = str(_sample_phrase(rng)["phrase"])
        if _split_for("uppercase", phrase) != "train":
            return None
        return rng.choice(("The sign said {u}.", "In big letters it read {u}.")).format(u=phrase.upper())
    if kind == 8:
        w = rng.choice(_ALL_WORDS)
        k = rng.randrange(2, 5)
        return f"The {rng.choice(_NOUNS)} said {w} {number_words(k)} times."
    adj, noun = rng.choice(_ADJECTIVES), rng.choice(_PLURAL_SAFE_NOUNS)
    return f"The {adj} {noun} is next to the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."


def pretraining_text(n: int, seed: int = 0) -> list[str]:
    """`n` short plain-English sentences in the task domain (words, numbers, plurals, lists), for the base
    model's pretraining mix. No instruction/answer pairs, and nothing from held-out instances."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(stable_hash(f"pretrain|{seed}"))
    out: list[str] = []
    while len(out) < n:
        s = _pt_sentence(rng)
        if s is not None:
            out.append(s)
    return out
