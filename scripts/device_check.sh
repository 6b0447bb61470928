#!/usr/bin/env bash
# The prepared accelerator check (issue 14 item 6): parity against the CPU reference, SFT and
# grounding step time / tokens/s / MFU in bf16 for random SmolLM2-135M- and Qwen3-0.6B-shaped
# models, constrained beam-search throughput and peak memory, as one markdown table.
#
#   bash scripts/device_check.sh [--out FILE] [--device-kind NAME]   # one GPU/TPU, < 8 min
#   bash scripts/device_check.sh --cpu                               # tiny sizes on CPU
#
# Runs from the repository checkout as it is (PYTHONPATH=repo root): nothing is installed
# and nothing is downloaded. PYTHON picks the interpreter (default: python3). The work is in
# scripts/device_check.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/scripts/device_check.py" "$@"
