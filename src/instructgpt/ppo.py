"""PPO-ptx: reinforcement learning from the reward model, as InstructGPT did it (Ouyang et al. 2022, §3.5, Eq. 2):

    objective(phi) = E_{(x,y) ~ pi_phi}[ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_{x ~ D_pretrain}[ log pi_phi(x) ]

``instructgpt ppo``. Four models, as in the paper: the policy (from SFT), the reference (frozen SFT: the KL anchor),
the value model (from the reward model: its trunk and head, read at every token) and the reward model (frozen,
normalised). `ppo.value_model: policy` instead puts a zero-initialised value head on the policy's trunk
(lm-human-preferences) to save memory. One update, top to bottom in `train`:

    1. rollout: sample responses to a batch of prompts (logits / temperature; stop at EOS; pad != EOS)
    2. score: the frozen models run once per rollout -> old log-probs, reference log-probs, values, RM scores
    3. rewards = score at the last token - beta * KL per token (`ppo.kl_in_loss`: beta * KL in the loss instead);
       GAE (gamma = 1, lambda);  whitened advantages
       (`ppo.advantage_estimator` rloo / grpo: no value model; a response's return against the other responses to
       its prompt, at every token)
    4. PPO epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss (with a critic)
       + ptx_coef * LM loss on a pretraining batch, one objective, one optimizer step per minibatch
    5. log (objective/*, ppo/*), adapt beta, evaluate, checkpoint

Every departure from the paper is a config flag below, with a comment.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from instructgpt.advantages import (
    explained_variance,
    gae,
    group_advantages,
    kl_per_token,
    token_rewards,
    whiten,
)
from instructgpt.config import ConfigError, ModelConfig, StageConfig, TrainConfig
from instructgpt.generation import GREEDY_BELOW, is_greedy
from instructgpt.kl_control import AdaptiveKLController, FixedKLController
from instructgpt.losses import lm_loss, masked_mean, policy_loss, value_loss
from instructgpt.runs import StageRun

DEFAULT_PROMPTS = "builtin:task-prompts?split=train&n=4000&seed=1"
DEFAULT_PTX = "builtin:shakespeare?split=train"
DEFAULT_EVAL_PROMPTS = "builtin:task-prompts?split=heldout&n=128&seed=7"


@dataclass
class RewardModelConfig:
    # an `instructgpt rm` out_dir or its model/ directory; or "builtin:gold": the built-in task's gold labeler itself
    # as the reward (2 * gold - 1), an oracle run that shows what PPO gets from a perfect reward model (not RLHF)
    name_or_path: str | None = None


@dataclass
class PPOParams:
    kl_coef: float = 0.02  # beta; the paper's fixed value (App. C.4)
    kl_estimator: Literal["k1", "k3"] = "k1"  # k1 = log pi - log pi_ref, the paper's; k3 is never negative
    # beta * KL as a loss term on the policy's current log-probs (GRPO's, Shao et al. 2024, with k3) instead of a
    # penalty in the reward (the paper's)
    kl_in_loss: bool = False
    adaptive_kl: bool = False  # lm-human-preferences' controller instead of a fixed beta (the paper: fixed)
    kl_target: float = 6.0  # adaptive controller: target of sum_t KL per sequence
    kl_horizon: int = 10000  # adaptive controller: episodes
    ptx_coef: float = 27.8  # gamma of PPO-ptx (not GAE's gamma); 0 = plain PPO
    ptx_token_ratio: float = 8.0  # pretraining tokens per episode token in each minibatch (the paper: 8x)
    gamma: float = 1.0  # GAE discount (the paper: no discount)
    lam: float = 0.95  # GAE lambda (not stated by the paper; lm-human-preferences' value)
    # "gae" is the paper's: a value model and GAE. "rloo" / "grpo" drop the value model (a departure, as in OpenRLHF's
    # --advantage_estimator): each response's return (score - beta * its summed KL) against the other
    # ppo.samples_per_prompt responses to the same prompt, the same advantage at every token
    advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae"
    samples_per_prompt: int = 1  # k responses to each prompt in a rollout batch (rloo / grpo need k >= 2)
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 1  # the paper: 1 epoch of 8 minibatches (512 / 64)
    num_minibatches: int = 8
    whiten_rewards: bool = False
    whiten_advantages: bool = True  # over the whole rollout batch, response tokens only
    temperature: float = 1.0  # rollout sampling temperature (the paper: 1); log-probs use logits / temperature
    response_length: int = 32  # max new tokens per response
    missing_eos_penalty: float | None = -1.0  # score of a response that never emits EOS (None: the RM's score)
    value_model: Literal["reward_model", "policy"] = "reward_model"  # paper: a separate value model from the RM
    recompute_logprobs: bool = False  # old log-probs from a full forward after sampling instead of the sampler's
    value_lora: bool = False  # train the value model through LoRA (model.lora settings) instead of in full
    value_lr: float | None = None  # value model's lr (None: train.lr); the paper: 9e-6, fixed
    ema_decay: float | None = None  # EMA of the policy weights, saved as the final model (the paper: 0.992)
    eval_prompts: int = 128  # held-out prompts for the monitor (data.eval), every train.eval_every updates
    sample_every: int = 10  # every N updates, write a few (query, response, score, kl) to samples.jsonl
    keep_best: Literal["none", "gold", "reward"] = "none"  # keep the checkpoint with the best held-out gold score,
    # or ("reward") the best held-out RM score whose KL is within kl_budget; "none" keeps the last
    kl_budget: float | None = None


def _ppo_train() -> TrainConfig:
    # The paper: constant lr after a 10-iteration warmup; train.max_steps counts PPO updates (rollout batches),
    # train.batch_size episodes per update (the paper: 512), the scheduler steps once per update.
    return TrainConfig(max_steps=100, batch_size=64, lr=1e-5, warmup_steps=10, min_lr_ratio=1.0, log_every=1,
                       eval_every=10, save_every=10)


@dataclass
class PPOConfig(StageConfig):
    train: TrainConfig = field(default_factory=_ppo_train)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOParams = field(default_factory=PPOParams)

    def __post_init__(self):
        if self.data.train is None:
            self.data.train = DEFAULT_PROMPTS
        if self.data.eval is None:
            self.data.eval = DEFAULT_EVAL_PROMPTS

    @property
    def uses_critic(self) -> bool:
        """A value model (or head) and GAE: the paper's; rloo / grpo have none."""
        return self.ppo.advantage_estimator == "gae"

    def validate(self) -> None:
        super().validate()
        p = self.ppo
        if not self.reward_model.name_or_path:
            raise ConfigError("reward_model.name_or_path: required (an `instructgpt rm` out_dir or its model/)")
        if self.reward_model.name_or_path == GOLD_REWARD and p.value_model != "policy" and self.uses_critic:
            raise ConfigError(f"reward_model.name_or_path={GOLD_REWARD} has no network to start a value model from: "
                              "set ppo.value_model=policy")
        if self.train.batch_size % p.num_minibatches:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                              f"ppo.num_minibatches ({p.num_minibatches})")
        if self.train.batch_size % p.samples_per_prompt:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                              f"ppo.samples_per_prompt ({p.samples_per_prompt})")
        if not self.uses_critic and p.samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage_estimator={p.advantage_estimator} compares the responses to one prompt: "
                              f"set ppo.samples_per_prompt >= 2 (got {p.samples_per_prompt})")
        for k in ("ppo_epochs", "num_minibatches", "response_length", "samples_per_prompt"):
            if getattr(p, k) < 1:
                raise ConfigError(f"ppo.{k}: must be >= 1, got {getattr(p, k)}")
        if is_greedy(p.temperature):
            raise ConfigError(f"ppo.temperature: must be at least {GREEDY_BELOW} (log-probs divide by it; below, "
                              f"sampling is greedy), got {p.temperature}")
        if p.ptx_coef < 0 or p.kl_coef < 0:
            raise ConfigError("ppo.ptx_coef and ppo.kl_coef must be >= 0")
        if p.ptx_coef > 0 and not self.data.pretrain:
            raise ConfigError("data.pretrain: needed when ppo.ptx_coef > 0 (the ptx text); set ppo.ptx_coef=0 "
                              "for plain PPO")
        if p.ema_decay is not None and not 0 < p.ema_decay < 1:
            raise ConfigError(f"ppo.ema_decay: must be in (0, 1), got {p.ema_decay}")
        if p.keep_best == "reward" and p.kl_budget is None:
            raise ConfigError("ppo.kl_budget: needed with ppo.keep_best=reward")
        if self.train.mixed_precision != "no" and not p.recompute_logprobs:
            # the KV-cached sampler's low-precision log-probs differ from a full forward's by ~1e-2 per token: the
            # KL penalty and the first ratio would read that rounding as policy change
            raise ConfigError(f"train.mixed_precision={self.train.mixed_precision} needs ppo.recompute_logprobs=true "
                              "(old log-probs from the same full forward as the reference's and the update's)")


