#!/usr/bin/env bash
# Installs ptqrt with its test and Hugging Face extras into .venv and runs the whole CPU test suite.
# Extra arguments go to pytest (e.g. -k minilm, or -m gpu on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
"$VENV/bin/python" -m pytest "$@"
