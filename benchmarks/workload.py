"""The workload both sides run: settings, and the same token ids in the same batch order, written once to a folder.

Built in the parent process (it needs `instructgpt` for the template, the task suite and our batch order); the
workers only read the files, so TRL's side never sees a different tokenization, data order or model.

- SFT: the built-in demonstrations rendered with our template. Ours reads them through `instructgpt.sft.train`;
  TRL's `SFTTrainer` gets the same examples pre-tokenized (`input_ids` + `completion_mask`) in the order our loop
  reads them (`instructgpt.sft.batch_indices`), with its sequential sampler, so step i of both sides trains on the
  same 32 rows.
- Reward model: K-way rankings made from the task suite with the simulated demonstrator at a high error rate,
  K responses with K different gold scores, ranked by `tasks.gold_score` (no ties, so every prompt has exactly
  C(K,2) comparisons). Ours trains on the rankings; TRL's `RewardTrainer` on the same rankings expanded to
  (chosen, rejected) pairs, step by step the same prompts, so both see the same comparisons per step. TRL starts
  from exactly the weights ours starts from (`rm_start`: builtin:base, our head initialisation, our seed), so the
  two held-out accuracies differ only by what each trainer does with the same comparisons.
- Generation and PPO: held-out task prompts rendered with our template (token ids).
- PPO's reward and value models: `builtin:base` as a SequenceClassification model (num_labels=1) with a seeded head,
  saved once, loaded by both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from math import comb

SFT_DEMOS = "builtin:task-demos?n=2000&seed=0"


@dataclass
class Optim:
    """AdamW and schedule, the same on both sides: cosine decay to 10% of the peak, no warm-up, fp32."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    min_lr_ratio: float = 0.1


@dataclass
class Settings:
    mode: str = "full"
    reps: int = 3  # alternating ours/TRL repetitions per figure; the ratio reported is the median
    threads: int = 1  # torch intra-op threads in every worker (see run.py --threads)
    seed: int = 0
    optim: Optim = field(default_factory=Optim)
    # SFT
    sft_batch: int = 32
    sft_steps: int = 12
    sft_warmup: int = 3  # first steps left out of the rate (lazy init)
    sft_lr: float = 1e-4
    max_length: int = 256
    # reward model
    rm_prompts_per_step: int = 4  # ours: 4 rankings a step; TRL: the same 4 prompts' C(K,2) pairs a step
    rm_steps: dict = field(default_factory=lambda: {4: 14, 9: 7})  # TRL's K=9 step is 288 sequences
    rm_warmup: int = 2
    rm_lr: float = 5e-4
    rm_heldout: int = 100  # held-out prompts (K-way) for the accuracy each side reaches
    # generation
    gen_batches: tuple = (1, 8, 32)
    gen_new_tokens: int = 32
    gen_calls: dict = field(default_factory=lambda: {1: 5, 8: 3, 32: 3})  # timed calls after one warm-up call
    # PPO (TRL 1.12 against ours.ppo_update)
    ppo_batch: int = 32
    ppo_response_length: int = 32
    ppo_epochs: int = 4
    ppo_minibatches: int = 1  # TRL's default; with more, TRL 1.12 steps the optimizer once per minibatch group
    ppo_updates: int = 3  # the first is warm-up, left out of episodes/s
    ppo_lr: float = 1e-5
    # RLOO (TRL's RLOOTrainer against ours.ppo_update with ppo.advantage_estimator=rloo): one
    # epoch over the whole batch, k responses to each prompt, the KL in the reward at TRL's default beta
    rloo_batch: int = 32  # responses per update
    rloo_k: int = 4
    rloo_response_length: int = 32
    rloo_updates: int = 4  # the first is warm-up, left out of episodes/s
    rloo_beta: float = 0.05
    rloo_lr: float = 1e-5
    scaling_lengths: tuple = (16, 32, 64, 128)  # at ppo_batch
    scaling_batches: tuple = (8, 32, 128)  # at ppo_response_length
    scaling_updates: int = 2  # the first is warm-up

    @classmethod
    def quick(cls) -> Settings:
        """Everything once, few steps: for development, not for figures."""
        return cls(mode="quick", reps=1, sft_steps=5, sft_warmup=2, rm_steps={4: 4, 9: 3}, rm_warmup=1,
                   rm_heldout=30, gen_calls={1: 2, 8: 1, 32: 1}, ppo_updates=2, rloo_updates=2, scaling_lengths=(16, 32),
                   scaling_batches=(8, 32), scaling_updates=2)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rm_steps"] = {str(k): v for k, v in self.rm_steps.items()}
        d["gen_calls"] = {str(k): v for k, v in self.gen_calls.items()}
        return d


