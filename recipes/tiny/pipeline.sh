#!/usr/bin/env bash
# The whole tiny recipe on CPU, from nothing to a model bundle that `echox demo` uses.
#
#   bash recipes/tiny/pipeline.sh                 # full corpus (4,200 questions)
#   LIMIT=450 S2T_STEPS=300 bash recipes/tiny/pipeline.sh   # a smaller run (~1.5 h on 2 cores)
#
# Every step is resumable or cached; rerunning skips finished work. One torch thread per
# process: two jobs run side by side on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ECHOX=${ECHOX:-.venv/bin/echox}
LIMIT=${LIMIT:-}
DATA=${DATA:-data/tiny${LIMIT}}
R=${RUNS:-runs/tiny${LIMIT}}
K=${K:-500}; LAYER=${LAYER:-3}; VOCAB=${VOCAB:-2000}
S2T_STEPS=${S2T_STEPS:-3000}; T2C_STEPS=${T2C_STEPS:-3000}; ECHO_STEPS=${ECHO_STEPS:-600}
VOC_STEPS=${VOC_STEPS:-3000}
FEAT="--features whisper:openai/whisper-tiny.en --layer $LAYER"

$ECHOX data build-tiny --out "$DATA" ${LIMIT:+--limit $LIMIT}
[ -f "$R/units/km$K.joblib" ] || $ECHOX units train-kmeans --manifest "$DATA/train/tts.jsonl" $FEAT \
    --k "$K" --max-frames 150000 --out "$R/units/km$K.joblib"
for s in train test; do
  $ECHOX units extract --manifest "$DATA/$s/tts.jsonl" --kmeans "$R/units/km$K.joblib" $FEAT \
      --out "$DATA/$s/tts_units.jsonl"
done
[ -f "$R/units/language/unit_language.json" ] || $ECHOX units train-language \
    --manifest "$DATA/train/tts_units.jsonl" --num-units "$K" --vocab-size "$VOCAB" --out "$R/units/language"

common=(--threads 1 --set "data.unit_language=$R/units/language")
# Stage I and the vocoder side by side, then Stage II, then Stage III.
$ECHOX train s2t --recipe recipes/tiny/s2t.yaml --out "$R/s2t" --max-steps "$S2T_STEPS" --resume \
    --data "$DATA/train/dialogues.jsonl" --eval-data "$DATA/test/dialogues.jsonl" "${common[@]}" &
s2t=$!
$ECHOX train vocoder --recipe recipes/tiny/vocoder.yaml --out "$R/vocoder" --max-steps "$VOC_STEPS" \
    --data "$DATA/train/tts_units.jsonl" --set "vocoder.num_units=$K"
$ECHOX train t2c --recipe recipes/tiny/t2c.yaml --out "$R/t2c" --max-steps "$T2C_STEPS" --resume \
    --data "$DATA/train/tts_units.jsonl" --eval-data "$DATA/test/tts_units.jsonl" "${common[@]}"
wait "$s2t"
$ECHOX train echo --recipe recipes/tiny/echo.yaml --init "$R/s2t/model" --t2c-from "$R/t2c/model" \
    --out "$R/echo" --max-steps "$ECHO_STEPS" --resume \
    --data "$DATA/train/dialogues.jsonl" --eval-data "$DATA/test/dialogues.jsonl" "${common[@]}"
# the mel vocoder: HIFIGAN=small (the shipped V2-size student, real time on a CPU core),
# universal (the V1 teacher, best quality, ~0.5 s per second of audio), or a folder
$ECHOX bundle --model "$R/echo/model" --vocoder "$R/vocoder/model" --unit-language "$R/units/language" \
    --hifigan "${HIFIGAN:-small}" --slim --out "$R/bundle"
mkdir -p "${ECHOX_CACHE:-$HOME/.cache/echox}/models"
rm -rf "${ECHOX_CACHE:-$HOME/.cache/echox}/models/tiny"
cp -r "$R/bundle" "${ECHOX_CACHE:-$HOME/.cache/echox}/models/tiny"
echo "bundle installed: \`echox demo\` now uses it"
$ECHOX eval --model "$R/bundle" --benchmark "local:$DATA/test/qa.jsonl" --mode s2s --out "$R/eval/s2s"