# --------------------------------------------------------------------------------------------------------------------
# The rollout record


@dataclass
class Rollout:
    """One batch of episodes. B episodes, P query positions (left-padded), R response positions (right-padded)."""

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P)
    response: torch.Tensor  # (B, R) sampled ids, pad after the end
    response_mask: torch.Tensor  # (B, R) bool: tokens the response has (EOS included)
    logprobs: torch.Tensor  # (B, R) log pi_old(token), logits / temperature, from a full forward
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(token), same temperature
    values: torch.Tensor  # (B, R) V(state before each response token)
    scores: torch.Tensor  # (B,) normalised RM score (or the missing-EOS penalty)
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    prompts: list  # B prompts (messages), for logging and the gold monitor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)  # (B, P+R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask.long(), self.response_mask.long()], 1)  # (B, P+R)

    def rows(self, idx: torch.Tensor) -> Rollout:
        pick = {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()])
                for k, v in self.__dict__.items()}
        return Rollout(**pick)


def response_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits that predict the response tokens (see `policy_forward(response_len=R)`), divided by the temperature."""
    return logits.float() / temperature  # (B, R, V)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: (B, R, V), (B, R) -> (B, R)."""
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ValueHead(torch.nn.Module):
    """A scalar head on the policy's last hidden state (`ppo.value_model: policy`); zero-initialised (checklist)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.head = torch.nn.Linear(d_model, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float()


def policy_forward(policy, input_ids, attention_mask, value_head: ValueHead | None = None,
                   response_len: int | None = None):
    """(logits, values (B, T) or None) with position ids that ignore left padding.

    With `response_len` = R the logits are only those predicting the last R tokens, (B, R, V): positions
    T-R-1 .. T-2, so the LM head never runs over the query (`logits_to_keep`). Otherwise (B, T, V).
    """
    from instructgpt.modeling import position_ids_from_mask

    kw = {"logits_to_keep": response_len + 1} if response_len is not None else {}
    out = policy(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                 output_hidden_states=value_head is not None, **kw)
    values = value_head(out.hidden_states[-1]) if value_head is not None else None
    logits = out.logits[:, :-1] if response_len is not None else out.logits
    return logits.float(), values  # fp32 log-probs under train.mixed_precision (a no-op in fp32)


# --------------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Models:
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled is the reference
    value: torch.nn.Module | None  # a *ForSequenceClassification model, or None with a value head on the policy
    value_head: ValueHead | None  # both None without a critic (ppo.advantage_estimator rloo / grpo)
    reward: object  # instructgpt.reward.RewardModel, or GoldReward
    tokenizer: object


def load_models(cfg: PPOConfig) -> Models:
    from instructgpt.modeling import apply_lora, disable_dropout, load_model
    from instructgpt.reward import RewardModel

    # model.gradient_checkpointing: Hugging Face models recompute activations in train mode only, so the updates run
    # in train mode (see train) and the trained models are loaded, and kept, without dropout
    gc = cfg.model.gradient_checkpointing
    policy, tok = load_model(replace(cfg.model, dropout=0.0) if gc else cfg.model, for_training=True)
    ref = None
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora)  # the frozen base with the adapter off is pi_ref
    else:
        ref, _ = load_model(cfg.model, with_tokenizer=False)
        ref.requires_grad_(False)
        if ref.get_input_embeddings().weight.shape[0] < len(tok):  # load_model added a pad token to the policy
            ref.resize_token_embeddings(len(tok))
    if cfg.reward_model.name_or_path == GOLD_REWARD:
        head = ValueHead(policy.get_input_embeddings().weight.shape[1]) if cfg.uses_critic else None
        return Models(policy, ref, None, head, GoldReward(), tok)
    rm = RewardModel.load(cfg.reward_model.name_or_path)
    rm.model.requires_grad_(False)
    if len(rm.tokenizer) != len(tok):
        raise ConfigError(f"reward_model.name_or_path: its tokenizer has {len(rm.tokenizer)} tokens, the policy's "
                          f"{len(tok)}; the reward model must be trained from the same SFT model")
    value, head = None, None  # both stay None without a critic (rloo / grpo)
    if cfg.uses_critic and cfg.ppo.value_model == "reward_model":
        # the paper: the value function is initialised from the reward model (trunk and head)
        rm_dir = cfg.reward_model.name_or_path
        if os.path.exists(os.path.join(rm_dir, "model", "config.json")):
            rm_dir = os.path.join(rm_dir, "model")
        value, _ = load_model(ModelConfig(name_or_path=rm_dir, dropout=0.0 if gc else None, gradient_checkpointing=gc),
                              for_training=True, with_tokenizer=False, model_class="sequence_classification")
        if cfg.ppo.value_lora:
            value = apply_lora(value, cfg.model.lora, task="seq_cls")
    elif cfg.uses_critic:
        head = ValueHead(policy.get_input_embeddings().weight.shape[1])
    # dropout off in every model (implementation-details checklist): eval mode, gradients still flow
    for m in (policy, ref, value, rm.model):
        if m is not None:
            m.eval()
    if gc:  # the two that then train in train mode: no dropout there either (LoRA's included)
        for m in (policy, value):
            if m is not None:
                disable_dropout(m)
    return Models(policy, ref, value, head, rm, tok)


GOLD_REWARD = "builtin:gold"


class GoldReward:
    """The built-in task's gold labeler with a reward model's `score` interface: 2 * gold - 1, in [-1, 1]."""

    model = None

    def score(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32) -> list[float]:
        from instructgpt import gold
        from instructgpt.prompting import as_messages

        users = [as_messages(p)[-1]["content"] for p in prompts]
        return [2.0 * gold.gold_score(u, r) - 1.0 for u, r in zip(users, responses)]


# --------------------------------------------------------------------------------------------------------------------
# 1-2. Rollout and scoring


@torch.no_grad()
def rollout(models: Models, policy, value, value_head, queries: Sequence[Sequence[int]], prompts: list,
            p: PPOParams, eos: list[int], pad: int, generator: torch.Generator, device) -> Rollout:
    """Sample one response per query and score it with the frozen models, each once."""
    from instructgpt.generation import SamplingParams, left_pad, sample
    from instructgpt.reward import token_values

    q, qm = left_pad(queries, pad, device)  # (B, P)
    P = q.shape[1]
    out = sample(policy, q, qm, SamplingParams(max_new_tokens=p.response_length, temperature=p.temperature),
                 eos, pad, generator)
    response = out.tokens  # (B, R)
    R = response.shape[1]
    rmask = torch.arange(R, device=device)[None, :] < out.lengths[:, None]  # (B, R)
    ids = torch.cat([q, response], 1)
    att = torch.cat([qm, rmask.long()], 1)
    values = None
    if p.recompute_logprobs or value_head is not None:
        # old log-probs from the same full forward the training step uses: the first ratio is exactly 1
        logits, values = policy_forward(policy, ids, att, value_head, response_len=R)
        logprobs = gather_logprobs(response_logits(logits, p.temperature), response)
        del logits
    else:
        # the sampler's own log-probs (logits / temperature, KV-cached forwards): equal to a full forward's up to
        # float rounding (~1e-6), and one policy forward per rollout cheaper (TRL reuses them the same way)
        logprobs = out.logprobs
    if models.ref is not None:
        ref_logits, _ = policy_forward(models.ref, ids, att, response_len=R)
    else:
        with policy.disable_adapter():
            ref_logits, _ = policy_forward(policy, ids, att, response_len=R)
    ref_logprobs = gather_logprobs(response_logits(ref_logits, p.temperature), response)
    del ref_logits
    if value is not None:
        values = token_values(value, ids, att)
    # (B, R): the value of the state before each response token; zeros without a critic
    values = values[:, P - 1:-1] if values is not None else torch.zeros_like(logprobs)
    # the reward model reads each response as it was trained: the decoded text after the prompt, ending the turn as
    # the template does (a chat template may add tokens after EOS, e.g. "<|im_end|>\n"); reading the policy's own
    # token ids at the EOS would score a position the RM never saw in training
    texts = [models.tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(response, rmask)]
    scores = torch.tensor(models.reward.score(prompts, texts, batch_size=len(texts)), device=device)
    if p.missing_eos_penalty is not None:
        scores = torch.where(out.ended, scores, torch.full_like(scores, p.missing_eos_penalty))
    return Rollout(q, qm, response, rmask, logprobs * rmask, ref_logprobs * rmask, values * rmask, scores,
                   out.ended, list(prompts))


# --------------------------------------------------------------------------------------------------------------------
# Held-out monitor (never used for training): gold score, RM score and KL to the reference


@torch.no_grad()
def monitor(models: Models, policy, cfg: PPOConfig, eval_prompts: list, device) -> dict:
    from instructgpt import gold
    from instructgpt.generation import SamplingParams, generate
    from instructgpt.prompting import render_prompt

    tok = models.tokenizer
    p = cfg.ppo
    texts = [render_prompt(tok, m) for m in eval_prompts]
    user = [m[-1]["content"] for m in eval_prompts]
    greedy = [c[0] for c in generate(policy, tok, texts, SamplingParams(max_new_tokens=p.response_length,
                                                                        temperature=0.0), batch_size=64)]
    sampled = [c[0] for c in generate(policy, tok, texts, SamplingParams(max_new_tokens=p.response_length,
                                                                         temperature=p.temperature, seed=cfg.seed),
                                      batch_size=64)]
    out = {"eval/rm_score": float(sum(models.reward.score(eval_prompts, [c.text for c in sampled])) / len(sampled)),
           "eval/rm_score_greedy": float(sum(models.reward.score(eval_prompts, [c.text for c in greedy]))
                                         / len(greedy))}
    # KL(pi || pi_ref) per sequence on the sampled responses: sum_t log pi - log pi_ref (k1, as the objective)
    from instructgpt.generation import left_pad
    from instructgpt.prompting import encode_prompt

    kls = []
    for s in range(0, len(sampled), 64):
        chunk = list(zip(eval_prompts[s:s + 64], sampled[s:s + 64]))
        q, qm = left_pad([encode_prompt(tok, m) for m, _ in chunk], tok.pad_token_id, device)
        resp = [c.token_ids or [tok.pad_token_id] for _, c in chunk]
        R = max(len(r) for r in resp)
        r = torch.full((len(chunk), R), tok.pad_token_id, dtype=torch.long, device=device)
        rm_ = torch.zeros((len(chunk), R), dtype=torch.bool, device=device)
        for i, ids in enumerate(resp):
            r[i, :len(ids)] = torch.tensor(ids, device=device)
            rm_[i, :len(ids)] = True
        ids, att = torch.cat([q, r], 1), torch.cat([qm, rm_.long()], 1)
        lp = gather_logprobs(response_logits(policy_forward(policy, ids, att, response_len=R)[0], p.temperature), r)
        if models.ref is not None:
            ref_logits = policy_forward(models.ref, ids, att, response_len=R)[0]
        else:
            with policy.disable_adapter():
                ref_logits = policy_forward(policy, ids, att, response_len=R)[0]
        rlp = gather_logprobs(response_logits(ref_logits, p.temperature), r)
        kls += ((lp - rlp) * rm_).sum(-1).tolist()
    out["eval/kl"] = sum(kls) / len(kls)
    if all(gold.suite_of(u) for u in user):
        out["eval/gold_score"] = sum(gold.gold_score(u, c.text) for u, c in zip(user, sampled)) / len(sampled)
        out["eval/gold_score_greedy"] = sum(gold.gold_score(u, c.text) for u, c in zip(user, greedy)) / len(greedy)
    return out


# --------------------------------------------------------------------------------------------------------------------
# EMA of the policy weights (the paper: 0.992)


class EMA:
    """The moving average, in fp32, of the parameters that train: with LoRA the adapters (and a value head on the
    policy), not a second full copy of the frozen base, which would cost as much memory as the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the averaged parameters into `model` (the one the EMA was made from)."""
        params = dict(model.named_parameters())
        for n, v in self.shadow.items():
            params[n].copy_(v.to(params[n].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.shadow = state["decay"], state["shadow"]


# --------------------------------------------------------------------------------------------------------------------
# The loop


def _prompt_ids(cfg: PPOConfig, tok, source: str, limit: int | None = None,
                skip_bad: bool = False) -> tuple[list, list[list[int]], int]:
    """Prompts and their token ids; too long or bad ones are an error, or counted skips with `skip_bad`."""
    from instructgpt.data import DataError, load_prompts
    from instructgpt.prompting import encode_prompt

    skip_bad = skip_bad or cfg.data.skip_bad_lines
    records = load_prompts(source, skip_bad=skip_bad)
    prompts, ids, skipped = [], [], records.skipped
    for r in records:
        q = encode_prompt(tok, r.messages)
        if len(q) > cfg.data.max_length:
            if not skip_bad:
                raise DataError(r.file, r.line, "prompt",
                                f"prompt is {len(q)} tokens, longer than data.max_length={cfg.data.max_length}")
            skipped += 1
            continue
        prompts.append(r.messages)
        ids.append(q)
        if limit and len(ids) >= limit:
            break
    if not ids:
        raise ConfigError(f"data: no usable prompts in {source}")
    return prompts, ids, skipped


def _lr_lambda(t: TrainConfig):
    from instructgpt.sft import cosine_lr_factor

    return lambda s: cosine_lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)


def train(cfg: PPOConfig) -> str:
    """Run PPO(-ptx); returns the out_dir. Rerun on the same out_dir to resume."""
    from instructgpt.generation import eos_ids
    from instructgpt.modeling import check_context, save_model, set_seed
    from instructgpt.progress import StageProgress
    from instructgpt.sft import (
        checkpoint_or_stop,
        fused_adam_ok,
        make_accelerator,
        pretrain_blocks,
        resume_step,
        stream_indices,
    )

    cfg.validate()
    acc = make_accelerator(cfg)
    run = StageRun(cfg, "ppo", acc)
    if run.prepare() == "done":
        acc.print(f"[ppo] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    t, p = cfg.train, cfg.ppo
    world, rank = acc.num_processes, acc.process_index
    if t.batch_size % (world * p.num_minibatches) or (t.batch_size // p.samples_per_prompt) % world:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of processes x ppo.num_minibatches "
                          f"({world} x {p.num_minibatches}), and its prompts (train.batch_size / "
                          f"ppo.samples_per_prompt) of processes ({world})")

    # models: policy, reference, value, reward; the frozen ones only move to the device
    models = load_models(cfg)
    tok = models.tokenizer
    check_context(models.policy, cfg.data.max_length)  # every ptx block is data.max_length tokens long
    eos, pad = eos_ids(models.policy, tok), tok.pad_token_id
    critic = models.value if models.value is not None else models.value_head  # None: rloo / grpo
    trainable = [models.policy] + ([critic] if critic is not None else [])
    params_pi = [q for q in models.policy.parameters() if q.requires_grad]
    params_v = [q for q in critic.parameters() if q.requires_grad] if critic is not None else []
    adam = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps, "weight_decay": t.weight_decay,
            "fused": fused_adam_ok(models.policy)}
    if models.value is not None:
        opt = torch.optim.AdamW(params_pi, lr=t.lr, **adam)
        vopt = torch.optim.AdamW(params_v, lr=p.value_lr or t.lr, **adam)
    else:  # one optimizer over the policy and its value head, if any
        opt = torch.optim.AdamW([{"params": params_pi}]
                                + ([{"params": params_v, "lr": p.value_lr or t.lr}] if params_v else []),
                                lr=t.lr, **adam)
        vopt = None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t))
    vsched = torch.optim.lr_scheduler.LambdaLR(vopt, _lr_lambda(t)) if vopt is not None else None
    prepared = acc.prepare(*trainable, opt, *([vopt] if vopt else []))
    policy, opt = prepared[0], prepared[len(trainable)]
    value_module = prepared[1] if critic is not None else None
    vopt = prepared[-1] if vopt is not None else None
    value = value_module if models.value is not None else None
    value_head = value_module if models.value is None else None
    for m in (models.ref, getattr(models.reward, "model", None)):
        if m is not None:
            m.to(acc.device)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.kl_coef))
    acc.register_for_checkpointing(sched, kl_ctl)
    if vsched is not None:
        acc.register_for_checkpointing(vsched)
    ema = EMA(acc.unwrap_model(policy), p.ema_decay) if p.ema_decay else None
    if ema is not None:
        acc.register_for_checkpointing(ema)

    def set_training(mode: bool) -> None:
        """Eval mode (no dropout) everywhere but the updates with model.gradient_checkpointing, which Hugging Face
        models apply in train mode only (their dropout is 0: load_models)."""
        for m in (policy, value):
            if m is not None:
                m.train(mode)

    # data: training prompts, held-out prompts for the monitor, ptx text blocks
    prompts, queries, skipped = _prompt_ids(cfg, tok, cfg.data.train)
    # the monitor's prompts: optional, so too-long ones are skipped rather than stopping the run
    eval_prompts = _prompt_ids(cfg, tok, cfg.data.eval, p.eval_prompts, skip_bad=True)[0] if p.eval_prompts else []
    ptx_blocks = None
    if p.ptx_coef > 0:
        ptx_blocks = pretrain_blocks(tok, cfg.data)

    state = {"step": 0, "ptx_pos": 0, "episodes": 0, "best": None, "best_step": None}
    start = resume_step(run, acc, "ppo")
    if start:
        with open(os.path.join(run.checkpoint_dir(), "trainer_state.json"), encoding="utf-8") as fh:
            state.update(json.load(fh))
    mb_size = t.batch_size // world // p.num_minibatches
    local = t.batch_size // world
    unwrapped = acc.unwrap_model(policy)

    def evaluate_and_keep(done: int) -> dict:
        if not eval_prompts:
            return {}
        with acc.autocast():
            ev = monitor(models, unwrapped, cfg, eval_prompts, acc.device)
        key = {"gold": "eval/gold_score_greedy", "reward": "eval/rm_score"}.get(p.keep_best)
        if key and key in ev and acc.is_main_process:
            ok = p.keep_best != "reward" or ev["eval/kl"] <= p.kl_budget
            if ok and (state["best"] is None or ev[key] > state["best"]):
                state["best"], state["best_step"] = ev[key], done
                save_model(unwrapped, tok, run.path("best_model"))
        return ev

    if start == 0 and eval_prompts:
        run.log(0, evaluate_and_keep(0))
    t0, episodes_t0 = time.time(), state["episodes"]
    with StageProgress("ppo", total=t.max_steps, start=start, enabled=acc.is_main_process) as bar:
        for step in range(start, t.max_steps):
            t_update = time.time()
            # 1. rollout: this update's prompts are a pure function of the step (exact resume); each rank its share,
            # each prompt ppo.samples_per_prompt times in consecutive rows
            k = p.samples_per_prompt
            idx = stream_indices(len(queries), step * t.batch_size // k, t.batch_size // k, cfg.seed)[rank::world]
            idx = [i for i in idx for _ in range(k)]
            gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
            set_training(False)
            with acc.autocast():  # train.mixed_precision: the frozen models' forwards in the same precision
                b = rollout(models, unwrapped, value, value_head, [queries[i] for i in idx],
                            [prompts[i] for i in idx], p, eos, pad, gen, acc.device)
            mask = b.response_mask
            # 2. rewards: score at the last token - beta * KL per token (the paper's Eq. 2, per token)
            kl = kl_per_token(b.logprobs, b.ref_logprobs, p.kl_estimator) * mask
            scores = b.scores
            rewards, non_score = token_rewards(scores, kl, 0.0 if p.kl_in_loss else kl_ctl.value, mask)
            if p.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            # 3. GAE (gamma = 1 by default), or a response's return against its prompt's other responses at every
            # token (rloo / grpo); then advantage whitening
            if cfg.uses_critic:
                advantages, returns = gae(rewards, b.values, mask, p.gamma, p.lam)
            else:
                adv = group_advantages((rewards * mask).sum(-1), k, p.advantage_estimator)
                advantages, returns = adv[:, None] * mask, None
            if p.whiten_advantages:
                advantages = whiten(advantages, mask)
            # 4. PPO epochs over shuffled minibatches, ptx in the same objective
            set_training(cfg.model.gradient_checkpointing)
            stats: dict[str, list[float]] = {}
            for epoch in range(p.ppo_epochs):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
                perm = torch.randperm(local, generator=g)
                for m in range(p.num_minibatches):
                    mb_idx = perm[m * mb_size:(m + 1) * mb_size].to(acc.device)
                    mb = b.rows(mb_idx)
                    mb_mask, mb_adv = mask[mb_idx], advantages[mb_idx]
                    P = mb.query.shape[1]
                    ids, att = mb.input_ids, mb.attention_mask
                    with acc.autocast():
                        logits, vals = policy_forward(policy, ids, att, value_head, response_len=mb.response.shape[1])
                    scaled = response_logits(logits, p.temperature)
                    new_logprobs = gather_logprobs(scaled, mb.response)
                    if epoch == 0:  # the policy's entropy on the rollouts, before (or barely after) this update
                        with torch.no_grad():
                            stats.setdefault("objective/entropy", []).append(
                                float(masked_mean(entropy_from_logits(scaled), mb_mask)))
                    del logits, scaled
                    if value is not None:
                        from instructgpt.reward import token_values

                        with acc.autocast():
                            vals = token_values(value, ids, att)
                    pg_loss, pg_stats = policy_loss(new_logprobs, mb.logprobs, mb_adv, mb_mask, p.cliprange)
                    loss = pg_loss
                    if p.kl_in_loss:
                        kl_loss = masked_mean(kl_per_token(new_logprobs, mb.ref_logprobs, p.kl_estimator), mb_mask)
                        loss = loss + kl_ctl.value * kl_loss
                    if value_module is not None:
                        vf_loss, vf_stats = value_loss(vals[:, P - 1:-1], mb.values, returns[mb_idx], mb_mask,
                                                       p.cliprange_value)
                        loss = loss + p.vf_coef * vf_loss
                    ptx = torch.zeros(())
                    if ptx_blocks is not None:
                        # gamma * E_pretrain[log pi(x)] in the same objective, ptx_token_ratio x the episode tokens
                        n_tokens = float(att.sum())
                        n_rows = max(1, math.ceil(p.ptx_token_ratio * n_tokens / cfg.data.max_length))
                        rows = stream_indices(len(ptx_blocks), state["ptx_pos"] + n_rows * rank, n_rows, cfg.seed + 1)
                        state["ptx_pos"] += n_rows * world
                        px = ptx_blocks.ids[rows].long().to(acc.device)
                        pm = torch.ones_like(px)
                        with acc.autocast():
                            ptx = lm_loss(policy_forward(policy, px, pm)[0], px, pm)
                        loss = loss + p.ptx_coef * ptx
                    acc.backward(loss)
                    if t.max_grad_norm:  # each network clipped on its own
                        acc.clip_grad_norm_(policy.parameters(), t.max_grad_norm)
                        if value_module is not None:
                            acc.clip_grad_norm_(value_module.parameters(), t.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if vopt is not None:
                        vopt.step()
                        vopt.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(unwrapped)
                    logged = {"ppo/policy/approxkl": pg_stats["approxkl"], "ppo/policy/clipfrac": pg_stats["clipfrac"],
                              "ppo/loss/policy": pg_loss, "ppo/loss/ptx": ptx, "ppo/val/ratio": pg_stats["ratio"]}
                    if value_module is not None:
                        logged.update({"ppo/val/clipfrac": vf_stats["clipfrac"], "ppo/loss/value": vf_loss})
                    if p.kl_in_loss:
                        logged["ppo/loss/kl"] = kl_loss
                    for name, v in logged.items():
                        stats.setdefault(name, []).append(float(v.detach()))
            set_training(False)  # the monitor and the next rollout sample with a KV cache
            sched.step()
            if vsched is not None:
                vsched.step()
            # 5. log, adapt beta, evaluate, checkpoint
            seq_kl = float(acc.reduce(kl.sum(-1).mean(), "mean"))
            kl_ctl.update(seq_kl, t.batch_size)
            state["episodes"] += t.batch_size
            done = step + 1
            update_s = time.time() - t_update
            eps = (state["episodes"] - episodes_t0) / max(time.time() - t0, 1e-9)
            metrics = {
                "objective/kl": seq_kl,
                "objective/scores": float(acc.reduce(scores.mean(), "mean")),
                "objective/rlhf_reward": float(acc.reduce((scores + non_score.sum(-1)).mean(), "mean")),
                "objective/non_score_reward": float(acc.reduce(non_score.sum(-1).mean(), "mean")),
                **({"ppo/val/var_explained": explained_variance(b.values, returns, mask)} if cfg.uses_critic else {}),
                "ppo/mean_response_length": float(mask.sum(-1).float().mean()),
                "ppo/eos_rate": float(b.ended.float().mean()),
                "ppo/kl_coef": kl_ctl.value, "ppo/lr": sched.get_last_lr()[0],
                "time/update_s": update_s, "time/episodes_per_s": eps,
                **{k: sum(v) / len(v) for k, v in stats.items()},
            }
            gold = _gold_scores(b.prompts, tok, b.response, mask)
            if gold is not None:
                metrics["objective/gold_score"] = gold  # monitor only: never enters the reward
            if eval_prompts and (done % t.eval_every == 0 or done == t.max_steps):
                metrics.update(evaluate_and_keep(done))
            bar.update(done, score=metrics["objective/scores"], kl=seq_kl,
                       **({"gold": metrics["objective/gold_score"]} if gold is not None else {}))
            if done % t.log_every == 0 or done == t.max_steps or any(k.startswith("eval/") for k in metrics):
                run.log(done, metrics)
            if p.sample_every and (done % p.sample_every == 0 or done == 1) and acc.is_main_process:
                _write_samples(run, done, b, kl, tok)
            state["step"] = done
            if checkpoint_or_stop(run, acc, t, done, t.max_steps, "ppo", state):
                return cfg.out_dir

    # final model: the best kept checkpoint, else the EMA weights, else the last policy
    if acc.is_main_process:
        final = acc.unwrap_model(policy)
        if ema is not None:
            ema.copy_to(final)
        if state["best_step"] is not None and os.path.exists(run.path("best_model")):
            from instructgpt.modeling import replace_dir

            replace_dir(run.path("best_model"), run.path("model"))
        else:
            save_model(final, tok, run.path("model"), consume=True)
    run.finish({"updates": t.max_steps, "episodes": state["episodes"], "skipped": skipped,
                "kl_coef": kl_ctl.value, "best": state["best"], "best_step": state["best_step"]})
    return cfg.out_dir


def _gold_scores(prompts: list, tok, response: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Mean gold score of the rollouts when every prompt is from a built-in suite (else None)."""
    from instructgpt import gold

    users = [m[-1]["content"] for m in prompts]
    if not all(gold.suite_of(u) for u in users):
        return None
    texts = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(response, mask)]
    return sum(gold.gold_score(u, x) for u, x in zip(users, texts)) / len(texts)


