"""``instructgpt dpo``: direct preference optimisation (Rafailov et al. 2023) on K-way rankings, the baseline
without RL that users compare RLHF against. Not part of InstructGPT (the paper trains a reward model and runs PPO-ptx).

The policy starts from the SFT model; the reference is that same model, frozen. A response's implicit reward is
beta * (log pi(y | x) - log pi_ref(y | x)), summed over its tokens, and the loss is the reward model's (Ouyang et al.
Eq. 1) over those rewards: every non-tied pair of a prompt's ranking in one batch element, weighted 1/C, each of the K
responses forwarded once. For K = 2 this is DPO's sigmoid loss exactly. The reference log-probs are computed once,
before the first step, from a fresh load of the starting model (so a resumed run gets the same ones); dropout is off
(as TRL's DPOTrainer by default), so policy and reference are compared on the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from instructgpt.batching import right_pad
from instructgpt.config import ConfigError, TrainConfig
from instructgpt.data import check_sources
from instructgpt.losses import ranking_accuracy, ranking_loss
from instructgpt.modeling import (apply_lora, check_context, disable_dropout, load_model, save_model, sequence_logprobs,
                                  require_decoder_only, set_seed)
from instructgpt.rankings import Encoded, RankingStageConfig, fit_rankings, load_ranking_items, read_rankings
from instructgpt.runs import StageRun, releases_out_dir
from instructgpt.training import full_model, make_accelerator


def _dpo_train() -> TrainConfig:
    return TrainConfig(max_steps=0, batch_size=16, lr=5e-6, log_every=10, eval_every=50, save_every=100)


@dataclass
class DPOConfig(RankingStageConfig):
    train: TrainConfig = field(default_factory=_dpo_train)
    beta: float = 0.1  # the implicit reward's scale, i.e. the strength of the pull back to the reference

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")


@dataclass
class Item(Encoded):
    """One prompt's K responses (prompt + response token ids) and ranks, with the reference's log-probs of them."""

    ref: torch.Tensor | None = None  # (K,) filled before training


def summed_response_logprobs(model, items: Sequence[Item], pad_token_id: int, device) -> list[torch.Tensor]:
    """log p(response | prompt), summed over the response's tokens (its end-of-turn included), for every response of
    every item in one forward. -> [(K_i,)]."""
    rows = [s for it in items for s in it.seqs]
    starts = torch.tensor([it.prompt_len for it in items for _ in it.seqs], device=device)
    ids, mask = right_pad(rows, pad_token_id, device)
    logp = sequence_logprobs(model, ids, mask)  # (N, T-1): position t predicts token t+1
    target = torch.arange(1, ids.shape[1], device=device)[None, :]  # (1, T-1) the predicted token's index
    in_response = (target >= starts[:, None]) & mask[:, 1:].bool()
    sums = (logp * in_response).sum(-1)
    return list(torch.split(sums, [len(it.seqs) for it in items]))


def implicit_rewards(model, items: Sequence[Item], pad_token_id: int, device, beta: float) -> list[torch.Tensor]:
    """beta * (log pi - log pi_ref) of every response of every item, in one forward. -> [(K_i,)]."""
    logps = summed_response_logprobs(model, items, pad_token_id, device)
    return [beta * (lp.float() - it.ref) for lp, it in zip(logps, items)]


@torch.no_grad()
def heldout_metrics(model, items: Sequence[Item], pad_token_id: int, device, beta: float, batch_size: int = 16) -> dict:
    """Held-out rankings: how often the implicit rewards order a pair as the labelers did, the loss, and the mean
    implicit reward of the best- and worst-ranked responses."""
    right = total = 0
    loss_sum, best, worst = 0.0, [], []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        for it, rewards in zip(chunk, implicit_rewards(model, chunk, pad_token_id, device, beta)):
            a, n = ranking_accuracy(rewards.tolist(), it.ranks)
            right, total = right + a, total + n
            loss_sum += float(ranking_loss(rewards, it.ranks))  # losses.dpo_loss, on the rewards already at hand
            ranks = torch.tensor(it.ranks)
            best.append(float(rewards[ranks == ranks.min()].mean()))
            worst.append(float(rewards[ranks == ranks.max()].mean()))
    n = max(len(items), 1)
    return {"eval/accuracy": right / max(total, 1), "eval/loss": loss_sum / n,
            "eval/reward_best": sum(best) / n, "eval/reward_worst": sum(worst) / n}


def data_sources(cfg: DPOConfig) -> list[str | None]:
    """The data the run reads (None: none there): rankings and held-out ones."""
    return [cfg.data.train, cfg.data.eval]


@releases_out_dir
def train(cfg: DPOConfig) -> str:
    require_decoder_only(cfg.model, "dpo")
    acc = make_accelerator(cfg)
    run = StageRun(cfg, "dpo", acc)
    if run.prepare() == "done":
        acc.print(f"[dpo] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    check_sources(*data_sources(cfg))
    read = read_rankings(cfg)  # before the model loads: a bad line is named first
    # 1. rankings -> items; the reference's log-probs from a fresh load of the starting model, once. With
    # model.gradient_checkpointing the policy trains in train mode (below), so it loads with its dropout at 0
    gc = cfg.model.gradient_checkpointing
    model, tok = load_model(replace(cfg.model, dropout=0.0) if gc else cfg.model, for_training=True)
    check_context(model, cfg.data.max_length)
    _, items, eval_items, skipped = load_ranking_items(cfg, read, tok, Item)
    pad = tok.pad_token_id
    model.eval()  # dropout off for good: the policy's log-probs and the reference's come from the same forward
    model.to(acc.device)
    everything = items + eval_items
    with torch.no_grad(), acc.autocast():
        for s in range(0, len(everything), 16):
            chunk = everything[s:s + 16]
            for it, lp in zip(chunk, summed_response_logprobs(model, chunk, pad, acc.device)):
                it.ref = lp.float()
    # 2. the policy: the same weights, trained (through LoRA where configured)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
        model.eval()
    if gc:  # Hugging Face models checkpoint in train mode only: that, with no dropout (LoRA's included)
        disable_dropout(model)
        model.train()
    # 3. train: the RM's loop, the implicit rewards in place of the reward head's
    steps = cfg.total_steps(len(items))

    def rewards(m, mb: Sequence[Item]) -> list[torch.Tensor]:
        return implicit_rewards(m, mb, pad, acc.device, cfg.beta)

    def held_out(m) -> dict:
        with acc.autocast():  # as the reference's log-probs were computed
            return heldout_metrics(m, eval_items, pad, acc.device, cfg.beta)

    model, last_eval = fit_rankings(cfg, run, acc, model, items, eval_items, steps, "dpo", rewards, held_out)
    if last_eval is None:  # stopped early (train.stop_after): rerun to resume
        return cfg.out_dir
    # 4. save the policy (LoRA merged), gathered whole if it was sharded
    whole = full_model(acc, model)
    if acc.is_main_process:
        with run.writing(run.path("model")):
            save_model(whole, tok, run.path("model"), consume=True)
    run.finish({"steps": steps, "prompts": len(items), "skipped": skipped, "beta": cfg.beta,
                **{k.replace("eval/", "eval_"): v for k, v in last_eval.items()}})
    return cfg.out_dir
