"""The run report: ``report.json`` (flat dotted keys, merged across writers), ``report.md`` (tables, the recipe's
expected results where it gives them, sample outputs side by side) and PNG plots (training curves; gold and RM score
against sqrt(KL), the over-optimisation picture of Gao et al. 2023; gold score per task family).

Everything here reads what the stages left on disk (``metrics.jsonl``, ``samples_<policy>.jsonl``) and the report
dict of :func:`instructgpt.evaluate.evaluate`; missing pieces are skipped quietly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from instructgpt.files import read_jsonl
from instructgpt.runs import read_metrics

# --------------------------------------------------------------------------------------------------------------------
# Expected results: a recipe's `expectations`, checked against the report's keys


@dataclass
class Expectation:
    """The report.json value of a key (``key[i]``: element i of a list) is at least `min` and/or at most `max`; each
    bound a number or another report key. A recipe gives them as ``{report key: {min: x}}``."""

    min: Union[float, str, None] = None
    max: Union[float, str, None] = None


def check_expectations(report: dict) -> list[tuple[str, Expectation, Optional[float], str]]:
    """(key, expectation, measured value, "met" | "not met" | "missing") for each of the report's "expectations";
    "missing" where the key (or a bound that names a key) is not a number in the report."""
    out = []
    for key, bounds in (report.get("expectations") or {}).items():
        exp = bounds if isinstance(bounds, Expectation) else Expectation(**bounds)
        value = report_value(report, key)
        lo, hi = (report_value(report, b) if isinstance(b, str) else b for b in (exp.min, exp.max))
        if value is None or (exp.min is not None and lo is None) or (exp.max is not None and hi is None):
            status = "missing"
        else:
            status = "met" if (lo is None or value >= lo) and (hi is None or value <= hi) else "not met"
        out.append((key, exp, value, status))
    return out


def derived_keys(report: dict) -> dict:
    """Differences and ratios of other keys, for the report's readers and its expectations."""
    out = {}
    rounds = report.get("round_policies") or []  # a run of several rounds: "ppo", "ppo_round2", ...
    for name in ("ppo", "ppo_noptx", *rounds[1:]):
        if f"gold_score.{name}" in report and "gold_score.sft" in report:
            out[f"gold_gain.{name}_vs_sft"] = report[f"gold_score.{name}"] - report["gold_score.sft"]
        ppl = report.get(f"ptx_perplexity.{name}")
        for ref in ("sft", "base"):
            ref_ppl = report.get(f"ptx_perplexity.{ref}")
            if isinstance(ref_ppl, (int, float)) and isinstance(ppl, (int, float)) and ref_ppl > 0:
                out[f"ptx_perplexity_ratio.{name}_vs_{ref}"] = ppl / ref_ppl
    curve = report.get("best_of_n_curve") or []
    if curve and "gold" in curve[-1] and isinstance(report.get("best_of_n_sft_greedy_gold"), (int, float)):
        out["best_of_n_gain"] = curve[-1]["gold"] - report["best_of_n_sft_greedy_gold"]
    # each round against the one before: the gold its policy gains, and how much more accurate its RM is than the
    # previous round's on pairs of the policy it ranked (the previous round's): fresh rankings where the policy went
    for r in range(2, len(rounds) + 1):
        now, before = (report_value(report, f"gold_score.{p}") for p in (rounds[r - 1], rounds[r - 2]))
        if now is not None and before is not None:
            out[f"gold_gain.round{r}_vs_round{r - 1}"] = now - before
        now, before = (report_value(report, f"rm_accuracy_samples.round{q}.{rounds[r - 2]}") for q in (r, r - 1))
        if now is not None and before is not None:
            out[f"rm_accuracy_gain.round{r}_vs_round{r - 1}"] = now - before
    return out


def report_value(report: dict, key: str) -> float | None:
    """`report[key]`, or element i of it for "key[i]"; None when absent or not a finite number."""
    index = None
    if key.endswith("]") and "[" in key:
        key, _, i = key[:-1].rpartition("[")
        if not i.isdigit():
            return None
        index = int(i)
    v = report.get(key)
    if index is not None:
        v = v[index] if isinstance(v, (list, tuple)) and len(v) > index else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# --------------------------------------------------------------------------------------------------------------------
# report.json


