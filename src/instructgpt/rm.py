"""``instructgpt rm``: the reward model from K-way human rankings (the paper's step 2).

As the paper: the backbone starts from the SFT model with a scalar head; one batch element is one prompt with all
C(K,2) comparisons of its ranking, each of the K responses forwarded once (never the (K-1)/2-fold duplication of
expanding rankings to pairs); ``train.batch_size`` counts prompts (the paper: 64); one epoch by default (more
overfits); cosine decay to 10%. After training a bias makes the demonstrations' mean reward 0 (the paper), and an
optional gain makes SFT-policy samples' std 1 (lm-human-preferences); both are saved beside the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from instructgpt.batching import length_groups, right_pad
from instructgpt.config import ConfigError, TrainConfig
from instructgpt.data import check_sources, load_demonstrations
from instructgpt.generation import SamplingParams, generate
from instructgpt.losses import ranking_accuracy, ranking_loss
from instructgpt.modeling import apply_lora, check_context, load_model, require_decoder_only, save_model, set_seed
from instructgpt.prompting import render_prompt
from instructgpt.rankings import Encoded, RankingStageConfig, fit_rankings, load_ranking_items, read_rankings
from instructgpt.reward import (RewardNorm, encode_pair, grouped_last_token_rewards, init_reward_head,
                                last_token_rewards, raw_rewards, trunk_and_head)
from instructgpt.runs import StageRun, releases_out_dir
from instructgpt.training import full_model, length_groups_for, make_accelerator


@dataclass
class NormalizeConfig:
    demonstrations: Optional[str] = "builtin:task-demos"  # bias: their mean reward becomes 0 (None: no bias)
    max_demonstrations: int = 1000
    policy: Optional[str] = None  # gain: sample this model (e.g. the SFT model) and scale rewards to std 1
    policy_samples: int = 256


def _rm_train() -> TrainConfig:
    return TrainConfig(max_steps=0, batch_size=16, lr=5e-4, log_every=10, eval_every=50, save_every=100)


@dataclass
class RMConfig(RankingStageConfig):
    train: TrainConfig = field(default_factory=_rm_train)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)


def forward_rankings(model, items: Sequence[Encoded], pad_token_id: int, device,
                     groups: int = 1) -> list[torch.Tensor]:
    """Rewards of every response of every prompt in one forward pass: each response exactly once. -> [(K_i,)].
    `groups` > 1: the responses in up to that many forwards of similar length, each padded to its own longest
    (`train.length_groups`), the same rewards."""
    rows = [s for it in items for s in it.seqs]
    if groups == 1:
        rewards = last_token_rewards(model, *right_pad(rows, pad_token_id, device))  # (sum K_i,)
    else:
        rewards = grouped_last_token_rewards(model, rows, length_groups([len(r) for r in rows], groups), pad_token_id,
                                             device)
    return list(torch.split(rewards, [len(it.seqs) for it in items]))


@torch.no_grad()
def heldout_metrics(model, items: Sequence[Encoded], pad_token_id: int, device, batch_size: int = 16,
                    groups: int = 1) -> dict:
    was = model.training
    model.eval()
    right = total = 0
    loss_sum = 0.0
    all_r: list[float] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        for it, r in zip(chunk, forward_rankings(model, chunk, pad_token_id, device, groups)):
            a, n = ranking_accuracy(r.tolist(), it.ranks)
            right, total = right + a, total + n
            loss_sum += float(ranking_loss(r, it.ranks))
            all_r += r.tolist()
    model.train(was)
    t = torch.tensor(all_r)
    return {"eval/accuracy": right / max(total, 1), "eval/loss": loss_sum / max(len(items), 1),
            "eval/reward_mean": float(t.mean()), "eval/reward_std": float(t.std()) if len(t) > 1 else 0.0}


def fit_normalization(model, tokenizer, cfg: NormalizeConfig, prompts: Sequence, device,
                      max_length: Optional[int] = None) -> RewardNorm:
    """Bias: mean raw reward of the demonstrations (-> 0), those longer than `max_length` tokens (the RM's
    data.max_length) left out: the model could not score them. Gain (optional): 1 / std of SFT-policy samples."""
    norm = RewardNorm()
    model.eval()
    if cfg.demonstrations:
        demos = list(load_demonstrations(cfg.demonstrations))[: cfg.max_demonstrations]
        pairs = [(d.messages[:-1], d.messages[-1]["content"]) for d in demos if d.messages[-1]["role"] == "assistant"]
        fit = [(p, r) for p, r in pairs if max_length is None or len(encode_pair(tokenizer, p, r)) <= max_length]
        if not fit:
            raise ConfigError(f"normalize.demonstrations: none of the {len(pairs)} demonstrations of "
                              f"{cfg.demonstrations} fits data.max_length={max_length}")
        if len(fit) < len(pairs):
            print(f"rm: normalisation over {len(fit)} of {len(pairs)} demonstrations (the rest are longer than "
                  f"data.max_length={max_length})", file=sys.stderr)
        norm.bias = float(raw_rewards(model, tokenizer, [p for p, _ in fit], [r for _, r in fit], device).mean())
    if cfg.policy:
        policy, ptok = load_model(cfg.policy)
        policy.to(device)  # sampled where the reward model is
        ps = list(prompts)[: cfg.policy_samples]
        outs = generate(policy, ptok, [render_prompt(ptok, p) for p in ps], SamplingParams(temperature=1.0, seed=0))
        r = raw_rewards(model, tokenizer, ps, [o[0].text for o in outs], device) - norm.bias
        norm.gain = float(1.0 / max(float(r.std()), 1e-6))
    return norm


def data_sources(cfg: RMConfig) -> list[str | None]:
    """The data the run reads (None: none there): rankings, held-out ones, the normalisation's demonstrations."""
    return [cfg.data.train, cfg.data.eval, cfg.normalize.demonstrations]


