"""``instructgpt data mix``: a data set drawn from several sources in proportion to their weights.

Each source gets a quota, its share of the target size: ``size * w_i / sum(w)``, rounded by largest remainder so the
quotas add up to the size exactly (ties to the earlier source). A source gives its quota without repeating a row when it
has that many (a seeded sample, in the source's order); asked for more, it gives every row ``quota // rows`` times and
a sample of the rest once (``repeat: false`` refuses instead). The mix is then shuffled with the same seed, and every
row says where it came from: ``"provenance": {"source": NAME, "file": ..., "line": ...}``, which the stages' readers
pass over.
"""

from __future__ import annotations

import math
import random
from typing import Mapping

from instructgpt.config import ConfigError
from instructgpt.dataprep.configs import MixConfig
from instructgpt.dataprep.rows import Item, check_output, read_source, report_header, to_json


def quotas(sizes: Mapping[str, int], weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Rows per source: `total` split in proportion to `weights` by largest remainder (exactly `total` in all)."""
    w_sum = sum(weights[n] for n in sizes)
    exact = {n: total * weights[n] / w_sum for n in sizes}
    out = {n: math.floor(x) for n, x in exact.items()}
    order = sorted(sizes, key=lambda n: -(exact[n] - out[n]))  # stable: the earlier source first among equals
    for n in order[:total - sum(out.values())]:
        out[n] += 1
    return out


def largest_unrepeated_size(sizes: Mapping[str, int], weights: Mapping[str, float]) -> int:
    """The largest mix in which no source repeats a row at these weights: min over sources of rows / share."""
    w_sum = sum(weights[n] for n in sizes)
    return min(math.floor(sizes[n] * w_sum / weights[n] + 1e-9) for n in sizes if weights[n] > 0)


def sample(n_rows: int, quota: int, rng: random.Random) -> list[int]:
    """Indices of `quota` rows of `n_rows`: every row `quota // n_rows` times, then a sample of the rest once, in
    order."""
    passes, rest = divmod(quota, n_rows)
    return list(range(n_rows)) * passes + sorted(rng.sample(range(n_rows), rest))


def mix(sources: Mapping[str, list[Item]], weights: Mapping[str, float], size: int | None, seed: int,
        repeat: bool = True) -> tuple[list[dict], dict]:
    """The mixed rows, each with its provenance, shuffled; and the report's figures per source."""
    sizes = {name: len(items) for name, items in sources.items()}
    total = size if size is not None else largest_unrepeated_size(sizes, weights)
    quota = quotas(sizes, weights, total)
    rng = random.Random(seed)
    rows, per_source = [], {}
    for name, items in sources.items():
        if quota[name] > sizes[name] and not repeat:
            raise ConfigError(f"sources.{name}: {sizes[name]} rows, {quota[name]} asked for a mix of {total} at weight "
                              f"{weights[name]:g}; lower size or allow repeats (repeat=true)")
        picks = sample(sizes[name], quota[name], rng)
        for i in picks:
            it = items[i]
            rows.append({**to_json(it.record), "provenance": {"source": name, "file": it.file, "line": it.line}})
        per_source[name] = {"rows_available": sizes[name], "weight": weights[name],
                            "share_asked": round(weights[name] / sum(weights[n] for n in sizes), 6),
                            "rows_taken": len(picks), "distinct_rows": len(set(picks)),
                            "share": round(len(picks) / total, 6) if total else 0.0}
    rng.shuffle(rows)
    return rows, {"size": total, "seed": seed, "repeat": repeat, "sources": per_source}


def run_mix(cfg: MixConfig) -> tuple[list[dict], dict]:
    """``instructgpt data mix``: the mixed rows, and the report (per source: rows, weight, share, distinct rows)."""
    check_output(cfg.out, cfg.sources.values())
    reads = {name: read_source(src, cfg.kind, cfg.skip_bad_lines) for name, src in cfg.sources.items()}
    kinds = {r.kind for r in reads.values()}
    if len(kinds) > 1:
        raise ConfigError("sources: one kind of data to mix, got " +
                          ", ".join(f"{n}: {r.kind}" for n, r in reads.items()))
    rows, figures = mix({n: r.items for n, r in reads.items()}, {n: cfg.weight(n) for n in reads}, cfg.size,
                        cfg.seed, cfg.repeat)
    for name, r in reads.items():
        figures["sources"][name].update({"source": r.source, "bad_lines_skipped": len(r.bad)})
    return rows, {**report_header("mix", cfg), "kind": kinds.pop(), **figures}
