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

Every departure from the paper is a config flag (`ppo_config`), with a comment.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace

import torch
from accelerate.utils import DistributedType

from instructgpt.advantages import explained_variance, gae, group_advantages, kl_per_token, token_rewards, whiten
from instructgpt.batching import left_pad, length_groups, pretrain_blocks, prompt_ids
from instructgpt.config import ConfigError, ModelConfig
from instructgpt.data import check_sources, load_prompts
from instructgpt.files import replace_dir
from instructgpt.generation import (SamplingParams, autocast, eos_ids, frozen_linears_in_bf16, sample,
                                    use_matmul_attention)
from instructgpt.judges import GOLD, GoldJudge, JudgeReward, judge_for
from instructgpt.kl_control import AdaptiveKLController, FixedKLController
from instructgpt.losses import lm_loss, masked_mean, policy_loss, value_loss
from instructgpt.modeling import (apply_lora, check_context, disable_dropout, load_model, logprobs_from_logits,
                                  mlps_skip_padding, require_decoder_only, resolve_path, save_model, scaled_logits,
                                  set_seed)
from instructgpt.monitor import heldout_metrics
from instructgpt.policy import Critic, ValueHead, entropy_from_logits, policy_forward, ref_logits
from instructgpt.ppo_config import PPOConfig, PPOParams
from instructgpt.progress import StageProgress
from instructgpt.reward import RewardModel, trunk_and_head
from instructgpt.rollout_engine import ENGINES, pad_responses, row_seed
from instructgpt.runs import StageRun, releases_out_dir
from instructgpt.training import (EMA, SHARDED_STATE, adamw, checkpoint_or_stop, checkpoint_sharded, fsdp_sharding,
                                  full_model, fused_adam_ok, length_groups_for, lr_schedule, make_accelerator,
                                  preemptible, resume_step, shard_model, stream_indices)

# --------------------------------------------------------------------------------------------------------------------
# The rollout record


@dataclass
class Rollout:
    """One batch of episodes. B episodes, P query positions (left-padded), R response positions (right-padded)."""

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P)
    response: torch.Tensor  # (B, R) sampled ids, pad after the end
    mask: torch.Tensor  # (B, R) bool: tokens the response has (EOS included)
    logprobs: torch.Tensor  # (B, R) log pi_old(token), logits / temperature
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(token), same temperature
    values: torch.Tensor  # (B, R) V(state before each response token); zeros without a critic
    scores: torch.Tensor  # (B,) normalised RM score (or the missing-EOS penalty)
    ended: torch.Tensor  # (B,) bool: the response emitted EOS
    prompts: list  # B prompts (messages), for logging and the judge
    texts: list  # B decoded responses, as the reward model read them
    advantages: torch.Tensor | None = None  # (B, R) filled in step 3
    returns: torch.Tensor | None = None  # (B, R) value targets (GAE); None without a critic
    # the first epoch's first minibatch's parts, forwarded in the scoring with their graphs (ppo.reuse_rollout_forwards)
    graphs: list[KeptForward] | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)  # (B, P+R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask.long(), self.mask.long()], 1)  # (B, P+R)

    def rows(self, idx: torch.Tensor) -> Rollout:
        """The minibatch of rows `idx`."""
        def pick(v):
            if isinstance(v, torch.Tensor):
                return v[idx]
            return None if v is None else [v[i] for i in idx.tolist()]

        return Rollout(**{k: None if k == "graphs" else pick(v) for k, v in self.__dict__.items()})

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in all of them (see `unpadded_columns`): the same
        log-probs, values and losses, over fewer positions."""
        lead, r = unpadded_columns(self.query_mask, self.mask)
        return Rollout(**{k: (v[:, lead:] if k in ("query", "query_mask") else
                              v[:, :r] if isinstance(v, torch.Tensor) and v.dim() == 2 else
                              None if k == "graphs" else v)
                          for k, v in self.__dict__.items()})


@dataclass
class KeptForward:
    """One part of the first epoch's first minibatch as the rollout's scoring forwarded it, with gradients on: the same
    weights and rows as the update's forward of that part would see (`ppo.reuse_rollout_forwards`)."""

    logprobs: torch.Tensor | None  # (n, r) the policy's response log-probs (ppo.recompute_logprobs), else None
    values: torch.Tensor | None  # (n, r) values of the states before the response tokens; None without a critic
    entropy: torch.Tensor | None  # (n, r) the policy's entropy at each response position, with logprobs


def minibatch_parts(query_mask: torch.Tensor, mask: torch.Tensor, rows: list[int], n_groups: int) -> list[list[int]]:
    """The batch rows `rows` (a minibatch, in its order) in the groups its forwards run in: up to `n_groups` groups of
    similar query and response length (`train.length_groups`), each in the minibatch's order; one at n_groups = 1."""
    if n_groups == 1:
        return [rows]
    lengths = list(zip(query_mask[rows].sum(1).tolist(), mask[rows].sum(1).tolist()))  # (query, response)
    return [[rows[j] for j in g] for g in length_groups(lengths, n_groups)]


