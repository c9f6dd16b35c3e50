"""The policy's and the critic's forward passes, as PPO reads them.

The policy is any causal LM; the critic is V(s) at every position, either a separate value model (InstructGPT's:
initialised from the reward model, trunk and head) or a zero-initialised scalar head on the policy's own trunk
(lm-human-preferences; ``ppo.value_model: policy``). PPO holds one `Critic` and never asks which kind it is.
"""

from __future__ import annotations

import contextlib

import torch

from instructgpt.modeling import last_attention_only_at, last_mlp_only_at, position_ids_from_mask
from instructgpt.reward import token_values


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) at every position: (B, R, V) -> (B, R)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def trimmed_positions(response_len: int | None, trim: bool) -> int | None:
    """How many trailing positions a PPO forward reads with `response_len` = R: R + 1 (the logits predicting the
    response, and the values of the states before its tokens, with the last position kept as `logits_to_keep` keeps
    it), where `trim` asks a part of the last layer to run there alone; None otherwise (`last_mlp_only_at`,
    `last_attention_only_at`)."""
    return response_len + 1 if trim and response_len is not None else None


@contextlib.contextmanager
def last_layer_trimmed(model, response_len: int | None, trim_mlp: bool, trim_attention: bool):
    """Within: `model`'s last layer runs its MLP (`trim_mlp`) and its attention's queries (`trim_attention`) at the
    positions a PPO forward reads alone (`trimmed_positions`)."""
    with (last_mlp_only_at(model, trimmed_positions(response_len, trim_mlp)),
          last_attention_only_at(model, trimmed_positions(response_len, trim_attention))):
        yield


def policy_forward(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: bool = False,
                   response_len: int | None = None, trim_mlp: bool = False,
                   trim_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, last hidden state (B, T, d) when `hidden`, else None) with position ids that ignore left padding.

    With `response_len` = R the logits are those of the last R + 1 positions, (B, R + 1, V): positions T-R-1 .. T-1,
    the first R predicting the last R tokens and the last predicting nothing in the row, which `logprobs_from_logits`
    leaves out given R labels; so the LM head never runs over the query (`logits_to_keep`). Otherwise (B, T, V).
    `trim_mlp` (with `response_len`): the last layer's MLP too runs at the last R + 1 positions only
    (`last_mlp_only_at`), and `trim_attention` its attention's queries (`last_attention_only_at`); the hidden states
    are then the model's at those positions alone (a value head reads no others).
    """
    # R + 1 positions, the last left to logprobs_from_logits: R indices as `logits_to_keep` would run the head over
    # one row fewer, but under bf16 autocast its weight gradient (a sum over R rows, not R + 1) would round
    # differently, and a PPO run would no longer repeat an earlier version's bitwise; slicing the last off here would
    # cost a zero-filled copy of the logits' gradient in the backward
    kw = {"logits_to_keep": response_len + 1} if response_len is not None else {}
    with last_layer_trimmed(policy, response_len, trim_mlp, trim_attention):
        out = policy(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                     output_hidden_states=hidden, **kw)
    # fp32 log-probs under train.mixed_precision (a no-op in fp32)
    return out.logits.float(), (out.hidden_states[-1] if hidden else None)


@torch.no_grad()
def ref_logits(policy, ref, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
               trim_mlp: bool = False, trim_attention: bool = False) -> torch.Tensor:
    """The reference's response logits, (B, R + 1, V) as `policy_forward`'s: the frozen SFT model, or (LoRA, `ref`
    None) the policy with its adapter off."""
    trim = {"trim_mlp": trim_mlp, "trim_attention": trim_attention}
    if ref is not None:
        return policy_forward(ref, input_ids, attention_mask, response_len=response_len, **trim)[0]
    with policy.disable_adapter():
        return policy_forward(policy, input_ids, attention_mask, response_len=response_len, **trim)[0]


class ValueHead(torch.nn.Module):
    """A scalar head on the policy's last hidden state (`ppo.value_model: policy`); zero-initialised (checklist)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.head = torch.nn.Linear(d_model, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).float()


class Critic:
    """V(state) at every position of (query + response) rows, from one network: a value model of its own, or a
    `ValueHead` that reads the policy's hidden states (pass them, from `policy_forward(hidden=True)`)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module  # replaced by accelerate's prepared module before training
        self.reads_policy = isinstance(module, ValueHead)  # values from the policy's own forward, not one of theirs

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               policy_hidden: torch.Tensor | None = None, response_len: int | None = None,
               trim_mlp: bool = False, trim_attention: bool = False) -> torch.Tensor:
        """(B, T) values; a head needs `policy_hidden` (B, T, d). `trim_mlp` (`trim_attention`) with `response_len`
        = R: only the values of the last R + 1 positions are read, and a value model's last MLP (its last
        attention's queries) runs there alone (`trimmed_positions`): the others are not the model's."""
        if self.reads_policy:
            return self.module(policy_hidden)
        with last_layer_trimmed(self.module, response_len, trim_mlp, trim_attention):
            return token_values(self.module, input_ids, attention_mask)  # (under DDP, through its wrapper)

    def parameters(self):
        return self.module.parameters()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