# --------------------------------------------------------------------------------------------------------------------
# Rankings


def kway_rankings(task_list, k: int, seed: int) -> list[dict]:
    """One ranking per task that has K responses with K different gold scores: {"prompt", "responses", "ranks"}.

    Responses come from the simulated demonstrator at error rate 0.9 (mostly plausible mistakes, each scored with
    partial credit); tasks that do not yield K distinct scores in 60 draws are skipped.
    """
    from instructgpt import tasks

    rng = random.Random(seed)
    out = []
    for t in task_list:
        by_score: dict[float, str] = {}
        for _ in range(60):
            r = tasks.demonstrate(t, rng, error_rate=0.9)
            by_score.setdefault(round(tasks.gold_score(t, r), 6), r)
        if len(by_score) < k:
            continue
        picked = rng.sample(sorted(by_score.items()), k)  # (score, response), in random order
        order = sorted(range(k), key=lambda i: -picked[i][0])
        ranks = [0] * k
        for rank, i in enumerate(order, start=1):
            ranks[i] = rank
        out.append({"prompt": t.prompt, "responses": [r for _, r in picked], "ranks": ranks})
    return out


def rankings_for(split: str, k: int, n: int, seed: int) -> list[dict]:
    """`n` rankings of `split` tasks (asks for more tasks than needed: some are skipped)."""
    from instructgpt import tasks

    task_list = tasks.make_tasks(split, int(n * 1.3) + 20, seed=seed)
    out = kway_rankings(task_list, k, seed)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} {split} rankings with K={k} distinct scores, need {n}")
    return out[:n]


# --------------------------------------------------------------------------------------------------------------------
# Building the files


def rm_start(path: str, seed: int) -> str:
    """Save the model `instructgpt.rm.train` starts from: set_seed, builtin:base with a scalar head, our head init.

    Same calls in the same order as rm.train, so the weights are identical to those our side trains.
    """
    from instructgpt.modeling import load_model, set_seed
    from instructgpt.reward import init_reward_head

    set_seed(seed)
    model, tok = load_model("builtin:base", for_training=True, model_class="sequence_classification")
    init_reward_head(model.score)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _write(path: str, obj) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    return path