def epoch_order(seed: int, step: int, epoch: int, batch_size: int) -> list[int]:
    """The whole rollout batch's rows in the order PPO epoch `epoch` of update `step` cuts into minibatches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + epoch)
    return torch.randperm(batch_size, generator=g).tolist()


def unpadded_columns(query_mask: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(lead, r) for rows of left-padded queries and right-padded responses: the first `lead` query columns are
    padding in every row, and no response is longer than `r` (at least 1). Dropping those columns changes no real
    token's result: position ids ignore left padding, and the attention is causal."""
    lead = int((query_mask.sum(0) == 0).long().cumprod(0).sum())
    return lead, max(1, int(mask.sum(1).max()))


# --------------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class Models:
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # None with LoRA: the policy with its adapter disabled is the reference
    critic: Critic | None  # None without one (ppo.advantage_estimator rloo / grpo)
    reward: RewardModel | JudgeReward
    tokenizer: object


def load_models(cfg: PPOConfig) -> Models:
    # model.gradient_checkpointing: Hugging Face models recompute activations in train mode only, so the updates run
    # in train mode (see train) and the trained models are loaded, and kept, without dropout
    ckpt = cfg.model.gradient_checkpointing
    policy, tok = load_model(replace(cfg.model, dropout=0.0) if ckpt else cfg.model, for_training=True)
    ref = None
    ref_path = cfg.reference_model.name_or_path or cfg.model.name_or_path  # pi_ref: the start model unless named
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora)  # the frozen base with the adapter off is pi_ref, unless another
    if not cfg.model.lora.enabled or ref_path != cfg.model.name_or_path:  # model is named as the reference
        ref, _ = load_model(replace(cfg.model, name_or_path=ref_path), with_tokenizer=False)
        ref.requires_grad_(False)
        if ref.get_input_embeddings().weight.shape[0] < len(tok):  # load_model added a pad token to the policy
            ref.resize_token_embeddings(len(tok))
        if ref.get_input_embeddings().weight.shape != policy.get_input_embeddings().weight.shape:
            raise ConfigError(f"reference_model.name_or_path={ref_path}: its vocabulary or width "
                              f"{tuple(ref.get_input_embeddings().weight.shape)} is not the policy's "
                              f"{tuple(policy.get_input_embeddings().weight.shape)} (the KL compares their "
                              "log-probs token by token)")
    d_model = policy.get_input_embeddings().weight.shape[1]
    if cfg.reward_model.name_or_path == GOLD:
        critic = Critic(ValueHead(d_model)) if cfg.uses_critic else None
        return Models(policy, ref, critic, JudgeReward(GoldJudge()), tok)
    rm = RewardModel.load(cfg.reward_model.name_or_path)
    rm.model.requires_grad_(False)
    if len(rm.tokenizer) != len(tok):
        raise ConfigError(f"reward_model.name_or_path: its tokenizer has {len(rm.tokenizer)} tokens, the policy's "
                          f"{len(tok)}; the reward model must be trained from the same SFT model")
    value = None
    if cfg.uses_critic and cfg.ppo.value_model == "reward_model":
        # the paper: the value function is initialised from the reward model (trunk and head)
        rm_dir = cfg.reward_model.name_or_path
        if os.path.exists(os.path.join(rm_dir, "model", "config.json")):
            rm_dir = os.path.join(rm_dir, "model")
        value, _ = load_model(ModelConfig(name_or_path=rm_dir, dropout=0.0 if ckpt else None,
                                          gradient_checkpointing=ckpt),
                              for_training=True, with_tokenizer=False, model_class="sequence_classification")
        if cfg.ppo.value_lora:
            value = apply_lora(value, cfg.model.lora, task="seq_cls")
    # dropout off in every model (implementation-details checklist): eval mode, gradients still flow
    for m in (policy, ref, value, rm.model):
        if m is not None:
            m.eval()
    if ckpt:  # the two that then train in train mode: no dropout there either (LoRA's included)
        for m in (policy, value):
            if m is not None:
                disable_dropout(m)
    critic = None
    if cfg.uses_critic:
        critic = Critic(value if value is not None else ValueHead(d_model))
    return Models(policy, ref, critic, rm, tok)


# --------------------------------------------------------------------------------------------------------------------
# Several processes: the models sharded, each update split


