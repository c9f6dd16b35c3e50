"""Losses, each a small pure function with its equation and where it comes from."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All non-tied ordered pairs (w, l) of a K-way ranking, w ranked better (lower rank) than l."""
    k = len(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def ranking_loss(rewards: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """InstructGPT's RM loss for one prompt (Ouyang et al. 2022, Eq. 1), all C(K,2) comparisons as one element:

        loss = -(1/C) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l)),   C = number of non-tied pairs.

    rewards: (K,) one scalar per response, each response forwarded once. Pairs (K = 2) are the special case.
    """
    pairs = ranking_pairs(ranks)
    w = torch.tensor([p[0] for p in pairs], device=rewards.device)
    l = torch.tensor([p[1] for p in pairs], device=rewards.device)
    return -F.logsigmoid(rewards[w] - rewards[l]).mean()


def ranking_accuracy(rewards: list[float], ranks: list[int]) -> tuple[int, int]:
    """(pairs ordered as the ranks say, non-tied pairs); a reward tie counts as wrong."""
    pairs = ranking_pairs(ranks)
    return sum(rewards[w] > rewards[l] for w, l in pairs), len(pairs)
