"""PPO's held-out monitor (never used for training): on held-out prompts, the RM score of sampled and greedy answers,
the KL of the sampled ones to the reference, and a judge's score where one covers the prompts."""

from __future__ import annotations

import torch

from instructgpt.batching import left_pad, right_pad
from instructgpt.generation import SamplingParams, generate
from instructgpt.judges import judge_for
from instructgpt.modeling import logprobs_from_logits
from instructgpt.policy import policy_forward, ref_logits
from instructgpt.prompting import encode_prompt, render_prompt


@torch.no_grad()
def heldout_metrics(policy, ref, reward, tok, prompts: list, response_length: int, temperature: float, seed: int,
                    device, batch_size: int = 64) -> dict:
    """eval/rm_score (sampled at `temperature`), eval/rm_score_greedy, eval/kl (sum_t log pi - log pi_ref on the
    sampled answers, k1 as the objective) and, where a judge covers the prompts, eval/gold_score(_greedy)."""
    texts = [render_prompt(tok, m) for m in prompts]
    greedy = [c[0] for c in generate(policy, tok, texts, SamplingParams(max_new_tokens=response_length,
                                                                        temperature=0.0), batch_size=batch_size)]
    sampled = [c[0] for c in generate(policy, tok, texts, SamplingParams(max_new_tokens=response_length,
                                                                         temperature=temperature, seed=seed),
                                      batch_size=batch_size)]
    out = {"eval/rm_score": float(sum(reward.score(prompts, [c.text for c in sampled])) / len(sampled)),
           "eval/rm_score_greedy": float(sum(reward.score(prompts, [c.text for c in greedy])) / len(greedy))}
    kls = []
    for s in range(0, len(sampled), batch_size):
        chunk = list(zip(prompts[s:s + batch_size], sampled[s:s + batch_size]))
        q, qm = left_pad([encode_prompt(tok, m) for m, _ in chunk], tok.pad_token_id, device)
        r, r_mask = right_pad([c.token_ids or [tok.pad_token_id] for _, c in chunk], tok.pad_token_id, device)
        ids, att = torch.cat([q, r], 1), torch.cat([qm, r_mask], 1)
        R = r.shape[1]
        lp = logprobs_from_logits(policy_forward(policy, ids, att, response_len=R)[0], r, temperature)
        ref_lp = logprobs_from_logits(ref_logits(policy, ref, ids, att, R), r, temperature)
        kls += ((lp - ref_lp) * r_mask.bool()).sum(-1).tolist()
    out["eval/kl"] = sum(kls) / len(kls)
    judge = judge_for(prompts)
    if judge is not None:
        out["eval/gold_score"] = sum(judge.score(prompts, [c.text for c in sampled])) / len(sampled)
        out["eval/gold_score_greedy"] = sum(judge.score(prompts, [c.text for c in greedy])) / len(greedy)
    return out