def _jsonable(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def merge_report_json(path: str, report: dict) -> dict:
    """Update the JSON object at `path` with `report` (new keys win) and write it back atomically."""
    merged: dict = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            merged = json.load(fh)
    merged.update(report)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(merged, fh, indent=2, default=_jsonable)
    os.replace(path + ".tmp", path)
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Plots


def stage_kind(rows: Sequence[dict]) -> str | None:
    """'ppo', 'rm' or 'lm' (SFT / pretraining) from the keys a stage logged; None for no rows."""
    keys = set().union(*rows) if rows else set()
    if any(k.startswith(("objective/", "ppo/")) for k in keys):
        return "ppo"
    if "train/accuracy" in keys or "eval/accuracy" in keys:
        return "rm"
    if "train/loss" in keys:
        return "lm"
    return None


def series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that logged `key` with a finite number."""
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


# panel title -> (stage kind, metric keys)
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("SFT loss", "lm", ("train/loss", "eval/loss")),
    ("RM accuracy", "rm", ("train/accuracy", "eval/accuracy")),
    ("PPO reward", "ppo", ("objective/rlhf_reward", "objective/scores", "eval/rm_score")),
    ("PPO KL to SFT", "ppo", ("objective/kl", "eval/kl")),
    ("PPO gold score", "ppo", ("objective/gold_score", "eval/gold_score")),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics: dict[str, list[dict]], path: str) -> bool:
    """One panel per PANELS entry that has data, a line per (stage, metric). Returns whether a file was written."""
    panels = []
    for title, kind, keys in PANELS:
        lines = [(f"{stage} {k}", *series(rows, k)) for stage, rows in metrics.items() if stage_kind(rows) == kind
                 for k in keys]
        lines = [ln for ln in lines if ln[1]]
        if lines:
            panels.append((title, lines))
    if not panels:
        return False
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, x, y in lines:
            ax.plot(x, y, marker="o" if len(x) < 15 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# Policies that are not optimisations of the SFT policy: their KL to SFT is off the over-optimisation axis.
NOT_FROM_SFT = ("base",)
# A stage of a later round of the pipeline ("round2.ppo")
LATER_ROUND = re.compile(r"round\d+\.")


def plot_overoptimisation(metrics: dict[str, list[dict]], report: dict, path: str) -> bool:
    """Gold score and RM score against sqrt(KL to SFT): the PPO runs' held-out eval rows as lines, the evaluated
    policies as labelled points. Returns whether a file was written."""
    runs = []
    for stage, rows in metrics.items():
        pts = [r for r in rows if isinstance(r.get("eval/kl"), (int, float))]
        # a later round's PPO ("round2.ppo") is on the same axis: its KL reference is SFT too; its RM score is its
        # own round's reward model's
        if stage_kind(rows) == "ppo" and pts:
            runs.append((stage, pts))
    policies = [p for p in report.get("policies", [])
                if report_value(report, f"kl.{p}") is not None and p not in NOT_FROM_SFT]
    if not runs and not policies and not report.get("best_of_n_curve"):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, bon_key, title in ((axes[0], "gold_score", "gold", "gold score"),
                                    (axes[1], "rm_score", "rm", "RM score (proxy)")):
        drawn = False
        for stage, pts in runs:
            xy = [(math.sqrt(max(r["eval/kl"], 0.0)), r[f"eval/{key}"]) for r in pts
                  if isinstance(r.get(f"eval/{key}"), (int, float))]
            if xy:
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", markersize=3, label=stage)
                drawn = True
        curve = [c for c in report.get("best_of_n_curve") or [] if isinstance(c.get(bon_key), (int, float))]
        if curve:
            ax.plot([math.sqrt(c["kl"]) for c in curve], [c[bon_key] for c in curve], marker="s",
                    markersize=3, linestyle="--", label="best-of-n (SFT samples)")
            drawn = True
        for p in policies:
            y = report_value(report, f"{key}.{p}")
            if y is not None:
                x = math.sqrt(max(report_value(report, f"kl.{p}"), 0.0))
                ax.scatter([x], [y], marker="*", s=80, zorder=3)
                ax.annotate(p, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
                drawn = True
        ax.set_xlabel("sqrt(KL to SFT)  [nats^0.5]")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs sqrt(KL)" + ("" if drawn else " (no data)"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a line with a label drawn (a run's evaluations, the best-of-n curve)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_per_family(report: dict, path: str) -> bool:
    """Grouped bars: mean gold score per task family, one bar per policy. Returns whether a file was written."""
    per = {p: report[f"per_family.{p}"] for p in report.get("policies", [])
           if isinstance(report.get(f"per_family.{p}"), dict)}
    if not per:
        return False
    families = sorted(set().union(*per.values()))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(14, max(8, 0.4 * len(families) * len(per))), 4))
    width = 0.8 / len(per)
    for i, (p, vals) in enumerate(per.items()):
        xs = [j + (i - (len(per) - 1) / 2) * width for j in range(len(families))]
        ax.bar(xs, [vals.get(f, 0.0) for f in families], width=width, label=p)
    ax.set_xticks(range(len(families)))
    ax.set_xticklabels(families, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("mean gold score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------------
# report.md


def _cell(v, pct: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_cell(x, pct) for x in v) + "]"
    if isinstance(v, str):
        return _md(v)
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, int) or (abs(v) >= 1 and float(v).is_integer()):
        return str(int(v))
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def _md(text: str, limit: int = 160) -> str:
    """Text safe inside a markdown table cell."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>") or "∅"