def check_shardable(cfg: PPOConfig) -> None:
    """What PPO does not do under FSDP2, refused before anything trains: each would need the sharded policy whole on
    one process in the middle of the run (LoRA's reference, the EMA copy, a kept best checkpoint, an engine's copy)."""
    p = cfg.ppo
    for bad, what in ((cfg.model.lora.enabled, "model.lora.enabled"), (p.ema_decay is not None, "ppo.ema_decay"),
                      (p.keep_best != "none", "ppo.keep_best"), (p.rollout_engine != "policy", "ppo.rollout_engine")):
        if bad:
            raise ConfigError(f"{what}: not supported with PPO under FSDP2; use DDP (configs/accelerate/ddp.yaml) "
                              "or leave it at its default")


def batch_rows(rank: int, world: int, n: int, k: int) -> list[int]:
    """The rows of the whole rollout batch that process `rank` of `world` holds, in its order: every world-th prompt
    (from the rank-th), each with its k responses in consecutive rows; n: the process's rows."""
    return [(rank + world * (j // k)) * k + j % k for j in range(n)]


def minibatch_rows(perm: list[int], m: int, num_minibatches: int, rank: int, world: int, k: int) -> list[int]:
    """Process `rank`'s rows (its own indices) of minibatch m: the m-th slice of `perm`, a shuffle of the whole
    batch's rows, so minibatches are the same whatever the process count (a process may hold more, fewer or none
    of one minibatch's rows)."""
    size = len(perm) // num_minibatches
    return [(i // k // world) * k + i % k for i in perm[m * size:(m + 1) * size] if (i // k) % world == rank]


# --------------------------------------------------------------------------------------------------------------------
# 1-2. Rollout and scoring


@torch.no_grad()
def rollout(models: Models, policy, queries: list[list[int]], prompts: list, p: PPOParams, eos: list[int],
            generator: torch.Generator, device, draw_rows: tuple[torch.Tensor, int] | None = None,
            engine=None, seeds: list[int] | None = None, n_groups: int = 1, first: list[int] | None = None,
            trim_mlp: bool = False, trim_attention: bool = False) -> Rollout:
    """Sample one response per query with `policy` (the unwrapped one), or with a rollout `engine` (its own copy of
    the policy's weights; a seed per response), and score it with the frozen models, each once. `draw_rows`: these
    rows' places in a rollout batch split across processes (`generation.sample`). `n_groups` > 1: the scoring
    forwards run over up to that many groups of rows of similar length, each without its all-padding columns
    (`train.length_groups`). `first`: the rows of the first epoch's first minibatch, scored in the parts that minibatch
    trains in, the trained models' forwards with their graphs kept for it (`Rollout.graphs`). `trim_mlp`: each model's
    last MLP at the positions read alone (`ppo.trim_last_mlp`); `trim_attention`: the policy's, the reference's and the
    value model's last attention from those positions alone (`ppo.trim_last_attention`)."""
    tok, critic = models.tokenizer, models.critic
    q, qm = left_pad(queries, tok.pad_token_id, device)  # (B, P)
    if engine is not None:  # token ids only: every log-prob below is the training model's (recompute_logprobs)
        response, lengths, ended = pad_responses(engine.sample(queries, p.response_length, p.temperature, seeds, eos),
                                                 eos, tok.pad_token_id, device)
        out = None
    else:
        with autocast(policy, p.rollout_mixed_precision):
            out = sample(policy, q, qm, SamplingParams(max_new_tokens=p.response_length, temperature=p.temperature),
                         eos, tok.pad_token_id, generator, draw_rows=draw_rows)
        response, lengths, ended = out.tokens, out.lengths, out.ended  # (B, R), (B,), (B,)
    B, R = response.shape
    mask = torch.arange(R, device=device)[None, :] < lengths[:, None]  # (B, R)
    head = critic is not None and critic.reads_policy
    recompute = p.recompute_logprobs or head
    trim = {"trim_mlp": trim_mlp, "trim_attention": trim_attention}

    def score(q, qm, response, mask, keep: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor | None]:
        """(log-probs (recomputed, else None), reference log-probs, values of the states before each response token
        (None without a critic), the policy's entropy (`keep` and recomputed, else None)) of these rows, each (n, r);
        `keep`: the trained models' forwards with gradients on."""
        ids, att = torch.cat([q, response], 1), torch.cat([qm, mask.long()], 1)
        P, R = q.shape[1], response.shape[1]
        logprobs = values = entropy = None
        with torch.enable_grad() if keep else nullcontext():
            if recompute:
                # old log-probs from the same full forward the training step uses: the first ratio is exactly 1
                logits, hidden = policy_forward(policy, ids, att, hidden=head, response_len=R, **trim)
                logprobs = logprobs_from_logits(logits, response, p.temperature)
                if keep:  # as the update's first epoch logs it
                    with torch.no_grad():
                        entropy = entropy_from_logits(scaled_logits(logits[:, :R], p.temperature))
                if head:
                    values = critic.values(ids, att, hidden)
                del logits, hidden
            if critic is not None and not head:
                values = critic.values(ids, att, response_len=R, **trim)
            if values is not None:  # (with its graph: sliced here)
                values = values[:, P - 1:-1]
        ref_lp = logprobs_from_logits(ref_logits(policy, models.ref, ids, att, R, **trim), response, p.temperature)
        return logprobs, ref_lp, values, entropy

    # the rows in the groups they are scored in: the first minibatch's as it trains, then the others'
    units = [(g, True) for g in minibatch_parts(qm, mask, first, n_groups)] if first else []
    taken = set(first or ())
    rest = [i for i in range(B) if i not in taken]
    units += [(g, False) for g in minibatch_parts(qm, mask, rest, n_groups)] if rest else []
    logprobs = torch.zeros(B, R, device=device) if recompute else None
    ref_logprobs = torch.zeros(B, R, device=device)
    values = torch.zeros(B, R, device=device) if critic is not None else None
    graphs = []
    for group, keep in units:
        rows = torch.tensor(group, device=device)
        lead, r = unpadded_columns(qm[rows], mask[rows]) if n_groups > 1 else (0, R)
        lp, ref_lp, v, entropy = score(q[rows, lead:], qm[rows, lead:], response[rows, :r], mask[rows, :r], keep)
        for whole, part in zip((logprobs, ref_logprobs, values), (lp, ref_lp, v)):
            if part is not None:
                whole[rows, :r] = part.detach()
        if keep:
            graphs.append(KeptForward(lp, v, entropy))
    if not recompute:
        # the sampler's own log-probs (logits / temperature, KV-cached forwards): equal to a full forward's up to
        # float rounding (~1e-6), and one policy forward per rollout cheaper (TRL reuses them the same way)
        logprobs = out.logprobs
    values = values if values is not None else torch.zeros_like(logprobs)  # (B, R); zeros without a critic
    # the reward model reads each response as it was trained: the decoded text after the prompt, ending the turn as
    # the template does (a chat template may add tokens after EOS, e.g. "<|im_end|>\n"); reading the policy's own
    # token ids at the EOS would score a position the RM never saw in training
    texts = [tok.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(response, mask)]
    scores = torch.tensor(models.reward.score(prompts, texts, batch_size=len(texts), n_groups=n_groups,
                                              trim_mlp=trim_mlp), device=device)
    if p.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, p.missing_eos_penalty))
    return Rollout(q, qm, response, mask, logprobs * mask, ref_logprobs * mask, values * mask, scores, ended,
                   list(prompts), texts, graphs=graphs or None)


def data_sources(cfg: PPOConfig) -> list[str | None]:
    """The data the run reads (None: none there): prompts, the monitor's held-out prompts, the ptx text."""
    p = cfg.ppo
    return [cfg.data.train, cfg.data.eval if p.eval_prompts else None, cfg.data.pretrain if p.ptx_coef > 0 else None]


@releases_out_dir
def train(cfg: PPOConfig) -> str:
    """Run PPO(-ptx); returns the out_dir. Rerun on the same out_dir to resume."""
    cfg.validate()
    require_decoder_only(cfg.model, "ppo")
    acc = make_accelerator(cfg)
    run = StageRun(cfg, "ppo", acc)
    if run.prepare() == "done":
        acc.print(f"[ppo] {cfg.out_dir} is already finished (DONE.json); nothing to do")
        return cfg.out_dir
    set_seed(cfg.seed)
    t, p = cfg.train, cfg.ppo
    check_sources(*data_sources(cfg))
    world, rank = acc.num_processes, acc.process_index
    if t.batch_size % (world * p.num_minibatches) or (t.batch_size // p.samples_per_prompt) % world:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of processes x ppo.num_minibatches "
                          f"({world} x {p.num_minibatches}), and its prompts (train.batch_size / "
                          f"ppo.samples_per_prompt) of processes ({world})")

    # the prompts read before the models load (minutes for large ones): a malformed line is named first; the
    # monitor's are optional, so its bad lines are skipped rather than stopping the run
    train_records = load_prompts(cfg.data.train, skip_bad=cfg.data.skip_bad_lines)
    eval_records = load_prompts(cfg.data.eval, skip_bad=True) if p.eval_prompts else None

    # models: policy, reference, critic, reward; one optimizer (and schedule) per trained network
    models = load_models(cfg)
    tok, critic = models.tokenizer, models.critic
    check_context(models.policy, cfg.data.max_length)  # every ptx block is data.max_length tokens long
    eos = eos_ids(models.policy, tok)
    for m in (models.policy, models.ref, critic.module if critic is not None and not critic.reads_policy else None,
              getattr(models.reward, "model", None)):  # bf16 on a CPU: attention as two matmuls (generation.py)
        if m is not None:
            use_matmul_attention(m, t.mixed_precision, acc.device)
    sharding = fsdp_sharding(t)
    if sharding is not None:
        # FSDP2: the two trained models sharded over the processes (each its own groups; the value model's trunk and
        # head, which it calls apart, each a root), their optimizers made over the shards; the frozen reference and
        # reward models stay whole on every process (they hold no gradients or optimizer state)
        check_shardable(cfg)
        shard_model(models.policy, acc, sharding)
        if critic is not None:
            shard_model(critic.module, acc, sharding, None if critic.reads_policy else trunk_and_head(critic.module))
    fused = fused_adam_ok(models.policy)
    opt = adamw([q for q in models.policy.parameters() if q.requires_grad], t, fused)
    sched = lr_schedule(opt, t, t.max_steps)
    vopt = vsched = None
    if critic is not None:
        vopt = adamw([q for q in critic.parameters() if q.requires_grad], t, fused, lr=p.value_lr or t.lr)
        vsched = lr_schedule(vopt, t, t.max_steps)
    if sharding is not None:
        policy = models.policy
        checkpoint_sharded(acc, policy, opt)
        if critic is not None:
            checkpoint_sharded(acc, critic.module, vopt, name=SHARDED_STATE + "_value")
    elif critic is None:
        policy, opt = acc.prepare(models.policy, opt)
    else:
        policy, critic.module, opt, vopt = acc.prepare(models.policy, critic.module, opt, vopt)
    for m in (models.ref, getattr(models.reward, "model", None)):  # the frozen ones only move to the device
        if m is not None:
            m.to(acc.device)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.kl_coef))
    acc.register_for_checkpointing(sched, kl_ctl, *([vsched] if vsched is not None else []))
    unwrapped = acc.unwrap_model(policy)
    ema = EMA(unwrapped, p.ema_decay) if p.ema_decay else None
    if ema is not None:
        acc.register_for_checkpointing(ema)

    def set_training(mode: bool) -> None:
        """Eval mode (no dropout) everywhere but the updates with model.gradient_checkpointing, which Hugging Face
        models apply in train mode only (their dropout is 0: load_models)."""
        policy.train(mode)
        if critic is not None:
            critic.train(mode)

    # data: training prompts, held-out prompts for the monitor, ptx text blocks
    prompts, queries, skipped = prompt_ids(tok, cfg.data.train, cfg.data.max_length, cfg.data.skip_bad_lines,
                                           records=train_records)
    # the monitor's prompts: optional, so too-long ones are skipped rather than stopping the run
    eval_prompts = (prompt_ids(tok, cfg.data.eval, cfg.data.max_length, True, p.eval_prompts, eval_records)[0]
                    if eval_records is not None else [])
    ptx_blocks = pretrain_blocks(tok, cfg.data) if p.ptx_coef > 0 else None
    # a rollout engine of its own (vLLM): made once, from the starting model's files; the weights pushed every update
    engine = None if p.rollout_engine == "policy" else ENGINES[p.rollout_engine](
        resolve_path(cfg.model.name_or_path, cfg.model.gguf_file), p.vllm_gpu_memory_utilization,
        cfg.data.max_length + p.response_length, cfg.seed)

    state = {"step": 0, "ptx_pos": 0, "episodes": 0, "best": None, "best_step": None}
    start = resume_step(run, acc, "ppo")
    if start:
        with open(os.path.join(run.checkpoint_dir(), "trainer_state.json"), encoding="utf-8") as fh:
            state.update(json.load(fh))
    zero = torch.zeros((), device=acc.device)
    head = critic is not None and critic.reads_policy  # the values come out of the policy's own forward
    # Several processes split each update's rollout batch and each of its minibatches, and compute what one process
    # would on the whole batch: the same samples (each row draws its place's random numbers), advantages whitened
    # with the whole batch's moments, and every mean over tokens divided by the minibatch's tokens in all processes
    # over the process count (`count`), so DDP's average of the gradients is the whole minibatch's
    split = world > 1
    all_sum = (lambda x: acc.reduce(x, "sum")) if split else None
    # train.length_groups (as SFT's; None: 2 on a CPU, 1 on a GPU): the rollout's scoring forwards and each
    # minibatch's forward and backward over groups of rows of similar length. One group with several processes or a
    # sharded model, which must all run as many forwards and backwards
    n_groups = length_groups_for(t, acc, policy, *([critic.module] if critic is not None else []),
                                 one_process_only=True)
    # ppo.reuse_rollout_forwards: the first minibatch trains through its scoring forwards' graphs, where the rollout's
    # forwards are the update's (one process, no wrapper, no checkpointing) and one of them is a trained model's
    reuse = (p.reuse_rollout_forwards and acc.distributed_type == DistributedType.NO and sharding is None
             and policy is unwrapped and not cfg.model.gradient_checkpointing
             and (critic is not None or p.recompute_logprobs))
    # ppo.trim_last_mlp: not under gradient checkpointing, whose backward reruns a layer's forward without the trim
    trim_mlp = p.trim_last_mlp and not cfg.model.gradient_checkpointing
    # ppo.trim_last_attention: likewise
    trim = {"trim_mlp": trim_mlp, "trim_attention": p.trim_last_attention and not cfg.model.gradient_checkpointing}
    # ppo.skip_padding_in_mlps: every model's MLPs at the real tokens alone (the last layer's trimmed instead, above),
    # in every forward of the loop below: sampling's prefill, the scoring, the update. Not under gradient checkpointing
    skip_padding = p.skip_padding_in_mlps and not cfg.model.gradient_checkpointing

    def ptx_loss(n_tokens: float) -> torch.Tensor:
        """-E_pretrain[log pi(x)] on ptx_token_ratio x `n_tokens` tokens of pretraining text (the minibatch's tokens
        in all processes; each process forwards every world-th of its rows)."""
        n_rows = max(1, math.ceil(p.ptx_token_ratio * n_tokens / cfg.data.max_length))
        rows = stream_indices(len(ptx_blocks), state["ptx_pos"], n_rows, cfg.seed + 1)[rank::world]
        state["ptx_pos"] += n_rows
        weight = 1.0 if rows else 0.0  # a process with no row forwards one with weight 0 (DDP needs its backward)
        px = ptx_blocks.ids[rows or [0]].long().to(acc.device)
        pm = torch.ones_like(px)
        count = n_rows * (px.shape[1] - 1) / world if split else None
        with acc.autocast():
            return weight * lm_loss(policy_forward(policy, px, pm)[0], px, pm, count)

    def evaluate_and_keep(done: int) -> dict:
        if not eval_prompts:
            return {}
        # under bf16 autocast, a LoRA policy's frozen weights held in bf16 (`frozen_linears_in_bf16`), not cast anew
        # at every token of the monitor's samples
        with acc.autocast(), (frozen_linears_in_bf16(unwrapped) if t.mixed_precision == "bf16" else nullcontext()):
            ev = heldout_metrics(unwrapped, models.ref, models.reward, tok, eval_prompts, p.response_length,
                                 p.temperature, cfg.seed, acc.device)
        key = {"gold": "eval/gold_score_greedy", "reward": "eval/rm_score"}.get(p.keep_best)
        if key and key in ev and acc.is_main_process:
            ok = p.keep_best != "reward" or ev["eval/kl"] <= p.kl_budget
            if ok and (state["best"] is None or ev[key] > state["best"]):
                state["best"], state["best_step"] = ev[key], done
                with run.writing(run.path("best_model")):
                    save_model(unwrapped, tok, run.path("best_model"))
        return ev

    if start == 0 and eval_prompts:
        run.log(0, evaluate_and_keep(0))
    t0, episodes_t0 = time.time(), state["episodes"]
    with ExitStack() as unpadded, preemptible(run, acc, "ppo"), StageProgress("ppo", total=t.max_steps, start=start,
                                                                          enabled=acc.is_main_process) as bar:
        if skip_padding:
            for m in (policy, models.ref, critic.module if critic is not None else None,
                      getattr(models.reward, "model", None)):
                if m is not None:
                    unpadded.enter_context(mlps_skip_padding(m, skip_last=trim_mlp))
        for step in range(start, t.max_steps):
            t_update = time.time()
            # 1. rollout: this update's prompts are a pure function of the step (exact resume); each rank its share,
            # each prompt ppo.samples_per_prompt times in consecutive rows
            k = p.samples_per_prompt
            n_prompts = t.batch_size // k
            idx = stream_indices(len(queries), step * n_prompts, n_prompts, cfg.seed)[rank::world]
            idx = [i for i in idx for _ in range(k)]
            rows = batch_rows(rank, world, len(idx), k)  # their rows in the whole batch
            gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1_000_003 + step * 7919)
            set_training(False)
            if engine is not None:  # the engine samples from the policy as this update starts (a resumed one too)
                engine.load_weights((name, w.detach()) for name, w in unwrapped.state_dict().items())
            first = (minibatch_rows(epoch_order(cfg.seed, step, 0, t.batch_size), 0, p.num_minibatches, rank, world, k)
                     if reuse else None)
            with acc.autocast():  # train.mixed_precision: the frozen models' forwards in the same precision
                b = rollout(models, unwrapped, [queries[i] for i in idx], [prompts[i] for i in idx], p, eos, gen,
                            acc.device, draw_rows=(torch.tensor(rows, device=acc.device), t.batch_size),
                            engine=engine, seeds=[row_seed(cfg.seed, step, r) for r in rows], n_groups=n_groups,
                            first=first, **trim)
            # 2. rewards: score at the last token - beta * KL per token (the paper's Eq. 2, per token)
            kl = kl_per_token(b.logprobs, b.ref_logprobs, p.kl_estimator) * b.mask
            rewards, non_score = token_rewards(b.scores, kl, 0.0 if p.kl_in_loss else kl_ctl.value, b.mask)
            if p.whiten_rewards:
                rewards = whiten(rewards, b.mask, shift_mean=False, all_sum=all_sum)
            # 3. GAE (gamma = 1 by default), or a response's return against its prompt's other responses at every
            # token (rloo / grpo); then advantage whitening
            if critic is not None:
                b.advantages, b.returns = gae(rewards, b.values, b.mask, p.gamma, p.lam)
            else:
                b.advantages = group_advantages((rewards * b.mask).sum(-1), k, p.advantage_estimator)[:, None] * b.mask
            if p.whiten_advantages:
                b.advantages = whiten(b.advantages, b.mask, all_sum=all_sum)
            # 4. PPO epochs over shuffled minibatches, ptx in the same objective
            set_training(cfg.model.gradient_checkpointing)
            stats: dict[str, list[float]] = {}
            for epoch in range(p.ppo_epochs):
                perm = epoch_order(cfg.seed, step, epoch, t.batch_size)  # the whole batch's rows
                for m in range(p.num_minibatches):
                    mine = minibatch_rows(perm, m, p.num_minibatches, rank, world, k)
                    mb = b.rows(torch.tensor(mine or [0], device=acc.device))
                    if not mine:  # none of this minibatch's rows is this process's: one row with weight 0
                        mb.mask = torch.zeros_like(mb.mask)
                    count = (all_sum(mb.mask.sum().float()).clamp(min=1.0) / world if split
                             else mb.mask.sum().float().clamp(min=1.0))
                    ptx_tokens = mb.attention_mask.sum().float() if mine else zero
                    # train.length_groups: the minibatch's rows in groups of similar length, each without its
                    # all-padding columns, a backward each; every mean is over the whole minibatch's tokens (`count`)
                    # and the ptx batch is the first group's, so the gradients add up to one padded forward's
                    parts = [b.rows(torch.tensor(g, device=acc.device)).trimmed()
                             for g in minibatch_parts(b.query_mask, b.mask, mine, n_groups)] if n_groups > 1 else [mb]
                    # the rollout's scoring forwards of these parts, with their graphs (ppo.reuse_rollout_forwards)
                    kept = b.graphs if epoch == 0 and m == 0 and b.graphs else [None] * len(parts)
                    logged, entropy = {}, 0.0
                    for i, (part, kf) in enumerate(zip(parts, kept)):
                        P, R = part.query.shape[1], part.response.shape[1]
                        ids, att = part.input_ids, part.attention_mask
                        hidden = token_entropy = None
                        if kf is not None and kf.logprobs is not None:
                            new_logprobs, token_entropy = kf.logprobs, kf.entropy
                        else:
                            with acc.autocast():
                                logits, hidden = policy_forward(policy, ids, att, hidden=head, response_len=R,
                                                                **trim)
                            new_logprobs = logprobs_from_logits(logits, part.response, p.temperature)
                            if epoch == 0:
                                with torch.no_grad():
                                    token_entropy = entropy_from_logits(scaled_logits(logits[:, :R],
                                                                                      p.temperature))
                            del logits
                        if epoch == 0:  # the policy's entropy on the rollouts, before (or barely after) this update
                            entropy += float(masked_mean(token_entropy, part.mask, count))
                        pg_loss, pg_stats = policy_loss(new_logprobs, part.logprobs, part.advantages, part.mask,
                                                        p.cliprange, count)
                        kl_loss, vf_loss, vf_stats, ptx = zero, zero, {}, zero
                        if p.kl_in_loss:
                            kl_loss = masked_mean(kl_per_token(new_logprobs, part.ref_logprobs, p.kl_estimator),
                                                  part.mask, count)
                        if critic is not None:
                            if kf is not None and kf.values is not None:
                                new_values = kf.values
                            else:
                                with acc.autocast():  # the states before the tokens
                                    new_values = critic.values(ids, att, hidden, R, **trim)[:, P - 1:-1]
                            vf_loss, vf_stats = value_loss(new_values, part.values, part.returns, part.mask,
                                                           p.cliprange_value, count)
                        if ptx_blocks is not None and i == 0:
                            ptx = ptx_loss(float(all_sum(ptx_tokens) if split else ptx_tokens))
                        kl_loss_coef = kl_ctl.value if p.kl_in_loss else 0.0  # beta in the loss, or in the reward
                        loss = pg_loss + kl_loss_coef * kl_loss + p.vf_coef * vf_loss + p.ptx_coef * ptx
                        acc.backward(loss)
                        part_logged = {"ppo/policy/approxkl": pg_stats["approxkl"],
                                       "ppo/policy/clipfrac": pg_stats["clipfrac"], "ppo/loss/policy": pg_loss,
                                       "ppo/loss/ptx": ptx, "ppo/val/ratio": pg_stats["ratio"]}
                        if critic is not None:
                            part_logged.update({"ppo/val/clipfrac": vf_stats["clipfrac"], "ppo/loss/value": vf_loss})
                        if p.kl_in_loss:
                            part_logged["ppo/loss/kl"] = kl_loss
                        for name, v in part_logged.items():
                            logged[name] = logged.get(name, 0.0) + float(v.detach())
                    b.graphs = None  # used once (their backward has run)
                    if epoch == 0:
                        stats.setdefault("objective/entropy", []).append(entropy)
                    if t.max_grad_norm:  # each network clipped on its own
                        acc.clip_grad_norm_(policy.parameters(), t.max_grad_norm)
                        if critic is not None:
                            acc.clip_grad_norm_(critic.parameters(), t.max_grad_norm)
                    for o in (opt, vopt):
                        if o is not None:
                            o.step()
                            o.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(unwrapped)
                    for name, v in logged.items():
                        stats.setdefault(name, []).append(v)
            set_training(False)  # the monitor and the next rollout sample with a KV cache
            for s in (sched, vsched):
                if s is not None:
                    s.step()
            # 5. log, adapt beta, evaluate, checkpoint
            seq_kl = float(acc.reduce(kl.sum(-1).mean(), "mean"))
            kl_ctl.update(seq_kl, t.batch_size)
            state["episodes"] += t.batch_size
            done = step + 1
            update_s = time.time() - t_update
            eps = (state["episodes"] - episodes_t0) / max(time.time() - t0, 1e-9)
            metrics = {
                "objective/kl": seq_kl,
                "objective/scores": float(acc.reduce(b.scores.mean(), "mean")),
                "objective/rlhf_reward": float(acc.reduce((b.scores + non_score.sum(-1)).mean(), "mean")),
                "objective/non_score_reward": float(acc.reduce(non_score.sum(-1).mean(), "mean")),
                **({"ppo/val/var_explained": explained_variance(b.values, b.returns, b.mask, all_sum)}
                   if critic is not None else {}),
                "ppo/mean_response_length": float(acc.reduce(b.mask.sum(-1).float().mean(), "mean")),
                "ppo/eos_rate": float(acc.reduce(b.ended.float().mean(), "mean")),
                "ppo/kl_coef": kl_ctl.value, "ppo/lr": sched.get_last_lr()[0],
                "time/update_s": update_s, "time/episodes_per_s": eps,
                **{name: sum(v) / len(v) if not split else float(acc.reduce(torch.tensor(sum(v) / len(v),
                                                                                         device=acc.device), "mean"))
                   for name, v in stats.items()},
            }
            if (judge := judge_for(b.prompts)) is not None:  # monitor only: never enters the reward
                metrics["objective/gold_score"] = sum(judge.score(b.prompts, b.texts)) / len(b.texts)
            if eval_prompts and (done % t.eval_every == 0 or done == t.max_steps):
                metrics.update(evaluate_and_keep(done))
            bar.update(done, score=metrics["objective/scores"], kl=seq_kl,
                       **({"gold": metrics["objective/gold_score"]} if judge is not None else {}))
            if done % t.log_every == 0 or done == t.max_steps or any(k.startswith("eval/") for k in metrics):
                run.log(done, metrics)
            if p.sample_every and (done % p.sample_every == 0 or done == 1) and acc.is_main_process:
                run.append(run.path("samples.jsonl"), [
                    {"step": done, "query": b.prompts[i][-1]["content"], "response": b.texts[i],
                     "score": round(float(b.scores[i]), 4), "kl": round(float(kl[i].sum()), 4)}
                    for i in range(min(4, len(b.prompts)))])
            state["step"] = done
            if checkpoint_or_stop(run, acc, t, done, t.max_steps, "ppo", state):
                return cfg.out_dir

    # final model: the best kept checkpoint, else the EMA weights, else the last policy (`full_model`: the policy as
    # it is, or gathered whole when sharded; every process takes part)
    whole = full_model(acc, policy)
    if acc.is_main_process:
        if ema is not None:
            ema.copy_to(unwrapped)
        with run.writing(run.path("model")):
            if state["best_step"] is not None and os.path.exists(run.path("best_model")):
                replace_dir(run.path("best_model"), run.path("model"))
            else:
                save_model(whole, tok, run.path("model"), consume=True)
    run.finish({"updates": t.max_steps, "episodes": state["episodes"], "skipped": skipped,
                "kl_coef": kl_ctl.value, "best": state["best"], "best_step": state["best_step"]})
    return cfg.out_dir
