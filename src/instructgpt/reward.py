"""The reward model: a causal LM's trunk with a scalar head, read at the last token of each response.

Saved as a plain Hugging Face ``AutoModelForSequenceClassification`` (``num_labels=1``) with the normalisation beside
it in ``reward_norm.json``: ``reward = gain * (head - bias)``. Every consumer (PPO, best-of-n, evaluation, serving)
goes through :class:`RewardModel`, which applies it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from instructgpt.batching import length_groups, right_pad
from instructgpt.generation import autocast
from instructgpt.modeling import last_mlp_only_at, load_model, position_ids_from_mask
from instructgpt.prompting import encode_prompt, encode_response

NORM_FILE = "reward_norm.json"


def init_reward_head(head: torch.nn.Linear) -> None:
    """N(0, 1/sqrt(d_model + 1)) weights and zero bias (the PPO implementation-details checklist, RM item 2)."""
    d = head.weight.shape[-1]
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(d + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)


def trunk_and_head(model):
    """(trunk, head) of a *ForSequenceClassification model: the base model and its `score` projection."""
    if hasattr(model, "get_base_model"):  # a peft (LoRA) wrapper: its layers are injected in the inner model
        model = model.get_base_model()
    return model.base_model, model.score


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position (the RM reads the last response token; a value model reads them all).

    (B, T) -> (B, T). Position ids ignore left padding, so rows can be padded either side.
    """
    position_ids = position_ids_from_mask(attention_mask)
    if isinstance(model, DistributedDataParallel):
        # through the wrapper's forward, which readies DDP's gradient averaging (calling the trunk inside it would
        # skip that): the whole model's forward, its last hidden states read by the head at every position
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       output_hidden_states=True).hidden_states[-1]
        head = trunk_and_head(model.module)[1]
    else:
        trunk, head = trunk_and_head(model)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids).last_hidden_state  # (B, T, d)
    return head(hidden).squeeze(-1).float()  # (B, T)


def last_token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       trim_mlp: bool = False) -> torch.Tensor:
    """The head read at each row's last real token (right-padded rows). (B, T) -> (B,). `trim_mlp`: the last layer's
    MLP runs at that token alone (`last_mlp_only_at`), the same rewards."""
    last = attention_mask.long().sum(-1) - 1  # (B,)
    with last_mlp_only_at(model, last if trim_mlp else None):
        values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last[:, None]).squeeze(1)


def encode_pair(tokenizer, messages, response: str) -> list[int]:
    """Prompt (rendered with the template) + response (ending the turn, e.g. with EOS)."""
    return encode_prompt(tokenizer, messages) + encode_response(tokenizer, response)


@dataclass
class RewardNorm:
    bias: float = 0.0  # subtracted: the paper sets it so the demonstrations score 0 on average
    gain: float = 1.0  # multiplied after: optional, so SFT-policy samples have std 1 (lm-human-preferences)

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.bias) * self.gain

    def save(self, model_dir: str) -> None:
        with open(os.path.join(model_dir, NORM_FILE), "w", encoding="utf-8") as fh:
            json.dump({"bias": self.bias, "gain": self.gain}, fh, indent=2)

    @classmethod
    def load(cls, model_dir: str) -> "RewardNorm":
        p = os.path.join(model_dir, NORM_FILE)
        if not os.path.exists(p):
            return cls()
        with open(p, encoding="utf-8") as fh:
            d = json.load(fh)
        return cls(float(d.get("bias", 0.0)), float(d.get("gain", 1.0)))


@torch.no_grad()
def raw_rewards(model, tokenizer, prompts: Sequence, responses: Sequence[str], device, batch_size: int = 32,
                n_groups: int = 1, trim_mlp: bool = False) -> torch.Tensor:
    """Unnormalised head values at the last token of each prompt + response, batched. -> (N,). The batches are of
    pairs of similar length (the fewest padded tokens), the rewards in the pairs' order. `n_groups` > 1: each batch
    forwarded as up to that many groups, each padded to its own longest (`length_groups`); `trim_mlp`: see
    `last_token_rewards`."""
    seqs = [encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
    if not seqs:
        return torch.zeros(0)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(seqs), batch_size)]
    if n_groups > 1:
        batches = [[b[i] for i in g] for b in batches for g in length_groups([len(seqs[i]) for i in b], n_groups)]
    return grouped_last_token_rewards(model, seqs, batches, tokenizer.pad_token_id, device, trim_mlp)


def grouped_last_token_rewards(model, seqs: Sequence[Sequence[int]], groups: Sequence[Sequence[int]],
                               pad_token_id: int, device, trim_mlp: bool = False) -> torch.Tensor:
    """:func:`last_token_rewards` of the token sequences `seqs`, forwarded a group of their indices at a time, each
    group right-padded to its own longest; the rewards in the order of `seqs`. -> (len(seqs),)."""
    out = torch.cat([last_token_rewards(model, *right_pad([seqs[i] for i in g], pad_token_id, device), trim_mlp)
                     for g in groups])
    order = torch.tensor([i for g in groups for i in g], device=out.device)
    return out[torch.argsort(order)]


class RewardModel:
    """A trained reward model, normalised, for scoring (prompt, response) pairs."""

    def __init__(self, model, tokenizer, norm: RewardNorm, mixed_precision: str = "no"):
        self.model, self.tokenizer, self.norm = model.eval(), tokenizer, norm
        self.mixed_precision = mixed_precision  # "bf16": score under bf16 autocast (the rewards read in fp32)

    @classmethod
    def load(cls, path: str) -> "RewardModel":
        """An `instructgpt rm` out_dir or its model/ directory."""
        if os.path.exists(os.path.join(path, "model", "config.json")):
            path = os.path.join(path, "model")
        model, tok = load_model(path, model_class="sequence_classification")
        return cls(model, tok, RewardNorm.load(path))

    @torch.no_grad()
    def score(self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32, n_groups: int = 1,
              trim_mlp: bool = False) -> list[float]:
        """Normalised rewards for each (prompt, response); a prompt is a string or a list of messages. `n_groups`,
        `trim_mlp`: how the batches are forwarded (`raw_rewards`), the same rewards."""
        device = next(self.model.parameters()).device
        with autocast(self.model, self.mixed_precision):
            raw = raw_rewards(self.model, self.tokenizer, prompts, responses, device, batch_size, n_groups, trim_mlp)
        return self.norm.apply(raw).tolist()