def build(work: str, s: Settings) -> dict:
    """Write the workload under `work`; return the spec every worker reads (settings + file paths)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from instructgpt import tasks
    from instructgpt.data import load_demonstrations
    from instructgpt.losses import ranking_pairs
    from instructgpt.modeling import load_tokenizer, resolve_path
    from instructgpt.prompting import encode_prompt
    from instructgpt.reward import encode_pair
    from instructgpt.sft import build_examples
    from instructgpt.training import batch_indices

    hf_logging.disable_progress_bar()  # the loads and saves below would print bars into the benchmark's table
    os.makedirs(work, exist_ok=True)
    base = resolve_path("builtin:base")
    tok = load_tokenizer(base)
    spec: dict = {"settings": s.as_dict(), "threads": s.threads, "model_dir": base, "pad_token_id": tok.pad_token_id}

    # SFT: our examples, in the order our loop reads them, step by step
    examples, _ = build_examples(tok, load_demonstrations(SFT_DEMOS), s.max_length)
    rows, tokens = [], []
    for step in range(s.sft_steps):
        batch = [examples[i] for i in batch_indices(len(examples), s.sft_batch, step, s.seed)]
        rows += [{"input_ids": e.input_ids, "completion_mask": [int(m) for m in e.loss_mask]} for e in batch]
        tokens.append(sum(len(e.input_ids) for e in batch))
    spec["sft"] = {"demos": SFT_DEMOS, "trl_rows": _write(os.path.join(work, "sft_rows.json"), rows),
                   "tokens_per_step": tokens, "examples": len(examples)}

    # Reward model: K-way rankings (ours), the same as pairs in our batch order (TRL), held-out rankings (both)
    spec["rm"] = {}
    for k, steps in s.rm_steps.items():
        n_train = s.rm_prompts_per_step * steps
        train = rankings_for("train", k, n_train, seed=s.seed + k)
        heldout = rankings_for("heldout", k, s.rm_heldout, seed=s.seed + 100 + k)
        seqs = [[encode_pair(tok, r["prompt"], resp) for resp in r["responses"]] for r in train]
        pairs = []
        for step in range(steps):
            for i in batch_indices(len(train), s.rm_prompts_per_step, step, s.seed):
                pairs += [{"chosen_ids": seqs[i][w], "rejected_ids": seqs[i][l]}
                          for w, l in ranking_pairs(train[i]["ranks"])]
        train_path = os.path.join(work, f"rm_k{k}_train.jsonl")
        with open(train_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in train)
        held = [{"seqs": [encode_pair(tok, r["prompt"], resp) for resp in r["responses"]], "ranks": r["ranks"]}
                for r in heldout]
        spec["rm"][str(k)] = {
            "k": k, "steps": steps, "rankings": train_path, "prompts": n_train,
            "comparisons_per_step": s.rm_prompts_per_step * comb(k, 2),
            "trl_pairs": _write(os.path.join(work, f"rm_k{k}_pairs.json"), pairs),
            "heldout": _write(os.path.join(work, f"rm_k{k}_heldout.json"), held),
            "mean_tokens": round(sum(map(len, (x for q in seqs for x in q))) / sum(map(len, seqs)), 1)}

    # The reward model's starting point as `instructgpt.rm.train` makes it (seed, backbone, head init), for TRL
    spec["rm_start"] = rm_start(os.path.join(work, "rm_start"), s.seed)

    # Prompts for generation and PPO rollouts: held-out tasks, rendered with our template
    held_tasks = tasks.make_tasks("heldout", 256, seed=s.seed + 3)
    prompts = [encode_prompt(tok, t.prompt) for t in held_tasks]
    spec["prompts"] = _write(os.path.join(work, "prompts.json"), prompts)
    # the same prompts as a prompt source for our stages (which render them with the same template: the same ids)
    spec["prompts_jsonl"] = os.path.join(work, "prompts.jsonl")
    with open(spec["prompts_jsonl"], "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"prompt": t.prompt}) + "\n" for t in held_tasks)

    # PPO: one reward/value initialisation (seeded head) for both sides
    reward_dir = os.path.join(work, "reward_init")
    if not os.path.exists(os.path.join(reward_dir, "config.json")):
        torch.manual_seed(s.seed)
        rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(reward_dir)
        tok.save_pretrained(reward_dir)
    spec["ppo"] = {"policy_dir": base, "reward_dir": reward_dir, "epochs": s.ppo_epochs,
                   "minibatches": s.ppo_minibatches, "lr": s.ppo_lr,
                   "main": [{"batch": s.ppo_batch, "length": s.ppo_response_length, "updates": s.ppo_updates}],
                   "scaling": [{"batch": s.ppo_batch, "length": n, "updates": s.scaling_updates}
                               for n in s.scaling_lengths]
                   + [{"batch": b, "length": s.ppo_response_length, "updates": s.scaling_updates}
                      for b in s.scaling_batches if b != s.ppo_batch]}
    # RLOO: the same model and reward initialisation; TRL reads prompts as text, so the same template-rendered
    # prompts decoded (its tokenizer call gives back the same ids)
    spec["rloo"] = {"policy_dir": base, "reward_dir": reward_dir, "batch": s.rloo_batch, "k": s.rloo_k,
                    "length": s.rloo_response_length, "updates": s.rloo_updates, "beta": s.rloo_beta,
                    "lr": s.rloo_lr, "prompts_text": _write(os.path.join(work, "prompts_text.json"),
                                                            [tok.decode(p) for p in prompts])}
    return spec
