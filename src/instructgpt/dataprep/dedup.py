"""Exact and near duplicates: the first row of each group is kept, every later one is a duplicate of it.

Exact: the same content after parsing (a row in Alpaca's schema equals the same row as ``{"prompt", "response"}``).
Near: rows are sets of word n-grams ("shingles": lower-cased runs of word characters, `ngram` at a time); two rows are
near duplicates when the Jaccard similarity of their sets, |A & B| / |A | B|, reaches `threshold`. MinHash (Broder,
1997) estimates it from `num_perm` hashes per row, and locality-sensitive hashing over bands of those hashes (Indyk and
Motwani, 1998; Leskovec et al., *Mining of Massive Datasets*, ch. 3) finds the candidates without comparing every pair,
both from ``datasketch``. A candidate is a duplicate when its MinHash estimate reaches the threshold; it is compared
only with the rows kept so far, so a chain A ~ B ~ C with A and C apart keeps A and C.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

import xxhash
from datasketch import MinHash, MinHashLSH

from instructgpt.config import ConfigError
from instructgpt.dataprep.configs import DedupConfig, NearDuplicateSettings
from instructgpt.dataprep.rows import (Document, Read, Record, content_key, prompt_messages, read_input, report_header,
                                       responses, texts, to_json)

_WORD = re.compile(r"\w+")


@dataclass
class Duplicate:
    """What makes a row a duplicate: the earlier row it repeats (an index into the rows) and how alike they are."""

    of: int
    similarity: float  # 1.0 for an exact duplicate, else the MinHash estimate of the Jaccard similarity
    exact: bool


def compared_text(record: Record, on: str) -> str:
    """The text near duplicates are judged on: the whole row, its prompt (the conversation before the answer) or its
    response(s)."""
    if on == "row":
        return "\n".join(t for _, t in texts(record))
    if on == "prompt":
        return "\n".join(m["content"] for m in prompt_messages(record))
    return "\n".join(responses(record))


def exact_key(record: Record, on: str) -> str:
    if on == "row":
        return content_key(record)
    if on == "prompt":
        return json.dumps(prompt_messages(record), ensure_ascii=False, sort_keys=True)
    return json.dumps(responses(record), ensure_ascii=False)


def check_comparable(record: Record, on: str) -> None:
    """A ConfigError when `on` names a part this kind of record does not have (a prompt's response, a document's
    prompt)."""
    if on == "prompt" and isinstance(record, Document):
        raise ConfigError("on=prompt: pretraining text has no prompt; use on=row")
    if on == "response" and not responses(record):
        raise ConfigError("on=response: prompts have no response; use on=row")


def shingles(text: str, ngram: int) -> set[bytes]:
    """The set of `ngram`-word shingles of `text` (lower-cased word characters); a text of fewer words is one
    shingle, and one with no word character at all is itself."""
    words = _WORD.findall(text.casefold())
    if not words:
        return {text.encode("utf-8")}
    if len(words) <= ngram:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)}


# datasketch's weights of the false positive and false negative probabilities when it splits the hashes into bands.
# Its default, (0.5, 0.5), makes a pair exactly at the threshold a candidate only 40% of the time (0.8, 128 hashes:
# 9 bands of 13); every candidate is checked on its MinHash estimate anyway, so a false positive costs one comparison
# of two signatures and a false negative a duplicate kept: (0.1, 0.9) gives 14 bands of 9, a pair at 0.8 a candidate
# 87% of the time, at 0.85 97%.
LSH_WEIGHTS = (0.1, 0.9)


def lsh_index(threshold: float, num_perm: int) -> MinHashLSH:
    """datasketch's LSH index with the bands it picks for this threshold: the split of the `num_perm` hashes into b
    bands of r rows that minimises the weighted false positive and false negative probabilities (LSH_WEIGHTS). Near 1
    (above about 0.98 at 128 permutations) that can be a single band, which datasketch refuses: two bands of
    num_perm / 2 rows then, the fewest it takes."""
    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, params=(2, num_perm // 2))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of :func:`lsh_index`."""
    lsh = lsh_index(threshold, num_perm)
    return lsh.b, lsh.r


