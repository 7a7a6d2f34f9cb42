#!/usr/bin/env bash
# Trains the embedded default model on this machine's CPU, stage by stage, then evaluates,
# installs and exports it. Hours on 2 cores: `make default-model` runs it in the background with
# its log in runs/default-model.log. Interrupted? Run it again: each stage resumes from its
# runs/<stage>/state.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
date
$BIN/musiq train --config configs/pretrain_synthetic.toml --no-progress
date
$BIN/musiq train --config configs/clive_finetune.toml --no-progress
date
tools/install_default.sh runs/clive/best.safetensors
date
