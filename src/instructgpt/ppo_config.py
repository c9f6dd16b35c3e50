"""``instructgpt ppo``'s configuration: every hyper-parameter of PPO-ptx, each departure from InstructGPT's settings
(Ouyang et al. 2022, App. C.4) a flag with a comment saying what the paper did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from instructgpt.config import ConfigError, StageConfig, TrainConfig
from instructgpt.generation import GREEDY_BELOW, is_greedy
from instructgpt.judges import GOLD

DEFAULT_PROMPTS = "builtin:task-prompts?split=train&n=4000&seed=1"
DEFAULT_EVAL_PROMPTS = "builtin:task-prompts?split=heldout&n=128&seed=7"


@dataclass
class RewardModelConfig:
    # an `instructgpt rm` out_dir or its model/ directory; or "builtin:gold": the built-in task's gold labeler itself
    # as the reward (2 * gold - 1), an oracle run that shows what PPO gets from a perfect reward model (not RLHF)
    name_or_path: str | None = None


@dataclass
class ReferenceModelConfig:
    # pi_ref, the KL penalty's anchor: a model directory or Hub id with the policy's tokenizer. None: the model PPO
    # starts from (model.name_or_path), the paper's (the SFT model). Set it when PPO continues from an earlier PPO
    # policy (the pipeline's later rounds) and the penalty is still to hold the policy near SFT
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
    # the first epoch's first minibatch trains through the graphs of its rows' scoring forwards in the rollout (the
    # value model's, and the policy's with recompute_logprobs): the same weights and inputs, so the same losses and
    # gradients, with one forward of each fewer per update. One process, no gradient checkpointing; false runs those
    # forwards again in the update, as TRL and OpenRLHF do
    reuse_rollout_forwards: bool = True
    # the last layer's MLP of the policy, the reference and the value model runs at the response positions only, and
    # the reward model's at each response's last token: the only ones whose outputs PPO reads (what `logits_to_keep`
    # does for the LM head). The same log-probs, values and scores, with the MLP FLOPs of the other positions in one
    # layer fewer (1/L of a model's MLP work times the query's share of the tokens). That MLP's weight gradients round
    # differently (a sum over fewer rows). Not with gradient checkpointing, whose recomputed forward would run it at
    # every position; false runs it at every position
    trim_last_mlp: bool = True
    # the last layer's self-attention of the policy, the reference and the value model attends from the response
    # positions only, to the keys and values of every position, and its query (where separate) and output projections
    # run there alone (`modeling.last_attention_only_at`): the same log-probs and values to float rounding, with the
    # query positions' share of one layer's attention and projections left out. Where the model's attention takes
    # sdpa's masks (sdpa, the CPU's bf16 matmul attention; not flash or flex attention). Not with gradient
    # checkpointing; false runs it at every position
    trim_last_attention: bool = True
    # the MLPs of those four models run at the real tokens alone (`modeling.mlps_skip_padding`; the last layer's is
    # left to trim_last_mlp where that is on): not at the queries' left padding nor after a response's EOS, whose
    # results no real token reads. The same log-probs, values and scores (an MLP reads its own position alone), with
    # the padded positions' share of the MLP FLOPs fewer; the MLPs' weight gradients round differently (sums over
    # fewer rows). Not with gradient checkpointing, whose recomputed forward would run them at every position; false
    # runs them at every position
    skip_padding_in_mlps: bool = True
    # "bf16": sample the rollouts under bf16 autocast (a CPU with avx512_bf16 or a GPU does it ~2-4x faster), the
    # training in train.mixed_precision; needs recompute_logprobs, so the old log-probs stay the fp32 policy's (the
    # split of TRL's and OpenRLHF's vLLM rollouts: sample in low precision, score the ratio with the trained model)
    rollout_mixed_precision: Literal["no", "bf16"] = "no"
    # "policy": the rollouts sampled by the policy itself (generation.sample, any device). "vllm": by a vLLM engine
    # colocated in each process (a CUDA machine), the policy's weights pushed into it before every rollout, its token
    # ids scored by the training models (needs recompute_logprobs): TRL's colocated GRPO and OpenRLHF sample so
    rollout_engine: Literal["policy", "vllm"] = "policy"
    vllm_gpu_memory_utilization: float = 0.3  # the share of the GPU's memory the colocated vLLM engine may take
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
    reference_model: ReferenceModelConfig = field(default_factory=ReferenceModelConfig)
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
        if self.reward_model.name_or_path == GOLD and p.value_model != "policy" and self.uses_critic:
            raise ConfigError(f"reward_model.name_or_path={GOLD} has no network to start a value model from: "
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
        if p.rollout_engine != "policy" and not p.recompute_logprobs:
            raise ConfigError(f"ppo.rollout_engine={p.rollout_engine} needs ppo.recompute_logprobs=true (the "
                              "ratio's old log-probs from the trained model's forward, never from the engine)")
        if p.rollout_engine != "policy" and self.model.lora.enabled:
            raise ConfigError(f"ppo.rollout_engine={p.rollout_engine} takes the policy's full weights after every "
                              "update; with model.lora.enabled use ppo.rollout_engine=policy")
        if p.rollout_mixed_precision != "no" and not p.recompute_logprobs:
            raise ConfigError(f"ppo.rollout_mixed_precision={p.rollout_mixed_precision} needs "
                              "ppo.recompute_logprobs=true (the ratio's old log-probs from the trained model's "
                              "forward, not from the low-precision sampler)")
        if self.train.mixed_precision != "no" and not p.recompute_logprobs:
            # the KV-cached sampler's low-precision log-probs differ from a full forward's by ~1e-2 per token: the
            # KL penalty and the first ratio would read that rounding as policy change
            raise ConfigError(f"train.mixed_precision={self.train.mixed_precision} needs ppo.recompute_logprobs=true "
                              "(old log-probs from the same full forward as the reference's and the update's)")