def time_and_memory_table(report: dict) -> list[str]:
    """Seconds per stage, with the pipeline's peak resident memory at the end of each stage (and the stage's own GPU
    peak) where the report has them."""
    stages = [k.split(".", 1)[1] for k in report if k.startswith("seconds.")]
    stages += [k.split(".", 1)[1] for k in report if k.startswith("peak_rss_gib.") and k.split(".", 1)[1] not in stages]
    if not stages:
        return []
    # then others, then total; a later round's stages ("round2.rm") after round 1's, in the order they ran
    order = ("pretrain", "sft", "label_sim", "rm", "ppo", "ppo_noptx", "rloo", "dpo", "round<r>.", "eval",
             "eval_rounds")
    stages.sort(key=lambda s: (s == "total", order.index("round<r>.") if LATER_ROUND.match(s) else
                               order.index(s) if s in order else len(order)))
    cols = [("seconds", "seconds", ".1f"), ("peak_rss_gib", "peak resident memory so far (GiB)", ".2f"),
            ("peak_cuda_gib", "peak GPU memory of the stage (GiB)", ".2f")]
    cols = [c for c in cols if any(f"{c[0]}.{s}" in report for s in stages)]
    rows = [[s] + [format(report[f"{key}.{s}"], fmt) if f"{key}.{s}" in report else "-" for key, _, fmt in cols]
            for s in stages]
    return _table(["stage"] + [title for _, title, _ in cols], rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def policy_table(report: dict) -> list[str]:
    sft = report.get("sft_policy", "sft")
    # (column, key template, as percent); {p} is the policy, {vs} its pairing with the SFT policy
    cols = [("gold score", "gold_score.{p}", False), ("exact", "accuracy.{p}", True),
            (f"win vs {sft} (ties ½)", "win_rate.{vs}", True), ("95% CI", "win_rate_ci95.{vs}", True),
            ("win, no ties", "win_rate_no_ties.{vs}", True), ("95% CI, no ties", "win_rate_no_ties_ci95.{vs}", True),
            (f"RM-judged win vs {sft}", "win_rate_rm.{vs}", True), ("RM score", "rm_score.{p}", False),
            ("KL to SFT", "kl.{p}", False), ("ptx perplexity", "ptx_perplexity.{p}", False),
            ("BLEU", "bleu.{p}", False), ("ROUGE-L", "rouge_l.{p}", False)]
    names = report.get("policies", [])

    def get(tpl: str, p: str):
        return report.get(tpl.format(p=p, vs=f"{p}_vs_{sft}"))

    cols = [c for c in cols if any(get(c[1], p) is not None for p in names)]
    rows = [[p] + [_cell(get(tpl, p), pct) for _, tpl, pct in cols] for p in names]
    return _table(["policy"] + [c[0] for c in cols], rows)


def family_table(report: dict) -> list[str]:
    names = [p for p in report.get("policies", []) if isinstance(report.get(f"per_family.{p}"), dict)]
    if not names:
        return []
    families = sorted(set().union(*(report[f"per_family.{p}"] for p in names)))
    rows = []
    for f in families:
        cells = []
        for p in names:
            g = report[f"per_family.{p}"].get(f)
            a = (report.get(f"per_family_accuracy.{p}") or {}).get(f)
            cells.append(_cell(g) + ("" if a is None else f" ({100 * a:.0f}%)"))
        rows.append([f] + cells)
    return _table(["family"] + names, rows)


def flag_table(report: dict) -> list[str]:
    """Rows: the rubric's flags; columns: every policy with flag rates (the best-of-n pick included)."""
    names = [k.removeprefix("flag_rate.") for k, v in report.items() if k.startswith("flag_rate.") and v]
    if not names:
        return []
    flags = list(dict.fromkeys(f for n in names for f in report[f"flag_rate.{n}"]))
    return _table(["flag", *names], [[f, *[_cell(report[f"flag_rate.{n}"].get(f), True) for n in names]]
                                     for f in flags])


def read_samples(run_dir: str, policy: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, f"samples_{policy}.jsonl"))