@releases_out_dir
def train(cfg: RMConfig) -> str:
    require_decoder_only(cfg.model, "rm")
    acc = make_accelerator(cfg)
    run = StageRun(cfg, "rm", acc)
    if run.prepare() == "done":
        acc.print(f"[rm] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    check_sources(*data_sources(cfg))
    read = read_rankings(cfg)  # before the model loads: a bad line is named first
    # 1. backbone from the SFT model, a fresh scalar head
    model, tok = load_model(cfg.model, for_training=True, model_class="sequence_classification")
    check_context(model, cfg.data.max_length)
    init_reward_head(model.score)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora, task="seq_cls")  # the head trains in full, the trunk through LoRA
    # 2. rankings -> (K responses, ranks) per prompt
    rankings, items, eval_items, skipped = load_ranking_items(cfg, read, tok)
    steps = cfg.total_steps(len(items))
    # 3. train: a batch of prompts a step, each prompt's C(K,2) comparisons one element, each response forwarded once
    # train.length_groups (as SFT's): each batch's responses forwarded in groups of similar length, one backward
    # through all of them. One group with several processes (DDP readies a parameter's gradient once a backward) or
    # under DeepSpeed or FSDP
    groups = length_groups_for(cfg.train, acc, model, one_process_only=True)
    model.train()
    model, last_eval = fit_rankings(cfg, run, acc, model, items, eval_items, steps, "rm",
                                    lambda m, mb: forward_rankings(m, mb, tok.pad_token_id, acc.device, groups),
                                    lambda m: heldout_metrics(m, eval_items, tok.pad_token_id, acc.device,
                                                              groups=groups),
                                    roots=trunk_and_head(model))  # what the rewards call, not the model's forward
    if last_eval is None:  # stopped early (train.stop_after): rerun to resume
        return cfg.out_dir
    # 4. normalise (every process, in step: a sharded model's forwards are collective), save the model gathered whole
    norm = fit_normalization(acc.unwrap_model(model), tok, cfg.normalize, [r.messages for r in rankings], acc.device,
                             cfg.data.max_length)
    whole = full_model(acc, model)
    if acc.is_main_process:
        with run.writing(run.path("model")):
            save_model(whole, tok, run.path("model"), consume=True)
            norm.save(run.path("model"))
    run.finish({"steps": steps, "prompts": len(items), "skipped": skipped, "bias": norm.bias, "gain": norm.gain,
                **{k.replace("eval/", "eval_"): v for k, v in last_eval.items()}})
    return cfg.out_dir
