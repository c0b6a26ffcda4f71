#!/usr/bin/env bash
# The gold-unit baseline (stage III on gold units) of EchoX-3B on one node of 8 GPUs: `accelerate launch` + recipes/3b/echo_gold.yaml.
#   bash recipes/3b/prepare_data.sh   # once: the data under data/full (docs/scale.md)
#   bash recipes/3b/echo_gold.sh            # writes runs/3b/echo-gold/model: the baseline
#   bash recipes/3b/echo_gold.sh --resume   # after a stop: continue from the last checkpoint
# Needs runs/3b/s2t/model and runs/3b/t2c/model (s2t.sh, t2c.sh) first.
# Further arguments go to `echox train` (e.g. --set train.lr=2e-4, --override FILE).
# ACCELERATE_CONFIG: recipes/accelerate/ddp.yaml (default: the plan's choice, resumes exactly),
# zero2.yaml, zero3.yaml or fsdp.yaml (docs/scale.md: memory and caveats);
# NUM_PROCESSES: 8; RUNS: runs/3b (where every stage of this size writes and reads).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/3b}
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-recipes/accelerate/ddp.yaml}" \
    --num_processes "${NUM_PROCESSES:-8}" -m echox.cli train echo \
    --recipe recipes/3b/echo_gold.yaml --out "$RUNS/echo-gold" \
    --init "$RUNS/s2t/model" --t2c-from "$RUNS/t2c/model" "$@"