def _write_samples(run: StageRun, step: int, b: Rollout, kl: torch.Tensor, tok, n: int = 4) -> None:
    rows = []
    for i in range(min(n, len(b.prompts))):
        text = tok.decode(b.response[i][b.response_mask[i]].tolist(), skip_special_tokens=True)
        rows.append({"step": step, "query": b.prompts[i][-1]["content"], "response": text,
                     "score": round(float(b.scores[i]), 4), "kl": round(float(kl[i].sum()), 4)})
    with open(run.path("samples.jsonl"), "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


# --------------------------------------------------------------------------------------------------------------------
# Benchmark entry point (benchmarks/run.py races this against TRL's PPOTrainer)


def benchmark_update(policy_dir: str, reward_dir: str, batch_size: int, response_length: int, ppo_epochs: int,
                     num_minibatches: int, updates: int, overrides: Sequence[str] = ()) -> dict:
    """Run `updates` plain-PPO updates (no ptx, no monitor) and time them: {episodes_per_s, seconds_per_update};
    `overrides` (``key=value``) go last, e.g. ``ppo.advantage_estimator=rloo`` for the critic-free race."""
    import tempfile

    from instructgpt.config import load_config
    from instructgpt.runs import read_metrics

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(PPOConfig, None, [
            f"model.name_or_path={policy_dir}", f"reward_model.name_or_path={reward_dir}",
            f"train.max_steps={updates}", f"train.batch_size={batch_size}", "train.save_every=0",
            "train.warmup_steps=0", f"ppo.response_length={response_length}", f"ppo.ppo_epochs={ppo_epochs}",
            f"ppo.num_minibatches={num_minibatches}", "ppo.ptx_coef=0", "ppo.eval_prompts=0", "ppo.sample_every=0",
            f"out_dir={d}/ppo", *overrides])
        train(cfg)
        rows = [r for r in read_metrics(f"{d}/ppo") if "time/update_s" in r]
    secs = [r["time/update_s"] for r in rows]
    return {"episodes_per_s": batch_size * len(secs) / sum(secs), "seconds_per_update": secs,
            "mean_response_length": sum(r["ppo/mean_response_length"] for r in rows) / len(rows)}
