"""`instructgpt data dedup` on 100,000 demonstrations: seconds, rows kept and dropped, and how many injected duplicates
were found. Writes benchmarks/dedup_results.json.

    .venv/bin/python benchmarks/dedup.py     # builds benchmarks/work/dedup_100k.jsonl once, then times the command

The rows: 70,000 distinct built-in demonstrations (``builtin:task-demos?n=70000``), and 30,000 copies of random ones
among them, shuffled in:
- 15,000 exact duplicates, half written in Alpaca's schema ({"instruction", "output"}): the same content;
- 5,000 with case, spacing and final punctuation changed (the same words: word n-gram Jaccard 1);
- 5,000 with one word of the response replaced by another (Jaccard about 0.8, around the threshold);
- 5,000 with a sentence appended to the response.

The command runs as a user runs it, in a fresh process (`python -m instructgpt.cli data dedup ...`): its wall time
includes starting Python, importing the package, reading and parsing the file, and writing the output and the report;
the report's own `seconds` are reading, parsing and deduplicating. A copy counts as found when it and the row it was
copied from are not both in the output (whichever came first is kept).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

from instructgpt.dataprep.dedup import shingles

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
INPUT = os.path.join(WORK, "dedup_100k.jsonl")
OUT = os.path.join(WORK, "dedup_100k.out.jsonl")
RESULTS = os.path.join(HERE, "dedup_results.json")
ORIGINALS, EXACT, EACH_NEAR = 70_000, 15_000, 5_000
FILLERS = ("apple", "river", "yellow", "quietly", "seven", "garden", "window", "stone")


def spacing_and_case(text: str, rng: random.Random) -> str:
    text = text.upper() if rng.random() < 0.5 else text.lower()
    text = text.replace(" ", "  ", 2)
    return text[:-1] if text[-1:] in ".!?" else text + "."


def one_word_replaced(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    words[rng.randrange(len(words))] = rng.choice(FILLERS)
    return " ".join(words)


def sentence_appended(text: str, rng: random.Random) -> str:
    return text + rng.choice([" Let me know if you need more.", " I hope that is useful.", " Have a nice day."])


def build() -> dict:
    """Writes INPUT; returns the copies as (kind, original index, copy content) for the check afterwards."""
    from instructgpt import builtin

    rng = random.Random(0)
    originals = list(builtin.rows(f"builtin:task-demos?n={ORIGINALS}&seed=0"))
    rows = [("original", i, r) for i, r in enumerate(originals)]
    for _ in range(EXACT):
        i = rng.randrange(ORIGINALS)
        r = originals[i]
        rows.append(("exact", i, r if rng.random() < 0.5 else {"instruction": r["prompt"], "output": r["response"]}))
    for kind, change in (("spacing_and_case", spacing_and_case), ("one_word_replaced", one_word_replaced),
                         ("sentence_appended", sentence_appended)):
        for _ in range(EACH_NEAR):
            i = rng.randrange(ORIGINALS)
            rows.append((kind, i, {"prompt": originals[i]["prompt"],
                                   "response": change(originals[i]["response"], rng)}))
    rng.shuffle(rows)
    os.makedirs(WORK, exist_ok=True)
    with open(INPUT + ".tmp", "w", encoding="utf-8") as fh:
        for _, _, r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(INPUT + ".tmp", INPUT)
    meta = {"originals": originals, "copies": [(k, i, r) for k, i, r in rows if k != "original"]}
    with open(INPUT + ".meta.json", "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    return meta


def key(row: dict) -> str:
    if "instruction" in row:
        row = {"prompt": row["instruction"], "response": row["output"]}
    return json.dumps(row, ensure_ascii=False, sort_keys=True)


def main() -> int:
    if os.path.exists(INPUT) and os.path.exists(INPUT + ".meta.json"):
        with open(INPUT + ".meta.json", encoding="utf-8") as fh:
            meta = json.load(fh)
    else:
        t0 = time.time()
        meta = build()
        print(f"built {INPUT} in {time.time() - t0:.0f}s", file=sys.stderr)
    cmd = [sys.executable, "-m", "instructgpt.cli", "data", "dedup", "--input", INPUT, "--out", OUT]
    load_before = os.getloadavg()[0]  # other processes' load: the figure is for a shared machine as it was
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    with open(OUT.replace(".jsonl", ".report.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    with open(OUT, encoding="utf-8") as fh:
        kept = {key(json.loads(line)) for line in fh}
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    found: dict[str, list[int]] = {}
    by_similarity = {"at_or_above_threshold": [0, 0], "below_threshold": [0, 0]}
    threshold = report["near_duplicates"]["threshold"]
    for kind, i, row in meta["copies"]:
        both = key(meta["originals"][i]) in kept and key(row) in kept and key(row) != key(meta["originals"][i])
        found.setdefault(kind, [0, 0])
        found[kind][0] += not both
        found[kind][1] += 1
        if kind != "exact":  # the near copies by their true Jaccard similarity to the original
            a, b = (shingles(f"{r['prompt']}\n{r['response']}", 3) for r in (meta["originals"][i], row))
            side = by_similarity["at_or_above_threshold" if len(a & b) / len(a | b) >= threshold else "below_threshold"]
            side[0] += not both
            side[1] += 1
    near_copies: dict[int, list[str]] = {}
    for kind, i, row in meta["copies"]:
        if kind != "exact":
            near_copies.setdefault(i, []).append(key(row))
    # originals dropped though none of their copies was kept: near duplicates of other originals (the built-in
    # demonstrations come from templates, and some are that alike)
    originals_dropped = sum(key(r) not in kept and not any(c in kept for c in near_copies.get(i, ()))
                            for i, r in enumerate(meta["originals"]))
    results = {
        "command": " ".join(["instructgpt", "data", "dedup", "--input", "benchmarks/work/dedup_100k.jsonl",
                             "--out", "benchmarks/work/dedup_100k.out.jsonl"]),
        "rows": report["rows_in"], "seconds_wall": round(wall, 2), "seconds_dedup": report["seconds"],
        "kept": report["kept"], "dropped": report["dropped"], "dropped_exact": report["dropped_exact"],
        "dropped_near": report["dropped_near"], "near_duplicates": report["near_duplicates"],
        "copies_found": {k: {"found": f, "of": n, "rate": round(f / n, 4)} for k, (f, n) in found.items()},
        # the near copies by their exact Jaccard similarity (word 3-gram sets) to the row they copy: what MinHash-LSH
        # should find (at or above the threshold) and what it should keep (below)
        "near_copies_found_by_true_similarity": {k: {"found": f, "of": n, "rate": round(f / n, 4) if n else None}
                                                 for k, (f, n) in by_similarity.items()},
        "peak_rss_mb": round(peak_rss_mb, 1),
        "originals_dropped_as_near_duplicates_of_originals": originals_dropped,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "datasketch": importlib.metadata.version("datasketch"),
                    "load_average_1min_before": round(load_before, 2)},
        "target_seconds": 60, "met": wall < 60,
    }
    with open(RESULTS, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
