"""Per-token rewards, GAE and whitening for PPO on language models; small pure functions over (B, R) tensors.

Shapes: B episodes, R response positions; `mask` (B, R) is true on the tokens each response actually has
(its EOS included), false on the padding after it.
"""

from __future__ import annotations

import torch

from instructgpt.losses import masked_mean


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman, "Approximating KL", 2020).

    k1 = log pi - log pi_ref (unbiased, can be negative: the paper's penalty);
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, never negative, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (k1 or k3)")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's reward (Eq. 2) spread over tokens: -beta * KL_t at every response token, plus the reward model's
    score at the last one. scores (B,), kl (B, R) -> (rewards (B, R), non_score_rewards (B, R))."""
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = (mask.long().sum(-1) - 1).clamp(min=0)  # (B,) index of each response's last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), vectorised over time:

        delta_t = r_t + gamma * V_{t+1} - V_t   (V after the last token = 0: the episode ends there)
        A_t = sum_{l >= 0} (gamma * lam)^l * delta_{t+l};   returns R_t = A_t + V_t

    One (R, R) matrix of discounts replaces the backward loop (`gae_loop` is the plain loop, for the tests).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask  # (B, R)
    R = rewards.shape[1]
    t = torch.arange(R, device=rewards.device)
    power = (t[:, None] - t[None, :]).to(values.dtype)  # (R, R): j - t for row j, column t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = deltas @ discount  # A[b, t] = sum_j delta[b, j] * (gamma lam)^(j - t), j >= t
    return advantages * mask, (advantages + values) * mask


def gae_loop(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
             lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `gae`, as the usual backward loop (cleanrl / lm-human-preferences)."""
    mask = mask.to(values.dtype)
    values = values * mask
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = (rewards[:, t] + gamma * next_v - values[:, t]) * mask[:, t]
        last = delta + gamma * lam * last * mask[:, t]
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def group_advantages(returns: torch.Tensor, group_size: int, estimator: str = "rloo") -> torch.Tensor:
    """Critic-free advantages: each response's return against the other responses to the same prompt.

    `returns` (B,) holds k = `group_size` consecutive responses per prompt (rows i*k .. i*k+k-1 share a prompt).
    rloo: A_i = R_i - mean_{j != i} R_j, the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024);
    grpo: A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-4), the group-normalised one (Shao et al. 2024).
    """
    k = group_size
    if k < 2 or returns.shape[0] % k:
        raise ValueError(f"{returns.shape[0]} returns do not split into groups of {k} >= 2")
    g = returns.view(-1, k)  # (B / k, k)
    if estimator == "rloo":
        return (g - (g.sum(-1, keepdim=True) - g) / (k - 1)).view(-1)
    if estimator == "grpo":
        return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-4)).view(-1)
    raise ValueError(f"unknown group estimator '{estimator}' (rloo or grpo)")


def masked_moments(x: torch.Tensor, mask: torch.Tensor, all_sum=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of `x` over the masked positions. `all_sum(tensor) -> tensor` sums over processes
    when the batch is split across them: the moments are then the whole batch's."""
    if all_sum is None:
        mean = masked_mean(x, mask)
        return mean, masked_mean((x - mean) ** 2, mask)
    m = mask.to(x.dtype)
    n = all_sum(m.sum()).clamp(min=1.0)
    mean = all_sum((x * m).sum()) / n
    return mean, all_sum(((x - mean) ** 2 * m).sum()) / n


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """(x - mean) / std over the masked positions (biased variance, as lm-human-preferences); shift_mean=False keeps
    the mean (its reward whitening). `all_sum`: :func:`masked_moments`'."""
    mean, var = masked_moments(x, mask, all_sum)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_sum=None) -> float:
    """1 - Var[R - V] / Var[R] over response tokens (1: perfect value function, 0: no better than a constant);
    `all_sum`: :func:`masked_moments`'."""
    var_r = masked_moments(returns, mask, all_sum)[1]
    var_d = masked_moments(returns - values, mask, all_sum)[1]
    return float(1.0 - var_d / var_r.clamp(min=1e-8))
