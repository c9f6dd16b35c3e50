"""Comparisons/s of K-way reward-model training against the same code fed the rankings expanded to pairs.

Both run back-to-back in one process, alternating, on the same rankings (the built-in task, K = 4 and 9);
the figure is the median ratio. usage: python benchmarks/rm_kway.py [MODEL_DIR]
"""

import random
import statistics
import sys
import time

import torch

from instructgpt import tasks
from instructgpt.losses import ranking_loss, ranking_pairs
from instructgpt.modeling import load_model
from instructgpt.reward import encode_pair
from instructgpt.rankings import Encoded
from instructgpt.rm import forward_rankings


def rankings(tok, k, n, seed=0):
    rng = random.Random(seed)
    out = []
    for t in tasks.make_tasks("train", n, seed=seed):
        resp = [tasks.demonstrate(t, rng, error_rate=0.6) for _ in range(k)]
        out.append(Encoded([encode_pair(tok, t.prompt, r) for r in resp], list(range(1, k + 1))))
    return out


def step(model, opt, items, pad):
    rewards = forward_rankings(model, items, pad, "cpu")
    loss = torch.stack([ranking_loss(r, it.ranks) for r, it in zip(rewards, items)]).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "builtin:base"
    model, tok = load_model(model_dir, model_class="sequence_classification", for_training=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for k in (4, 9):
        prompts_per_step = 8
        kway = rankings(tok, k, prompts_per_step * 4)
        pairs = [Encoded([it.seqs[w], it.seqs[l]], [1, 2]) for it in kway for w, l in ranking_pairs(it.ranks)]
        n_cmp = sum(len(ranking_pairs(it.ranks)) for it in kway)
        ratios = []
        for rep in range(3):
            t = time.perf_counter()
            for s in range(0, len(kway), prompts_per_step):
                step(model, opt, kway[s:s + prompts_per_step], tok.pad_token_id)
            kw = n_cmp / (time.perf_counter() - t)
            t = time.perf_counter()
            per = prompts_per_step * len(pairs) // len(kway)  # the same comparisons per step, as pairs
            for s in range(0, len(pairs), per):
                step(model, opt, pairs[s:s + per], tok.pad_token_id)
            pw = n_cmp / (time.perf_counter() - t)
            ratios.append(kw / pw)
            print(f"K={k} rep {rep}: k-way {kw:.0f} cmp/s, pairs {pw:.0f} cmp/s, ratio {kw / pw:.2f}")
        print(f"K={k}: median ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
