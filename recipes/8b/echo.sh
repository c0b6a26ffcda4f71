#!/usr/bin/env bash
# Stage III (Echo) of EchoX-8B on one node of 8 GPUs: `accelerate launch` + recipes/8b/echo.yaml.
#   bash recipes/8b/prepare_data.sh   # once: the data under data/full (docs/scale.md)
#   bash recipes/8b/echo.sh            # writes runs/8b/echo/model: EchoX-8B (bundle it with echox bundle)
#   bash recipes/8b/echo.sh --resume   # after a stop: continue from the last checkpoint
# Needs runs/8b/s2t/model and runs/8b/t2c/model (s2t.sh, t2c.sh) first.
# Further arguments go to `echox train` (e.g. --set train.lr=2e-4, --override FILE).
# ACCELERATE_CONFIG: recipes/accelerate/ddp.yaml (default: the plan's choice, resumes exactly),
# zero2.yaml, zero3.yaml or fsdp.yaml (docs/scale.md: memory and caveats);
# NUM_PROCESSES: 8; RUNS: runs/8b (where every stage of this size writes and reads).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/8b}
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-recipes/accelerate/ddp.yaml}" \
    --num_processes "${NUM_PROCESSES:-8}" -m echox.cli train echo \
    --recipe recipes/8b/echo.yaml --out "$RUNS/echo" \
    --init "$RUNS/s2t/model" --t2c-from "$RUNS/t2c/model" "$@"
