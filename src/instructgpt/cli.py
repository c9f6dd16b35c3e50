"""``instructgpt <command> [--config FILE.yaml] [key.sub=value ...]``: every command reads a typed config (its
defaults, then the YAML file, then the dotted overrides; the other commands' flags set the same keys).

Commands are imported lazily so ``instructgpt --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional

# stage -> (module, config class): `module.train(cfg)` runs it
STAGES = {
    "pretrain": ("instructgpt.pretrain", "PretrainConfig"),
    "sft": ("instructgpt.sft", "SFTConfig"),
    "rm": ("instructgpt.rm", "RMConfig"),
    "ppo": ("instructgpt.ppo", "PPOConfig"),
    "dpo": ("instructgpt.dpo", "DPOConfig"),
}
# commands with their own arguments -> module with main(argv) -> int
COMMANDS = {
    "generate": "instructgpt.generate_cli",
    "label-sim": "instructgpt.label_sim",
    "eval": "instructgpt.evaluate",
    "pipeline": "instructgpt.pipeline",
    "serve": "instructgpt.serving.cli",
    "label": "instructgpt.labeling.cli",
    "data": "instructgpt.dataprep.cli",
}

HELP = """usage: instructgpt <command> [args]   (instructgpt --version: the installed version)

training stages (instructgpt <stage> [--config FILE.yaml] [key.sub=value ...]):
  pretrain    language-model pretraining (builds the shipped base model)
  sft         supervised fine-tuning on demonstrations
  rm          reward model from K-way rankings
  ppo         PPO-ptx against the reward model
  dpo         direct preference optimisation on the rankings (a baseline beside RM + PPO; not InstructGPT)

other commands (instructgpt <command> [--config FILE.yaml] [flags] [key=value ...]; see --help):
  generate    sample from a model (batched; best-of-n with a reward model)
  label-sim   simulated labelers: rank K samples per prompt with the gold labeler plus noise
  eval        compare policies on held-out prompts
  pipeline    the whole loop: a recipe of every stage (default: the built-in task)
  serve       an OpenAI-compatible HTTP API
  label       the labeling web app
  data        inspect, clean, dedup, mix and augment a data set (writes a new file and a report)
"""


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_stage(stage: str, argv: list[str]) -> int:
    from instructgpt.config import ConfigError, command_error, load_config
    from instructgpt.data import DataError
    from instructgpt.runs import StageError

    mod_name, cls_name = STAGES[stage]
    p = argparse.ArgumentParser(prog=f"instructgpt {stage}", description=f"Run the {stage} stage.")
    p.add_argument("--config", help="YAML config file (stage defaults otherwise)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 out_dir=out/sft")
    args = p.parse_args(argv)
    mod = importlib.import_module(mod_name)
    try:
        cfg = load_config(getattr(mod, cls_name), args.config, args.overrides)
        out = mod.train(cfg)
    except (ConfigError, DataError, StageError) as e:
        return command_error(stage, e)
    print(out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] in ("-V", "--version"):
        from instructgpt import __version__

        print(f"instructgpt {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in STAGES and _available(STAGES[cmd][0]):
        return run_stage(cmd, rest)
    if cmd in COMMANDS and _available(COMMANDS[cmd]):
        return int(importlib.import_module(COMMANDS[cmd]).main(rest) or 0)
    print(f"instructgpt: unknown command '{cmd}'\n\n{HELP}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