def find_duplicates(records: Sequence[Record], *, exact: bool = True, near: bool = True, threshold: float = 0.8,
                    num_perm: int = 128, ngram: int = 3, on: str = "row", seed: int = 1) -> list[Duplicate | None]:
    """Per record, None when it is kept, else the Duplicate that drops it; in order, the first of each group kept."""
    if records:
        check_comparable(records[0], on)
    found: list[Duplicate | None] = [None] * len(records)
    # 1. exact duplicates: a dictionary from content to the first row that had it
    if exact:
        first: dict[str, int] = {}
        for i, r in enumerate(records):
            j = first.setdefault(exact_key(r, on), i)
            if j != i:
                found[i] = Duplicate(j, 1.0, True)
    if not near:
        return found
    # 2. near duplicates among the rows left: each row's MinHash queries the LSH index of the rows kept so far; a
    # row with no candidate at the threshold joins the index
    lsh = lsh_index(threshold, num_perm)
    # xxHash32 of each shingle (datasketch's default, SHA-1, is 7x slower and no better here: datasketch mixes the hash
    # with MurmurHash3's finalizer before permuting); copied per row, so the permutations are drawn once
    empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)
    kept: dict[int, MinHash] = {}
    for i, r in enumerate(records):
        if found[i] is not None:
            continue
        m = empty.copy()
        m.update_batch(shingles(compared_text(r, on), ngram))
        best, best_sim = -1, -1.0
        for j in lsh.query(m):
            sim = m.jaccard(kept[j])
            if sim > best_sim or (sim == best_sim and j < best):
                best, best_sim = j, sim
        if best >= 0 and best_sim >= threshold:
            found[i] = Duplicate(best, best_sim, False)
        else:
            lsh.insert(i, m)
            kept[i] = m
    return found


def find_in(read: Read, cfg: NearDuplicateSettings, exact: bool = True, near: bool = True) -> list[Duplicate | None]:
    return find_duplicates([it.record for it in read.items], exact=exact, near=near, threshold=cfg.threshold,
                           num_perm=cfg.num_perm, ngram=cfg.ngram, on=cfg.on, seed=cfg.seed)


def settings_report(cfg: NearDuplicateSettings) -> dict:
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    return {"threshold": cfg.threshold, "num_perm": cfg.num_perm, "ngram": cfg.ngram, "on": cfg.on, "seed": cfg.seed,
            "lsh_bands": bands, "lsh_rows_per_band": rows}


def run_dedup(cfg: DedupConfig) -> tuple[list[dict], dict]:
    """``instructgpt data dedup``: the rows kept, and the report (counts, settings, example pairs)."""
    read = read_input(cfg)
    dups = find_in(read, cfg, cfg.exact, cfg.near)

    def example(i: int) -> dict:
        it, d = read.items[i], dups[i]
        return {"file": it.file, "line": it.line, "exact": d.exact, "similarity": round(d.similarity, 4),
                "duplicate_of": {"file": read.items[d.of].file, "line": read.items[d.of].line}}

    exact = [i for i, d in enumerate(dups) if d is not None and d.exact]
    near = [i for i, d in enumerate(dups) if d is not None and not d.exact]
    kept = [it for it, d in zip(read.items, dups) if d is None]
    report = {**report_header("dedup", cfg, read), "exact": cfg.exact, "near": cfg.near,
              "near_duplicates": settings_report(cfg), "kept": len(kept), "dropped": len(exact) + len(near),
              "dropped_exact": len(exact), "dropped_near": len(near),
              "examples": {"exact": [example(i) for i in exact[:cfg.examples]],
                           "near": [example(i) for i in near[:cfg.examples]]}}
    return [to_json(it.record) for it in kept], report
