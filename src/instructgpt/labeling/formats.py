"""The labeling app's files: the prompts it imports and the JSONL it exports for ``sft`` and ``rm``.

Import (``--prompts FILE.jsonl``), one JSON object per line:

* ``{"prompt": "..."}`` or ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (ending
  with a user turn): a demonstration task, or a ranking task whose K outputs ``--model`` generates;
* ``{"prompt": ... or "messages": ..., "responses": ["...", ...]}`` with 2..9 nonempty responses: a ranking task with
  these outputs (e.g. sampled elsewhere, or from several models).

Export (``instructgpt label export``), one line per (task, labeler) submission:

* ``demonstrations.jsonl``: ``{"prompt", "response", "labeler"}``, or ``{"messages": [..., {"role": "assistant",
  "content": ...}], "labeler"}`` when the prompt was a conversation;
* ``rankings.jsonl``: ``{"prompt" | "messages", "responses", "ranks", "ratings", "flags", "labeler"}`` where
  ``ranks[i]`` is the rank of ``responses[i]`` (1 = best, equal ranks are ties), ``ratings[i]`` is 1..7 and
  ``flags[i]`` lists :data:`instructgpt.labeling.rubric.FLAGS` ids. A ranking that ties every output carries no
  comparison and is left out (and counted).

Both are what :func:`instructgpt.data.load_demonstrations` and :func:`instructgpt.data.load_comparisons` read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

from instructgpt import data, files
from instructgpt.data import DataError
from instructgpt.labeling.agreement import all_tied
from instructgpt.labeling.outputs import generate_outputs
from instructgpt.labeling.rubric import K_MAX, K_MIN
from instructgpt.labeling.store import Store

TASK_KINDS = ("auto", "demonstration", "ranking", "both")
DEMONSTRATIONS_FILE, RANKINGS_FILE = "demonstrations.jsonl", "rankings.jsonl"


@dataclass
class PromptItem:
    """One line of a prompts file."""

    messages: list[dict[str, str]]
    responses: list[str] | None  # given outputs to rank, or None
    file: str
    line: int

    @property
    def source(self) -> str:
        """Where the task came from, shown to the admin: "prompts.jsonl:12"."""
        return f"{os.path.basename(self.file)}:{self.line}"


def read_prompts(path: str) -> list[PromptItem]:
    """Parse a prompts file; a bad line raises :class:`instructgpt.data.DataError` naming file, line and field."""
    if not os.path.isfile(path):
        raise DataError(path, None, None, "no such file")
    items = []
    for file, line, row in data.iter_rows(path):
        if not isinstance(row, dict):  # a malformed line (data's _Malformed: its message and field) or not an object
            raise DataError(file, line, getattr(row, "field", None), getattr(row, "message", None)
                            or f"expected a JSON object, got {type(row).__name__}")
        record = data.parse_prompt(file, line, row)
        responses = row.get("responses")
        if responses is not None:
            if not isinstance(responses, list):
                raise DataError(file, line, "responses", "expected a list of strings")
            if not K_MIN <= len(responses) <= K_MAX:
                raise DataError(file, line, "responses", f"expected {K_MIN}..{K_MAX} responses, got {len(responses)}")
            for j, r in enumerate(responses):
                if not isinstance(r, str):
                    raise DataError(file, line, f"responses[{j}]", f"expected a string, got {type(r).__name__}")
                if not r.strip():
                    raise DataError(file, line, f"responses[{j}]", "empty response")
        items.append(PromptItem(record.messages, responses, file, line))
    if not items:
        raise DataError(path, None, None, "no prompts in file")
    return items


def _key(**parts) -> str:
    """A stable identity for a task, so re-importing a file (e.g. every `serve` start) adds nothing twice."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# (list of prompts as messages) -> K outputs per prompt. See instructgpt.labeling.outputs.
Generator = Callable[[list[list[dict[str, str]]]], list[list[str]]]


@dataclass
class ImportSummary:
    added: int = 0
    already_present: int = 0
    generated: int = 0  # prompts whose outputs a model generated now
    dropped: int = 0  # prompts left out because fewer than 2 usable outputs came back


