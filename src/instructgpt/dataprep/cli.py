"""``instructgpt data <inspect|clean|dedup|mix|augment>``: prepare a data set; see :mod:`instructgpt.dataprep`.

    instructgpt data inspect --input demos.jsonl --out demos.lines.jsonl
    instructgpt data clean   --input demos.jsonl --out clean.jsonl --redact-pii
    instructgpt data dedup   --input clean.jsonl --out dedup.jsonl --threshold 0.8
    instructgpt data mix     --source a=a.jsonl --source b=b.jsonl --weight a=3 --size 10000 --out mix.jsonl
    instructgpt data augment --input demos.jsonl --out more.jsonl --variants 2
    instructgpt data augment --input prompts.jsonl --out best.jsonl mode=answers --model out/sft/model \\
        --reward-model out/rm --n 8

Each writes OUT (JSONL, the input's kind of data) and OUT.report.json beside it; the input is never written to. Every
setting is a key of the subcommand's config (:mod:`instructgpt.dataprep.configs`): ``--config FILE.yaml`` and
``key=value`` overrides set them too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any, Callable

from instructgpt.config import (ConfigError, add_alias, add_config_arguments, command_error, config_from_args,
                                parse_command_line)
from instructgpt.data import DataError
from instructgpt.dataprep.configs import AugmentConfig, CleanConfig, DedupConfig, InspectConfig, MixConfig
from instructgpt.dataprep.rows import log, write_output

# subcommand -> (config class, module, its function cfg -> (rows, report)). Imported when run, as the top-level
# dispatcher does: dedup and mix need no model, and are spared importing torch and transformers.
SUBCOMMANDS: dict[str, tuple[type, str, str]] = {
    "inspect": (InspectConfig, "instructgpt.dataprep.stats", "run_inspect"),
    "clean": (CleanConfig, "instructgpt.dataprep.cleaning", "run_clean"),
    "dedup": (DedupConfig, "instructgpt.dataprep.dedup", "run_dedup"),
    "mix": (MixConfig, "instructgpt.dataprep.mixing", "run_mix"),
    "augment": (AugmentConfig, "instructgpt.dataprep.augment", "run_augment"),
}


# --------------------------------------------------------------------------------------------------------------------
# Command line


def _common(p: argparse.ArgumentParser, cls: type, with_input: bool = True) -> Callable[..., None]:
    """The flags every subcommand has; returns the helper that adds one of `cls`'s flags."""

    def flag(*names: str, **kw: Any) -> None:
        add_alias(p, cls, *names, key=names[-1][2:].replace("-", "_"), **kw)

    add_config_arguments(p, example="kind=demonstrations")
    if with_input:
        flag("-i", "--input", help="a file, a directory, a Hugging Face dataset or builtin:NAME")
    flag("-o", "--out", help="the JSONL file to write (the report goes beside it: OUT.report.json)")
    flag("--kind", help="the kind of data (auto: the kind most rows are)")
    flag("--skip-bad-lines", help="skip and count bad lines instead of stopping at the first")
    return flag


