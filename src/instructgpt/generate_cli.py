"""``instructgpt generate``: sample from a model, one prompt or a JSONL file of them; best-of-n with a reward model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from instructgpt.data import DataError, load_prompts, write_jsonl
from instructgpt.generation import Completion, SamplingParams, generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructgpt generate", description="Sample completions from a model.")
    p.add_argument("--model", required=True, help="model directory, hub id, .gguf file or builtin:base")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (rendered with the model's prompt template)")
    src.add_argument("--prompts", help="prompts file (JSONL {'prompt'} or {'messages'}, or any prompt source)")
    p.add_argument("--out", help="write JSONL results here (default: print)")
    p.add_argument("--raw", action="store_true", help="do not apply the prompt template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--best-of", type=int, default=0,
                   help="sample this many per prompt and keep the n the reward model scores highest")
    p.add_argument("--reward-model", help="reward-model directory (an `instructgpt rm` out_dir or its model/)")
    p.add_argument("--device", default="auto", help="where the models run: auto (cuda when available), cpu, cuda:1 ...")
    return p


def best_of_n(rm, messages: Sequence, results: Sequence[Sequence[Completion]], keep: int = 1,
              batch_size: int = 32) -> tuple[list[list[Completion]], list[list[float]]]:
    """Best-of-n: per prompt, the `keep` completions the reward model `rm` scores highest, best first, with their scores.

    `results[i]` are the n samples for `messages[i]`; every (prompt, completion) pair is scored in one batched pass.
    """
    flat_prompts = [m for m, comps in zip(messages, results) for _ in comps]
    flat_scores = rm.score(flat_prompts, [c.text for comps in results for c in comps], batch_size=batch_size)
    kept, scores, start = [], [], 0
    for comps in results:
        s = flat_scores[start: start + len(comps)]
        start += len(comps)
        order = sorted(range(len(comps)), key=lambda i: -s[i])[:keep]
        kept.append([comps[i] for i in order])
        scores.append([s[i] for i in order])
    return kept, scores


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from instructgpt.modeling import load_model, pick_device
    from instructgpt.prompting import render_prompt

    if args.best_of and not args.reward_model:
        print("instructgpt generate: error: --best-of needs --reward-model", file=sys.stderr)
        return 2
    if args.best_of and args.best_of < args.n:
        print("instructgpt generate: error: --best-of must be >= --n", file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)
        messages = [args.prompt] if args.prompt is not None else [r.messages for r in load_prompts(args.prompts)]
    except (DataError, ValueError) as e:
        print(f"instructgpt generate: error: {e}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model)
    model.to(device)
    texts = [m if args.raw and isinstance(m, str) else render_prompt(tok, m) for m in messages]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.best_of or args.n, stop=tuple(args.stop),
                            frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                            seed=args.seed)
    results = generate(model, tok, texts, params, batch_size=args.batch_size)
    scores = None
    if args.best_of:
        from instructgpt.reward import RewardModel

        rm = RewardModel.load(args.reward_model)
        rm.model.to(device)
        results, scores = best_of_n(rm, messages, results, keep=args.n)
    rows = []
    for i, (msg, comps) in enumerate(zip(messages, results)):
        row = {"prompt": msg} if isinstance(msg, str) else {"messages": msg}
        row["completions"] = [
            {"text": c.text, "finish_reason": c.finish_reason, "logprob": round(sum(c.logprobs), 4),
             "tokens": len(c.token_ids), **({"reward": round(scores[i][j], 4)} if scores else {})}
            for j, c in enumerate(comps)]
        rows.append(row)
    if args.out:
        write_jsonl(args.out, rows)
        print(f"wrote {len(rows)} prompts to {args.out}", file=sys.stderr)
    elif args.prompt is not None:
        for c in rows[0]["completions"]:
            print(c["text"])
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    return 0
