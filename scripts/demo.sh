#!/usr/bin/env bash
# Installs ptqrt into .venv (torch, transformers, the MiniLM checkpoint) and runs `ptqrt demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
"$VENV/bin/ptqrt" demo "$@"