def sample_table(run_dir: str, policies: Sequence[str], k: int = 8) -> list[str]:
    """The first prompt of each of the first `k` families (or the first k prompts), every policy's answer beside."""
    samples = {p: read_samples(run_dir, p) for p in policies}
    samples = {p: s for p, s in samples.items() if s}
    if not samples:
        return []
    first = next(iter(samples.values()))
    picked, seen = [], set()
    for i, row in enumerate(first):
        fam = row.get("family")
        if fam is None or fam not in seen:
            seen.add(fam)
            picked.append(i)
        if len(picked) >= k:
            break
    rows = []
    for i in picked:
        cells = []
        for s in samples.values():
            r = s[i] if i < len(s) else {}
            score = f" ({r['gold']:.2f})" if "gold" in r else (f" (RM {r['rm']:.2f})" if "rm" in r else "")
            cells.append(_md(r.get("response", "")) + score)
        rows.append([_md(first[i].get("prompt", "")), _md(first[i].get("reference") or "")] + cells)
    return _table(["prompt", "reference"] + list(samples), rows)


def rounds_tables(report: dict) -> list[str]:
    """A run of several rounds: a row per round (its rankings, its RM's accuracy where the policy went, its policy's
    gold, win rate and KL), then every round's RM on pairs of samples of every round's policy."""
    rounds = report.get("round_policies") or []
    if len(rounds) < 2:
        return []
    sft = report.get("sft_policy", "sft")
    ranked = [sft, *rounds[:-1]]  # round r ranks samples of the policy round r - 1 ended with (round 1: SFT's)

    def acc(r: int, policy: str) -> str:
        return _cell(report.get(f"rm_accuracy_samples.round{r}.{policy}"))

    rows = []
    for r, (policy, before) in enumerate(zip(rounds, ranked), 1):
        new, total = report.get(f"rankings.round{r}"), report.get(f"rankings_total.round{r}")
        vs = f"{policy}_vs_{sft}"
        rows.append([str(r), policy, f"{_cell(new)} / {_cell(total)}",
                     f"{before}: {acc(r, before)}" + (f" ({acc(r - 1, before)})" if r > 1 else ""),
                     acc(r, policy), _cell(report.get(f"gold_score.{policy}")),
                     " ".join(_cell(report.get(f"{key}.{vs}"), True)
                              for key in ("win_rate_no_ties", "win_rate_no_ties_ci95")),
                     _cell(report.get(f"kl.{policy}"))])
    lines = [(f"Each round after the first ranks samples of the policy the round before ended with, trains the reward "
              f"model afresh from SFT on every ranking so far, and continues PPO from that policy. RM accuracy: "
              f"against the gold order on pairs of {report.get('rm_accuracy_samples_k', 'K')} samples of a policy "
              f"(drawn as the labelers' are) for each of {report.get('rm_accuracy_samples_prompts', '?')} held-out "
              "prompts; in brackets, the previous round's RM on the same pairs."), ""]
    lines += _table(["round", "policy", "rankings: new / RM trained on", "RM on the ranked policy's pairs",
                     "RM on its own policy's pairs", "gold score", f"win vs {sft}, no ties [95% CI]", "KL to SFT"],
                    rows)
    gains = [f"round {r}: gold {report[f'gold_gain.round{r}_vs_round{r - 1}']:+.3f}" +
             (f", RM accuracy on {ranked[r - 1]}'s pairs {report[f'rm_accuracy_gain.round{r}_vs_round{r - 1}']:+.3f}"
              if f"rm_accuracy_gain.round{r}_vs_round{r - 1}" in report else "")
             for r in range(2, len(rounds) + 1) if f"gold_gain.round{r}_vs_round{r - 1}" in report]
    if gains:
        lines += ["", "Against the round before: " + "; ".join(gains) + "."]
    policies = [sft, *rounds]
    if any(f"rm_accuracy_samples.round1.{p}" in report for p in policies):
        lines += ["", "Each round's reward model on pairs of samples of each policy (pairs whose gold differs):", ""]
        lines += _table(["reward model", *[f"{p} ({_cell(report.get(f'rm_accuracy_samples_pairs.{p}'))})"
                                           for p in policies]],
                        [[f"round {r}", *[acc(r, p) for p in policies]] for r in range(1, len(rounds) + 1)])
    return lines


