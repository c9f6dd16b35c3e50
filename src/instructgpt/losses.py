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


# --------------------------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017) as used for RLHF (Ziegler et al. 2019; Ouyang et al. 2022, Eq. 2)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true (response tokens). `count` replaces the number of those
    positions as the divisor: a minibatch split across W processes divides by its tokens in all / W, so the mean of
    the W processes' values (DDP's gradient average) is the whole minibatch's mean."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum().clamp(min=1.0) if count is None else count)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, count=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per response token (Schulman et al. 2017, Eq. 7), as a loss to minimise:

        ratio = exp(log pi - log pi_old);  loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1-eps, 1+eps))

    Also returns clipfrac (share of tokens where the clipped term is the larger) and approxkl = mean 0.5 (log ratio)^2.
    All (B, R); mask marks response tokens; `count`: :func:`masked_mean`'s.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg1, pg2), mask, count)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask, count),
                 "approxkl": masked_mean(0.5 * log_ratio ** 2, mask, count),
                 "ratio": masked_mean(ratio, mask, count)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, count=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (baselines PPO2; the implementation-details checklist, policy item 10):

        v_clip = v_old + clip(v - v_old, -eps_v, eps_v);  loss = 0.5 * mean_t max((v - R)^2, (v_clip - R)^2)
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask, count)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((l2 > l1).float(), mask, count)}
    return loss, stats


def label_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`token_loss_sum` for a decoder fed its labels shifted right (an encoder-decoder model): position t predicts
    label t, no shift. (B, R, V), (B, R) -> (sum of cross-entropy over labels not -100, their count)."""
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The SFT loss: sum of next-token cross-entropy over positions whose label is not -100, and their count (the
    caller divides by the global batch's count, so N ranks x M micro-batches equal one big batch).

    logits (B, T, V) predict labels shifted by one: position t predicts token t+1.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            count=None) -> torch.Tensor:
    """Mean next-token negative log-likelihood over real tokens: -E_pretrain[log pi(x)] per token, PPO-ptx's term
    (`token_loss_sum` over one minibatch, as a mean over the attention mask; `count`: :func:`masked_mean`'s).

    logits (B, T, V) at positions 0..T-1 predict tokens 1..T.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return masked_mean(nll, attention_mask[:, 1:].bool(), count)


def dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: list[int], beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) over a K-way ranking: the RM's ranking loss over the implicit rewards
    beta * (log pi - log pi_ref), i.e. -(1/C) sum over non-tied pairs (w, l) of
    log sigmoid(beta * [(pi_w - ref_w) - (pi_l - ref_l)]). (K,), (K,) -> ()."""
    return ranking_loss(beta * (policy_logps - ref_logps), ranks)
