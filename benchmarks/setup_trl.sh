#!/usr/bin/env bash
# TRL for `make bench`, outside the project's venv (the package never imports it). Idempotent.
#   benchmarks/.trl/current : TRL of today (SFTTrainer, RewardTrainer)
#   benchmarks/.trl/ppo     : TRL 1.12.0, the last release with PPO (trl.experimental.ppo; removed in 1.13)
# --no-deps: TRL's dependencies (transformers, accelerate, datasets ...) are the ones already in .venv, so both
# sides of every benchmark run on the same torch/transformers. Each side gets its folder on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")"
PIP="$(cd .. && realpath -m "${PIP:-.venv/bin/pip}")"  # relative to the repository root
TRL_CURRENT="${TRL_CURRENT:-1.16.0}"  # newest TRL when written; works with transformers 5.24
TRL_PPO=1.12.0

install() {  # install <version> <folder>
    local version=$1 dest=.trl/$2
    if [ -d "$dest/trl-$version.dist-info" ]; then
        echo "trl $version already in benchmarks/$dest"
        return
    fi
    rm -rf "$dest" ".trl/dl-$version"
    mkdir -p ".trl/dl-$version"
    "$PIP" download -q --no-deps "trl==$version" -d ".trl/dl-$version" 2> >(grep -v "^WARNING: Location" >&2)
    "$PIP" install -q --no-deps --no-compile --target "$dest" ".trl/dl-$version"/trl-"$version"-*.whl
    rm -rf ".trl/dl-$version"
    echo "installed trl $version into benchmarks/$dest"
}

install "$TRL_CURRENT" current
install "$TRL_PPO" ppo