def _near_flags(flag: Callable[..., None]) -> None:
    flag("--threshold", help="near duplicates: estimated Jaccard similarity of word n-gram sets at least this")
    flag("--num-perm", help="MinHash permutations")
    flag("--ngram", help="words per shingle")
    flag("--on", help="what is compared: the whole row, its prompt or its response(s)")


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}

    p = parsers["inspect"] = argparse.ArgumentParser(
        prog="instructgpt data inspect", description="Counts, token-length percentiles, duplicate rate, empty and "
        "over-long rows, schema per line. OUT holds one row per input line; the report, the summary.")
    flag = _common(p, InspectConfig)
    flag("--tokenizer", help="the model whose tokenizer and prompt template count tokens")
    flag("--max-length", help="a row longer than this many tokens is over-long")
    _near_flags(flag)

    p = parsers["clean"] = argparse.ArgumentParser(
        prog="instructgpt data clean", description="Unicode normal form, control characters, whitespace, optional PII "
        "redaction; drops empty, echoing, over-long and too short rows. Each rule is counted in the report.")
    flag = _common(p, CleanConfig)
    flag("--tokenizer", help="the model whose tokenizer and prompt template count tokens")
    flag("--unicode", help="Unicode normal form")
    flag("--redact-pii", help="emails, card and phone numbers -> [EMAIL] [CARD] [PHONE] (the server's rules)")
    flag("--max-length", help="drop rows longer than this many tokens (null: no limit)")
    flag("--min-response-tokens", help="drop rows with a response shorter than this many tokens")

    p = parsers["dedup"] = argparse.ArgumentParser(
        prog="instructgpt data dedup", description="Drop exact duplicates, then near duplicates found with MinHash-LSH "
        "(datasketch); the first row of each group is kept.")
    flag = _common(p, DedupConfig)
    _near_flags(flag)

    p = parsers["mix"] = argparse.ArgumentParser(
        prog="instructgpt data mix", description="Rows from several sources in proportion to their weights, to a "
        "target size, shuffled with a seed; every row records its provenance.")
    flag = _common(p, MixConfig, with_input=False)
    add_alias(p, MixConfig, "--source", key="sources", metavar="NAME=SOURCE", help="a source to draw from (repeatable)")
    add_alias(p, MixConfig, "--weight", key="weights", metavar="NAME=W", help="a source's weight (default 1)")
    flag("--size", help="rows in the mix (default: as many as the sources give without repeating a row)")
    flag("--seed")

    p = parsers["augment"] = argparse.ArgumentParser(
        prog="instructgpt data augment", description="mode=instructions: prompt rewrites from templates and noise that "
        "keeps the meaning. mode=answers: n sampled answers per prompt, the one a reward model scores highest kept.")
    flag = _common(p, AugmentConfig)
    flag("--mode")
    flag("--variants", help="rewritten copies per row")
    add_alias(p, AugmentConfig, "--template", key="templates", help="a rewrite template holding {prompt} (repeatable; "
                                                                    "replaces the default ones)")
    flag("--model", help="answers: the model sampled")
    flag("--reward-model", help="answers: an `instructgpt rm` out_dir, or builtin:gold")
    flag("-n", "--n", help="answers: samples per prompt")
    flag("--temperature")
    flag("--max-new-tokens")
    flag("--min-reward", help="answers: drop prompts whose best answer scores below this")
    flag("--seed")
    flag("--device", help="answers: where the models run (auto: cuda when available)")
    return parsers


USAGE = """usage: instructgpt data <command> [--config FILE.yaml] [flags] [key=value ...]

Each command reads any supported data source, writes a new JSONL file OUT of the same kind of data and a JSON report
beside it (OUT.report.json); it never writes to its input.

commands:
  inspect   counts, token-length percentiles, duplicate rate, empty and over-long rows, schema per line
  clean     Unicode, control characters, whitespace, PII redaction; drops empty, echoing, over-long rows
  dedup     exact and near duplicates (MinHash-LSH)
  mix       weighted sampling across sources to a target size, with each row's provenance
  augment   prompt rewrites and noise (mode=instructions), or best-of-n answers by a reward model (mode=answers)

instructgpt data <command> --help lists its flags."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"instructgpt data: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    cls, module, function = SUBCOMMANDS[command]
    args = parse_command_line(build_parsers()[command], rest)
    t0 = time.time()
    try:
        cfg = config_from_args(cls, args)
        rows, report = getattr(importlib.import_module(module), function)(cfg)
    except (ConfigError, DataError, ValueError) as e:
        return command_error(f"data {command}", e)
    report["seconds"] = round(time.time() - t0, 3)
    path = write_output(cfg.out, rows, report)
    log(f"wrote {len(rows)} rows to {cfg.out}, the report to {path} ({report['seconds']:.1f}s)")
    return 0
