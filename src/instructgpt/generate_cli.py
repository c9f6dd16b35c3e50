"""``instructgpt generate``: sample from a model, one prompt or a JSONL file of them; best-of-n with a reward model."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Optional

from instructgpt.config import (ConfigError, add_alias, add_config_arguments, command_error, config_from_args,
                                parse_command_line)
from instructgpt.best_of import best_of_n
from instructgpt.data import DataError, load_prompts, rendered_prompts
from instructgpt.files import write_jsonl
from instructgpt.generation import SamplingParams, generate
from instructgpt.modeling import load_model, pick_device
from instructgpt.prompting import render_prompt
from instructgpt.reward import RewardModel


@dataclass
class GenerateConfig:
    """``instructgpt generate``'s settings."""

    model: Optional[str] = None  # model directory, hub id, .gguf file or builtin:base
    prompt: Optional[str] = None  # one prompt (rendered with the model's prompt template) ...
    prompts: Optional[str] = None  # ... or a prompts file (JSONL {'prompt'} or {'messages'}, or any prompt source)
    out: Optional[str] = None  # write JSONL results here (None: print)
    raw: bool = False  # do not apply the prompt template: --prompt, or a prompts file's {"prompt"} rows, as they are
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # completions per prompt
    stop: list[str] = field(default_factory=list)  # stop sequences
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    batch_size: int = 32
    best_of: int = 0  # sample this many per prompt and keep the n the reward model scores highest
    reward_model: Optional[str] = None  # an `instructgpt rm` out_dir or its model/
    device: str = "auto"  # where the models run: auto (cuda when available), cpu, cuda:1 ...

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: required")
        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("prompt, prompts: give one of the two")
        if self.best_of and not self.reward_model:
            raise ConfigError("best_of: needs reward_model")
        if self.best_of and self.best_of < self.n:
            raise ConfigError(f"best_of: must be >= n ({self.n}), got {self.best_of}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructgpt generate", description="Sample completions from a model.")
    add_config_arguments(p, example="max_new_tokens=128 stop=[END]")

    def flag(*names, container=p, **kw):
        add_alias(container, GenerateConfig, *names, key=names[-1][2:].replace("-", "_"), **kw)

    flag("--model", help="model directory, hub id, .gguf file or builtin:base")
    src = p.add_mutually_exclusive_group()
    flag("--prompt", container=src, help="one prompt (rendered with the model's prompt template)")
    flag("--prompts", container=src,
         help="prompts file (JSONL {'prompt'} or {'messages'}, or any prompt source)")
    flag("--out", help="write JSONL results here (default: print)")
    flag("--raw", help="do not apply the prompt template: continue --prompt, or each {\"prompt\"} row of --prompts, "
                       "as it is")
    flag("--max-new-tokens")
    flag("--temperature")
    flag("--top-p")
    flag("--top-k")
    flag("-n", "--n", help="completions per prompt")
    flag("--stop", help="stop sequence (repeatable)")
    flag("--frequency-penalty")
    flag("--presence-penalty")
    flag("--seed")
    flag("--batch-size")
    flag("--best-of", help="sample this many per prompt and keep the n the reward model scores highest")
    flag("--reward-model", help="reward-model directory (an `instructgpt rm` out_dir or its model/)")
    flag("--device", help="where the models run: auto (cuda when available), cpu, cuda:1 ...")
    return p


def raw_prompt(record) -> str:
    """--raw: the text of a prompt file's record that is one user turn (a {"prompt"} row), continued as it is."""
    if len(record.messages) != 1 or record.messages[0]["role"] != "user":
        raise DataError(record.file, record.line, "messages", "--raw continues a prompt's text as it is; this is a "
                                                              "conversation, which only a chat template renders")
    return record.messages[0]["content"]


def main(argv: list[str]) -> int:
    args = parse_command_line(build_parser(), argv)
    try:
        cfg = config_from_args(GenerateConfig, args)
        device = pick_device(cfg.device)
        records = None if cfg.prompt is not None else load_prompts(cfg.prompts)
        messages = [cfg.prompt] if records is None else [r.messages for r in records]
        raw = ([cfg.prompt] if records is None else [raw_prompt(r) for r in records]) if cfg.raw else None
    except (ConfigError, DataError, ValueError) as e:
        return command_error("generate", e)
    model, tok = load_model(cfg.model)
    model.to(device)
    try:  # a conversation the chat template refuses is named by its file and line
        texts = raw if raw is not None else (
            [render_prompt(tok, cfg.prompt)] if records is None else rendered_prompts(tok, records))
    except (DataError, ValueError) as e:
        return command_error("generate", e)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, n=cfg.best_of or cfg.n, stop=tuple(cfg.stop),
                            frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty,
                            seed=cfg.seed)
    results = generate(model, tok, texts, params, batch_size=cfg.batch_size)
    scores = None
    if cfg.best_of:
        rm = RewardModel.load(cfg.reward_model)
        rm.model.to(device)
        results, scores = best_of_n(rm, messages, results, keep=cfg.n)
    rows = []
    for i, (msg, comps) in enumerate(zip(messages, results)):
        row = {"prompt": msg} if isinstance(msg, str) else {"messages": msg}
        row["completions"] = [
            {"text": c.text, "finish_reason": c.finish_reason, "logprob": round(sum(c.logprobs), 4),
             "tokens": len(c.token_ids), **({"reward": round(scores[i][j], 4)} if scores else {})}
            for j, c in enumerate(comps)]
        rows.append(row)
    if cfg.out:
        write_jsonl(cfg.out, rows)
        print(f"wrote {len(rows)} prompts to {cfg.out}", file=sys.stderr)
    elif cfg.prompt is not None:
        for c in rows[0]["completions"]:
            print(c["text"])
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    return 0