def import_prompts(store: Store, path: str, *, tasks: str = "auto", overlap: int = 1,
                   generator: Generator | None = None, model_id: str | None = None, k: int = 4, batch_size: int = 8,
                   log: Callable[[str], None] = lambda s: None) -> ImportSummary:
    """Turn a prompts file into tasks.

    `tasks`: "auto" makes ranking tasks from lines with "responses" (and from every line when a `generator` is given)
    and demonstration tasks from the others; "demonstration", "ranking" and "both" force the kind. Outputs are
    generated here, in batches, never while a labeler waits; prompts already imported for the same model are not
    generated again.
    """
    if tasks not in TASK_KINDS:
        raise ValueError(f"tasks must be one of {TASK_KINDS}, got {tasks!r}")
    if overlap < 1:
        raise ValueError(f"overlap must be at least 1, got {overlap}")
    if generator is not None and not K_MIN <= k <= K_MAX:
        raise ValueError(f"k must be {K_MIN}..{K_MAX}, got {k}")
    items = read_prompts(path)
    summary = ImportSummary()
    new: list[dict] = []
    to_generate: list[tuple[PromptItem, str]] = []

    def want(task: dict) -> None:
        if store.has_task(task["dedup_key"]):
            summary.already_present += 1
        else:
            new.append(task)

    for item in items:
        base = {"messages": item.messages, "overlap": overlap, "source": item.source}
        demo = tasks in ("demonstration", "both") or (tasks == "auto" and item.responses is None and generator is None)
        rank = tasks in ("ranking", "both") or (tasks == "auto" and (item.responses is not None or generator))
        if demo:
            want({**base, "kind": "demonstration", "origin": "imported", "responses": None,
                  "dedup_key": _key(kind="demonstration", messages=item.messages)})
        if not rank:
            continue
        if item.responses is not None:
            want({**base, "kind": "ranking", "origin": "imported", "responses": item.responses,
                  "dedup_key": _key(kind="ranking", messages=item.messages, responses=item.responses)})
        elif generator is None:
            raise DataError(item.file, item.line, "responses", "a ranking task needs 'responses', or --model to "
                                                                "generate them")
        else:
            key = _key(kind="ranking", messages=item.messages, model=model_id, k=k)
            if store.has_task(key):
                summary.already_present += 1
            else:
                to_generate.append((item, key))

    if to_generate:
        # a prompt the model's chat template refuses, by its file and line, before anything is sampled
        check = getattr(generator, "check", None)
        if check is not None:
            for item, _ in to_generate:
                with data.rendering(item):
                    check(item.messages)
        log(f"generating {k} outputs for each of {len(to_generate)} prompts with {model_id}")
        outputs = generate_outputs([it.messages for it, _ in to_generate], generator, batch_size=batch_size, log=log)
        for (item, key), texts in zip(to_generate, outputs):
            # An empty sample cannot be ranked or exported; rank what is left if there are still two.
            usable = [t for t in texts if t.strip()]
            if len(usable) < K_MIN:
                summary.dropped += 1
                log(f"{item.source}: dropped, only {len(usable)} nonempty outputs")
                continue
            summary.generated += 1
            new.append({"messages": item.messages, "overlap": overlap, "source": item.source, "kind": "ranking",
                        "origin": f"model:{model_id}", "responses": usable, "dedup_key": key})
    summary.added = store.add_tasks(new)
    summary.already_present += len(new) - summary.added
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Export


def _prompt_fields(messages: list[dict[str, str]]) -> dict:
    """{"prompt": text} for a single user turn (the common case), else {"messages": [...]}."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return {"prompt": messages[0]["content"]}
    return {"messages": messages}


@dataclass
class ExportSummary:
    demonstrations: int = 0
    rankings: int = 0
    all_tied: int = 0  # rankings left out: every output tied
    demonstrations_path: str = ""
    rankings_path: str = ""


def export(store: Store, out_dir: str) -> ExportSummary:
    """Write demonstrations.jsonl and rankings.jsonl into `out_dir` (each file replaced atomically)."""
    demos, rankings = [], []
    summary = ExportSummary()
    for s in store.iter_submissions():
        if s["kind"] == "demonstration":
            if len(s["messages"]) == 1 and s["messages"][0]["role"] == "user":
                demos.append({"prompt": s["messages"][0]["content"], "response": s["response"],
                              "labeler": s["labeler"]})
            else:
                demos.append({"messages": s["messages"] + [{"role": "assistant", "content": s["response"]}],
                              "labeler": s["labeler"]})
        elif all_tied(s["ranks"]):
            summary.all_tied += 1
        else:
            rankings.append({**_prompt_fields(s["messages"]), "responses": s["responses"], "ranks": s["ranks"],
                             "ratings": s["ratings"], "flags": s["flags"], "labeler": s["labeler"]})
    summary.demonstrations_path = os.path.join(out_dir, DEMONSTRATIONS_FILE)
    summary.rankings_path = os.path.join(out_dir, RANKINGS_FILE)
    files.write_jsonl(summary.demonstrations_path, demos)
    files.write_jsonl(summary.rankings_path, rankings)
    summary.demonstrations, summary.rankings = len(demos), len(rankings)
    return summary