def expectation_table(report: dict) -> list[str]:
    mark = {"met": "✅ met", "not met": "❌ not met", "missing": "— missing"}

    def bound(sign: str, b) -> str:
        return f"{sign} `{b}` ({_cell(report_value(report, b))})" if isinstance(b, str) else f"{sign} {_cell(b)}"

    rows = [[f"`{key}`", ", ".join(bound(sign, b) for sign, b in (("≥", exp.min), ("≤", exp.max)) if b is not None),
             _cell(value), mark[status]] for key, exp, value, status in check_expectations(report)]
    return _table(["report key", "expected", "measured", "result"], rows) if rows else []


def render_markdown(run_dir: str, report: dict, plots: Sequence[str]) -> str:
    lines = ["# Evaluation report", ""]
    dec = report.get("decoding") or {}
    lines.append(f"{report.get('heldout_prompts', '?')} held-out prompts; win rates judged by "
                 f"**{report.get('judge')}**; decoding: temperature {dec.get('temperature', '?')}, "
                 f"{dec.get('max_new_tokens', '?')} new tokens at most. KL to SFT is estimated on "
                 f"{dec.get('kl_prompts', '?')} samples per policy at temperature 1 (best-of-n: log n − (n−1)/n)."
                 + (f" Best-of-n candidates sampled at temperature {dec['best_of_temperature']}."
                    if "best_of_temperature" in dec else ""))
    lines += ["", "## Policies", ""] + policy_table(report)
    sft = report.get("sft_policy", "sft")
    changes = [p for p in report.get("policies", []) if f"right_gained.{p}_vs_{sft}" in report]
    if changes:
        def split(p: str) -> str:
            vs = f"{p}_vs_{sft}"
            return (f"{p} +{report[f'right_gained.{vs}']} / -{report[f'right_lost.{vs}']}, "
                    f"{_cell(report.get(f'win_rate_no_ties_both_wrong.{vs}'), True)} of "
                    f"{report.get(f'win_rate_no_ties_both_wrong_pairs.{vs}')}")

        right = ("answers with every property (no fault flagged, every constraint followed)"
                 if any(k.startswith("flag_rate.") for k in report)
                 else f"right answers (gold >= {report.get('right_answer_gold')})")
        lines += ["", (f"{right[0].upper() + right[1:]} gained / lost against {sft}, and the win rate without ties "
                       "where neither answer has them (the rest of the rubric alone decides): "
                       + "; ".join(split(p) for p in changes) + ".")]
    if report.get("rm_accuracy_gold") is not None:
        lines += ["", (f"Reward-model accuracy against the gold order: **{report['rm_accuracy_gold']:.3f}** on "
                       f"{report.get('rm_accuracy_gold_pairs')} non-tied held-out pairs (the policies' answers).")]
        split = [(k.removeprefix("rm_accuracy_gold."), v) for k, v in report.items()
                 if k.startswith("rm_accuracy_gold.") and v is not None]
        if split:
            lines[-1] += " By pair of policies: " + ", ".join(
                f"{pair.replace('_vs_', ' vs ')} {v:.3f} ({report.get('rm_accuracy_gold_pairs.' + pair)} pairs)"
                for pair, v in split) + "."
        for key, fams in report.items():
            if key.startswith("rm_accuracy_gold_per_family.") and fams:
                pair = key.removeprefix("rm_accuracy_gold_per_family.").replace("_vs_", " vs ")
                lines += ["", f"By task family, {pair}: " + ", ".join(
                    f"{f} {v['accuracy']:.2f} ({v['pairs']})" for f, v in fams.items()) + "."]
    longer = [k.removeprefix("rm_prefers_longer.") for k, v in report.items()
              if k.startswith("rm_prefers_longer.") and v is not None]
    if longer:
        def bias(vs: str) -> str:
            gold = report.get(f"gold_prefers_longer.{vs}")
            return (f"{_cell(report[f'rm_prefers_longer.{vs}'], True)} of {report.get(f'prefers_longer_pairs.{vs}')} "
                    f"({vs.replace('_vs_', ' vs ')}" + ("" if gold is None else f"; gold {_cell(gold, True)}") + ")")

        lines += ["", ("Length bias, where a policy's answer and SFT's differ in length: the RM prefers the longer one "
                       + ", ".join(bias(vs) for vs in longer) + ".")]
    if report.get("rm_accuracy_gold_sft_samples") is not None:
        lines += ["", (f"On pairs of the SFT model's own samples (best-of-n's candidates): "
                       f"**{report['rm_accuracy_gold_sft_samples']:.3f}** "
                       f"({report.get('rm_accuracy_gold_sft_samples_pairs')} pairs).")]
    by_flag = report.get("rm_accuracy_gold_sft_samples_by_flag") or {}
    if by_flag:
        lines += ["", "... by flag (pairs where one answer carries the flag and the other does not): " + ", ".join(
            f"{f} {v['accuracy']:.3f} ({v['pairs']})" for f, v in by_flag.items()) + "."]
    round_lines = rounds_tables(report)
    if round_lines:
        lines += ["", "## Rounds", ""] + round_lines
    curve = report.get("best_of_n_curve") or []
    if curve:
        cols = [c for c in ("gold", "rm", "gold_oracle") if c in curve[0]]
        head = {"gold": "gold of the RM's pick", "rm": "RM score of its pick", "gold_oracle": "gold of gold's pick"}
        lines += ["", "## Best-of-n", "", (f"The RM picks the best of n samples of the SFT model (temperature "
                                           f"{dec.get('best_of_temperature', 1)}) on {report.get('best_of_n_prompts')} "
                                           f"held-out prompts; KL = log n - (n-1)/n.")
                  + (f" SFT's greedy answer there: gold {report['best_of_n_sft_greedy_gold']:.3f}."
                     if "best_of_n_sft_greedy_gold" in report else ""), ""]
        lines += _table(["n", "KL", *[head[c] for c in cols]],
                        [[str(c["n"]), f"{c['kl']:.3f}", *[f"{c[k]:.3f}" for k in cols]] for c in curve])
    flags = flag_table(report)
    if flags:
        lines += ["", "## The rubric's flags", "", "Share of answers with each flag (`satisfies_constraint`: of the "
                  "answers to prompts with constraints); `all_properties`: no fault and every constraint kept.", ""]
        lines += flags
    oracle = [k for k in report if k.startswith("gold_score.") and k.endswith("_oracle")]
    for k in oracle:
        name = k[len("gold_score."):-len("_oracle")]
        rnd, got = report.get(f"gold_score.{name}_random"), report.get(f"gold_score.{name}")
        lines += ["", (f"{name}'s candidates, gold score when picked at random / by the RM / by the gold labeler "
                       f"(a perfect RM): **{_cell(rnd)} / {_cell(got)} / {_cell(report[k])}**.")]
    expected = expectation_table(report)
    if expected:
        lines += ["", "## Expected results", ""] + expected
    fam = family_table(report)
    if fam:
        lines += ["", "## Gold score per task family (exact-answer rate)", ""] + fam
    time_rows = time_and_memory_table(report)
    if time_rows:
        lines += ["", "## Time and memory", ""] + time_rows
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    samples = sample_table(run_dir, report.get("policies", []))
    if samples:
        lines += ["", "## Samples", "", "Gold score in brackets.", ""] + samples
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, report: dict, stage_dirs: dict[str, str]) -> dict:
    """Write report.json (merged into an existing one), the PNG plots and report.md in `run_dir`.

    `stage_dirs` maps a stage name (sft, rm, ppo, ppo_noptx, ...) to its out_dir; its metrics.jsonl feeds the
    curves (the kind of stage is read from the keys it logged). Returns the merged report.
    """
    os.makedirs(run_dir, exist_ok=True)
    merged = merge_report_json(os.path.join(run_dir, "report.json"), {**report, **derived_keys(report)})
    metrics = {name: rows for name, d in stage_dirs.items() if (rows := read_metrics(d))}
    written = {"training_curves.png": plot_training_curves(metrics, os.path.join(run_dir, "training_curves.png")),
               "overoptimisation.png": plot_overoptimisation(metrics, merged,
                                                             os.path.join(run_dir, "overoptimisation.png")),
               "per_family.png": plot_per_family(merged, os.path.join(run_dir, "per_family.png"))}
    plots = [name for name, ok in written.items() if ok]
    with open(os.path.join(run_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(render_markdown(run_dir, merged, plots))
    return merged
