#!/usr/bin/env bash
# The whole tiny recipe on CPU, from nothing to the model bundle that `echox demo` uses.
#
#   bash recipes/tiny/pipeline.sh                 # the full corpus (3,300 train / 300 test)
#   LIMIT=450 S2T_STEPS=300 bash recipes/tiny/pipeline.sh   # a smaller run
#   STEP=t2c bash recipes/tiny/pipeline.sh        # one step only (data, mix, units, ttsx, xans,
#                                                 #  ctc, s2t, t2c, echo, gold, bundle, eval;
#                                                 #  vocoder only when named)
#   STEP=data,units,ttsx,t2c THREADS=2 OMP_NUM_THREADS=2 bash ...  # several steps in order, on
#                                                 #  both cores
#   BIGBENCH=/path/to/bigbench STEP=ttsx bash ... # extra T2C sentences (make_tts_text.py)
#   T2C_INIT=recipes/tiny/t2c-warm T2C_LR=3e-4 T2C_STEPS=1500 STEP=t2c bash ...  # continue the kept
#                                                 #  T2C at a lower lr (how t2c-warm was made, session 24)
#   S2T_THREADS=2 OMP_NUM_THREADS=2 STEP=s2t bash ...  # Stage I alone on both cores
#   S2T_INIT=recipes/tiny/s2t-warm S2T_RUN=runs/tiny/s2t2 STEP=s2t bash ...  # continue the kept
#                                                 #  Stage I in a new run folder (echo/gold use it)
#   CTC_INIT=recipes/tiny/s2t-warm STEP=ctc bash ...  # the adapter's CTC-only pre-training from
#                                                 #  a kept Stage I (Stage I then starts from it)
#
# Every step is resumable or cached; rerunning skips finished work (training resumes from its
# last checkpoint; bundle and the vocoder's ONNX folder are made again). Relative paths (DATA,
# RUNS, ...) are from the repository's root, where the script runs. One torch thread per process: S2T runs beside the unit steps and the T2C on
# a 2-core machine. The units are those of the committed k500 vocoder
# (recipes/tiny/vocoder-k500), so its int8 ONNX vocoder voices the new model unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ECHOX=${ECHOX:-.venv/bin/echox}
LIMIT=${LIMIT:-}
DATA=${DATA:-data/tiny${LIMIT}}
R=${RUNS:-runs/tiny${LIMIT}}
STEP=${STEP:-all}
VOICE=${VOICE:-en-gb}          # a further training voice (never en-us: the test voice)
ASR_EXTRA=${ASR_EXTRA-recipes/tiny/asr_extra.jsonl}  # questions about non-corpus subjects, as ASR turns
S2T_RUN=${S2T_RUN:-$R/s2t}     # Stage I's run folder (its model/ is S2T_MODEL's default)
T2C_RUN=${T2C_RUN:-$R/t2c}     # Stage II's run folder; its best/ is T2C_MODEL's default
# the Stage I model Echo and gold start from; on a new machine, the shipped bundle's S2T part:
# echox train export --model src/echox/assets/models/tiny --drop-echo --out runs/tiny/s2t-v1,
# then S2T_MODEL=runs/tiny/s2t-v1 (not the bundle itself: it would keep its old echo decoder)
S2T_MODEL=${S2T_MODEL:-$S2T_RUN/model}
# the unit language (docs/units.md) and the T2C that Echo/gold start from and eval measures; on a
# new machine, the kept pair: UNIT_LANG=recipes/tiny/t2c-warm/unit_language T2C_MODEL=recipes/tiny/t2c-warm
# UNIT_LANG=none: the T2C, Echo and gold speak the K = 500 units themselves, no unit language
# (docs/units.md; session 49/50: a raw-unit T2C warm-started from t2c-warm, T2C_INIT=recipes/tiny/
# t2c-warm is converted first by recipes/tiny/t2c_to_raw_units.py)
UNIT_LANG=${UNIT_LANG:-$R/units/language}
T2C_MODEL=${T2C_MODEL:-$T2C_RUN/best}
ECHO_RUN=${ECHO_RUN:-$R/echo}  # Stage III's run folder, and the gold-unit baseline's
GOLD_RUN=${GOLD_RUN:-$R/gold}
# 1 (the default; ECHO_EXTRA= for none): Stage III also trains on the asr_extra questions
# (STEP=mix spoke them), answered by the corpus's text LLM (train/dialogues_extra.jsonl); the
# gold-unit baseline too, on the units of those answers spoken by piper (STEP=xans:
# train/dialogues_extra_units.jsonl). The shipped v4 was trained so (docs/results.md, session 27)
ECHO_EXTRA=${ECHO_EXTRA-1}
[ -n "$ASR_EXTRA" ] || ECHO_EXTRA=   # no asr_extra questions (ASR_EXTRA=""): no extra dialogues
# speech units by beam search over UNIT_BEAMS hypotheses (1 = greedy) in the bundles (v2.1), and
# over LABEL_BEAMS in the echo step's pseudo-labels: 4 beams there cost several times the labelling
# time and gave no better Echo (docs/results.md, session 23), so greedy by default
UNIT_BEAMS=${UNIT_BEAMS:-4}
LABEL_BEAMS=${LABEL_BEAMS:-1}
THREADS=${THREADS:-1}          # torch threads of the T2C/Echo/gold/units steps (S2T: S2T_THREADS)
KM=recipes/tiny/vocoder-k500/km500.joblib
VOCODER=${VOCODER:-recipes/tiny/vocoder-k500/vocoder}  # the bundles' vocoder (STEP=vocoder makes another)
VOCAB=${VOCAB:-2000}
CTC_RUN=${CTC_RUN:-$R/ctc}     # the CTC-only pre-training's run folder; Stage I starts from its model/
CTC_STEPS=${CTC_STEPS:-2000}   # batches of 32 ASR clips (0 = no CTC-only pre-training)
# Stage I and III: the shipped v1's; Stage II: recipes/tiny/t2c-warm's (4,000 steps on the 13,600
# utterances of the units and ttsx steps; v1's T2C had 3,000 on the 6,600 corpus ones)
S2T_STEPS=${S2T_STEPS:-3000}; T2C_STEPS=${T2C_STEPS:-4000}; ECHO_STEPS=${ECHO_STEPS:-1000}
# to continue a trained Echo / gold-unit model instead of starting from S2T_MODEL (session 29:
# ECHO_INIT=runs/tiny/echo7/model ECHO_LR=2e-4 ECHO_STEPS=1200 ECHO_RUN=runs/tiny/echo9), and the
# learning rate of both (default: recipes/tiny/echo.yaml's 3e-4)
ECHO_INIT=${ECHO_INIT:-}; GOLD_INIT=${GOLD_INIT:-}; ECHO_LR=${ECHO_LR:-}
# ECHO_JOINT=1: the paper's joint Stage III loss (L_echo + λ·L_den + L_S2T; the S2T model trains
# too, train.freeze_s2t=false), for Echo and the gold-unit baseline alike; about 3x the time per
# example of the frozen S2T model on a CPU (session 30: ECHO_BATCH=8 at 0.19 step/s, 1.5 examples/s;
# echo7's frozen batches of 16: about 5 examples/s)
ECHO_JOINT=${ECHO_JOINT:-}; ECHO_BATCH=${ECHO_BATCH:-}
# ECHO_SEED: the batch order's seed (default 0). A continued run (ECHO_INIT/GOLD_INIT) with the seed
# its init ran with draws the same batches in the same order again (session 31); give it another
ECHO_SEED=${ECHO_SEED:-}
# ECHO_ACCUM: batches of ECHO_BATCH accumulated per step, for the same step in less memory (session
# 51: raw-unit targets of batch 16 peaked at 20 GB; ECHO_BATCH=8 ECHO_ACCUM=2 halves the peak)
ECHO_ACCUM=${ECHO_ACCUM:-}
stage3=(${ECHO_LR:+--set "train.lr=$ECHO_LR"} ${ECHO_JOINT:+--set train.freeze_s2t=false}
        ${ECHO_BATCH:+--set "train.batch_size=$ECHO_BATCH"} ${ECHO_SEED:+--set "train.seed=$ECHO_SEED"}
        ${ECHO_ACCUM:+--set "train.grad_accum=$ECHO_ACCUM"})
TTSX_LIMIT=${TTSX_LIMIT:-7000}  # extra T2C sentences spoken by piper (0 = all 17,952)
# their units come from 10 s windows (4.4x faster; the sentences are short, see UNITS_WINDOW)
TTSX_WINDOW=${TTSX_WINDOW:-10}
# UNITS_WINDOW=10: extract units in 10 s Whisper windows, 4.4x faster than the 30 s the k-means
# and vocoder were trained on; the vocoder's WER on them was 0.223 vs 0.215 (40 answers,
# docs/units.md). Off by default: the measured T2Cs were trained on 30 s units.
run() { [ "$STEP" = all ] || [[ ",$STEP," == *",$1,"* ]]; }  # STEP=all, one step, or a list: units,t2c
named() { [ "$STEP" != all ] && run "$1"; }  # a step asked for by name (not only within all)
die() { echo "pipeline: $*" >&2; exit 2; }
STEPS=" data mix units ttsx xans ctc s2t t2c echo gold vocoder bundle eval "
# Everything below is checked before any step runs: a misspelt step ran nothing and succeeded,
# and a bad number or path failed only when its step came, hours into STEP=all.
if [ "$STEP" != all ]; then
  [[ "$STEP" =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]] || die "STEP '$STEP': give step names separated by commas (STEP=units,t2c), or all"
  IFS=, read -ra asked <<< "$STEP"
  for s in "${asked[@]}"; do
    [[ "$STEPS" == *" $s "* ]] || die "unknown STEP '$s'; steps:$STEPS(or all)"
  done
fi
for v in CTC_STEPS TTSX_LIMIT; do  # whole numbers, 0 allowed (0: none, all)
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
for v in S2T_STEPS T2C_STEPS ECHO_STEPS THREADS UNIT_BEAMS LABEL_BEAMS S2T_THREADS ECHO_BATCH ECHO_ACCUM LIMIT \
    VOC_STEPS VOC_ROUNDS VOCAB; do
  [ -z "${!v:-}" ] || [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a whole number >= 1, got '${!v}'"
done
[ "$VOCAB" -ge 500 ] || die "VOCAB must be at least the 500 units, got $VOCAB"
[ -z "$ECHO_SEED" ] || [[ "$ECHO_SEED" =~ ^[0-9]+$ ]] || die "ECHO_SEED must be a whole number, got '$ECHO_SEED'"
for v in T2C_LR ECHO_LR UNITS_WINDOW TTSX_WINDOW; do
  [ -z "${!v:-}" ] || [[ "${!v}" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
    || die "$v must be a number, got '${!v}'"
done
for v in S2T_INIT CTC_INIT T2C_INIT ECHO_INIT GOLD_INIT; do  # the warm starts: folders that exist
  [ -z "${!v:-}" ] || [ -d "${!v}" ] || die "$v=${!v}: no such folder"
done
[ -x "$ECHOX" ] || [ "$ECHOX" != .venv/bin/echox ] || die "no $ECHOX: set up first (bash scripts/setup.sh)"
if named ttsx && { [ -z "${BIGBENCH:-}" ] || [ ! -e "$BIGBENCH" ]; }; then
  die "ttsx: set BIGBENCH to the BIG-bench sdist or folder (see make_questions.py)${BIGBENCH:+; $BIGBENCH does not exist}"
fi
RAW=; ulset=$UNIT_LANG; ul=(--unit-language "$UNIT_LANG")  # ul: the bundles' unit language
if [ "$UNIT_LANG" = none ]; then RAW=1; ulset=null; ul=(); fi
common=(--threads "$THREADS" --set "data.unit_language=$ulset")
if [ -n "$RAW" ] && [ -n "${T2C_INIT:-}" ] && [ -d "$T2C_INIT/unit_language" ] && run t2c; then
  # its unit-language rows mapped to the raw units, once per source weights (their checksums)
  raw_init="$R/t2c-raw-init-$(sha1sum < "$T2C_INIT/checksums.json" | cut -c1-12)"
  [ -f "$raw_init/config.json" ] || .venv/bin/python recipes/tiny/t2c_to_raw_units.py "$T2C_INIT" "$raw_init"
  T2C_INIT=$raw_init
fi

if run data; then
  $ECHOX data build-tiny --out "$DATA" ${LIMIT:+--limit $LIMIT}
fi
if run mix; then  # ASR turns + the further voice (Stage I only), + more ASR text (ASR_EXTRA="" for none)
  tx=(); [ -f "$DATA/tts_extra/tts.jsonl" ] && tx=(--asr-tts "$DATA/tts_extra/tts.jsonl")
  $ECHOX data s2t-mix --corpus "$DATA" --voice "$VOICE" ${ASR_EXTRA:+--asr-extra "$ASR_EXTRA"} "${tx[@]}"
fi
if run units; then
  for s in train test; do
    $ECHOX units extract --manifest "$DATA/$s/tts.jsonl" --kmeans "$KM" --out "$DATA/$s/tts_units.jsonl" \
        --threads "$THREADS" ${UNITS_WINDOW:+--window-seconds $UNITS_WINDOW}
  done
  [ -n "$RAW" ] || [ -f "$UNIT_LANG/unit_language.json" ] || $ECHOX units train-language \
      --manifest "$DATA/train/tts_units.jsonl" --num-units 500 --vocab-size "$VOCAB" --out "$UNIT_LANG"
  for s in train test; do  # gold units on each answer: the baseline's targets
    $ECHOX units attach --dialogues "$DATA/$s/dialogues.jsonl" --tts-units "$DATA/$s/tts_units.jsonl" \
        --on-missing drop --out "$DATA/$s/dialogues_units.jsonl"
  done
fi
if run ttsx; then  # more for the T2C to learn pronunciation from: qa_wikidata facts, test held out
  if [ -n "${BIGBENCH:-}" ]; then
    .venv/bin/python recipes/tiny/make_tts_text.py --source "$BIGBENCH" --corpus "$DATA" \
        --out "$DATA/tts_extra" --limit "$TTSX_LIMIT" --workers 2
    $ECHOX units extract --manifest "$DATA/tts_extra/tts.jsonl" --kmeans "$KM" --threads "$THREADS" \
        --out "$DATA/tts_extra/tts_units.jsonl" ${TTSX_WINDOW:+--window-seconds $TTSX_WINDOW}
    # the same clips are ASR turns for Stage I too (train/asr_tts.jsonl)
    $ECHOX data s2t-mix --corpus "$DATA" --voice "" --no-asr --asr-tts "$DATA/tts_extra/tts.jsonl"
  else  # (named without BIGBENCH, it was refused above)
    echo "ttsx: BIGBENCH (the BIG-bench sdist or folder, see make_questions.py) is not set; skipped" >&2
  fi
fi
# the extra questions' answers: the corpus's LLM answers them, piper speaks the answers (~35 min
# on 2 cores); their units are more T2C data (the t2c step reads them when they exist) and the
# gold units of the extra Stage III dialogues (the gold step's, with ECHO_EXTRA). STEP=all runs it
# with ECHO_EXTRA=1 (the default) only.
if { [ "$STEP" != all ] && run xans; } || { [ "$STEP" = all ] && [ -n "$ECHO_EXTRA" ]; }; then
  [ -n "$ASR_EXTRA" ] || { echo "xans: needs the asr_extra questions (ASR_EXTRA, STEP=mix)" >&2; exit 2; }
  $ECHOX data s2t-mix --corpus "$DATA" --voice '' --no-asr --echo-extra --speak-answers \
      --llm-threads "$THREADS"
  $ECHOX units extract --manifest "$DATA/train/answers_extra_tts.jsonl" --kmeans "$KM" \
      --out "$DATA/train/answers_extra_units.jsonl" --threads "$THREADS" \
      ${UNITS_WINDOW:+--window-seconds $UNITS_WINDOW}
  $ECHOX units attach --dialogues "$DATA/train/dialogues_extra.jsonl" \
      --tts-units "$DATA/train/answers_extra_units.jsonl" --on-missing drop \
      --out "$DATA/train/dialogues_extra_units.jsonl"
fi
asrx=(); for f in asr_extra asr_tts; do [ -f "$DATA/train/$f.jsonl" ] && asrx+=("$DATA/train/$f.jsonl"); done
if run ctc && [ "$CTC_STEPS" -gt 0 ]; then
  # The adapter alone on the CTC loss of every ASR clip, its softmax over the transcripts' token
  # ids: many cheap passes over the audio before Stage I (docs/training.md). CTC_INIT: start
  # from an earlier Stage I model (else a fresh adapter).
  init=(); [ -n "${CTC_INIT:-}" ] && init=(--init "$CTC_INIT")
  $ECHOX train s2t --recipe recipes/tiny/s2t.yaml --out "$CTC_RUN" --max-steps "$CTC_STEPS" --resume "${init[@]}" \
      --data "$DATA/train/asr.jsonl" "${asrx[@]}" --threads "${S2T_THREADS:-1}" \
      --set train.ctc_only=true --set train.batch_size=32 --set train.warmup_steps=20 \
      --set train.eval_every=0 --set train.save_every=100
fi
if run s2t; then
  # S2T_INIT: continue from an earlier Stage I model (e.g. a slim copy kept from a run on another
  # machine); S2T_STEPS then counts this run's steps only. Without it, Stage I starts from the
  # CTC-only pre-training's model when there is one.
  init=(); [ -n "${S2T_INIT:-}" ] && init=(--init "$S2T_INIT")
  [ -z "${S2T_INIT:-}" ] && [ -f "$CTC_RUN/model/config.json" ] && init=(--init "$CTC_RUN/model")
  $ECHOX train s2t --recipe recipes/tiny/s2t.yaml --out "$S2T_RUN" --max-steps "$S2T_STEPS" --resume "${init[@]}" \
      --data "$DATA/train/dialogues.jsonl" "$DATA/train/dialogues_$VOICE.jsonl" "$DATA/train/asr.jsonl" "${asrx[@]}" \
      --eval-data "$DATA/test/dialogues.jsonl" --threads "${S2T_THREADS:-1}"
fi
if run t2c; then
  extra=(); for f in tts_extra/tts_units train/answers_extra_units; do  # ttsx and xans, when made
    [ -f "$DATA/$f.jsonl" ] && extra+=("$DATA/$f.jsonl"); done
  # T2C_INIT: continue from a kept T2C (e.g. recipes/tiny/t2c-warm) with T2C_LR (e.g. 3e-4)
  init=(); [ -n "${T2C_INIT:-}" ] && init=(--init "$T2C_INIT")
  $ECHOX train t2c --recipe recipes/tiny/t2c.yaml --out "$T2C_RUN" --max-steps "$T2C_STEPS" --resume \
      "${init[@]}" ${T2C_LR:+--lr $T2C_LR} \
      --data "$DATA/train/tts_units.jsonl" "${extra[@]}" --eval-data "$DATA/test/tts_units.jsonl" \
      "${common[@]}"
fi
if { run echo || run gold; } && [ "$T2C_MODEL" = "$T2C_RUN/best" ] && [ -d "$T2C_RUN/checkpoints" ] \
    && [ ! -f "$T2C_RUN/model/config.json" ]; then
  echo "pipeline: warning: $T2C_RUN has not finished (no model/): Stage III learns the labels of its best checkpoint so far" >&2
fi
if run echo; then
  edata=("$DATA/train/dialogues.jsonl")
  if [ -n "$ECHO_EXTRA" ]; then  # Echo needs no answer audio: the spoken asr_extra questions too
    $ECHOX data s2t-mix --corpus "$DATA" --voice '' --no-asr --echo-extra --llm-threads "$THREADS"
    edata+=("$DATA/train/dialogues_extra.jsonl")
  fi
  $ECHOX train echo --recipe recipes/tiny/echo.yaml --init "${ECHO_INIT:-$S2T_MODEL}" --t2c-from "$T2C_MODEL" \
      --out "$ECHO_RUN" --max-steps "$ECHO_STEPS" --resume --set "model.t2c.beams=$LABEL_BEAMS" \
      "${stage3[@]}" \
      --data "${edata[@]}" --eval-data "$DATA/test/dialogues.jsonl" "${common[@]}"
fi
if run gold; then  # the baseline the paper argues against: same steps, gold units of the answer audio
  # the same frozen S2T model: it reads the response states Stage III cached (keyed by the S2T
  # weights, so a stale entry is never read)
  mkdir -p "$ECHO_RUN/states" "$GOLD_RUN"
  [ -e "$GOLD_RUN/states" ] || ln -s "$(realpath --relative-to="$GOLD_RUN" "$ECHO_RUN/states")" "$GOLD_RUN/states"
  gdata=("$DATA/train/dialogues_units.jsonl")
  if [ -n "$ECHO_EXTRA" ]; then  # the same dialogues as Echo's
    [ -f "$DATA/train/dialogues_extra_units.jsonl" ] || {
      echo "gold: ECHO_EXTRA needs $DATA/train/dialogues_extra_units.jsonl: run STEP=xans first" >&2; exit 2; }
    gdata+=("$DATA/train/dialogues_extra_units.jsonl")
  fi
  $ECHOX train echo --recipe recipes/tiny/echo.yaml --init "${GOLD_INIT:-$S2T_MODEL}" --t2c-from "$T2C_MODEL" \
      --target gold-units --out "$GOLD_RUN" --max-steps "$ECHO_STEPS" --resume \
      "${stage3[@]}" \
      --data "${gdata[@]}" --eval-data "$DATA/test/dialogues_units.jsonl" "${common[@]}"
fi
# the vocoder's unit->mel continued on the units of all training utterances (corpus + xans answers,
# 10,600), from recipes/tiny/vocoder-k500/vocoder-v1; only when named (STEP=vocoder). VOC_STEPS
# steps at lr 2e-4, then twice as many from there with another seed, then the int8 ONNX folder at
# VOCODER_OUT, which VOCODER=... bundles. Session 28 measured it (docs/results.md): a little
# clearer on piper's own units, not on the decoders', so the committed vocoder stays
if [ "$STEP" != all ] && run vocoder; then
  VOC_RUN=${VOC_RUN:-$R/u2m}; VOC_STEPS=${VOC_STEPS:-1200}; VOC_ROUNDS=${VOC_ROUNDS:-2}
  [ -f "$DATA/train/tts_units.jsonl" ] || die "vocoder: no $DATA/train/tts_units.jsonl: run STEP=units first"
  .venv/bin/python - "$DATA/train" <<'PY'
import json, random, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = [l for f in ("tts_units.jsonl", "answers_extra_units.jsonl") if (d / f).is_file()
        for l in (d / f).read_text().splitlines()
        if l.strip() and all(json.loads(l).get(k) for k in ("units", "counts", "audio"))]
random.Random(0).shuffle(rows)  # the last 40 are the held-out pairs
(d / "vocoder_units.jsonl").write_text("\n".join(rows) + "\n")
PY
  init=recipes/tiny/vocoder-k500/vocoder-v1
  for ((k = 1; k <= VOC_ROUNDS; k++)); do
    # a round stopped before its end goes on from its last save (OUT/unit2mel; its schedule
    # starts again): echox vocoder train refuses to start that --out afresh
    [ -d "$VOC_RUN-$k/unit2mel" ] && init=$VOC_RUN-$k/unit2mel
    [ -f "$VOC_RUN-$k/model/config.json" ] || $ECHOX vocoder train --init "$init" \
        --data "$DATA/train/vocoder_units.jsonl" --segment-frames 256 --holdout 40 --eval-every 200 \
        --save-every 200 --batch-size 16 --lr 2e-4 --max-steps "$((VOC_STEPS * k))" \
        --threads "$THREADS" --set train.seed=$((k - 1)) --out "$VOC_RUN-$k"
    init=$VOC_RUN-$k/model
  done
  $ECHOX vocoder onnx --vocoder "$init" --calibrate "$DATA/train/tts_units.jsonl" --int8-stages 1,2 \
      --float16 --threads "$THREADS" --force --out "${VOCODER_OUT:-$R/vocoder}"
fi
if run bundle; then  # slim bundles: runs/tiny/bundle-<run folder's name>
  made=0
  for run_dir in "$ECHO_RUN" "$GOLD_RUN"; do
    if [ -d "$run_dir/model" ]; then
      $ECHOX bundle --model "$run_dir/model" --vocoder "$VOCODER" "${ul[@]}" \
          --unit-beams "$UNIT_BEAMS" --slim --force --out "$R/bundle-$(basename "$run_dir")"
      made=$((made + 1))
    else
      echo "bundle: no $run_dir/model (STEP=$([ "$run_dir" = "$ECHO_RUN" ] && echo echo || echo gold) makes it); skipped" >&2
    fi
  done
  [ "$made" -gt 0 ] || ! named bundle || die "bundle: no trained Stage III model to bundle: run STEP=echo (and gold) first"
fi
if run eval; then  # the model card's table on the 300 test questions (bench/tiny_results.py):
  # text LLM, S2T, S2S, espeak-ng S2T, ASR-WER, T2C WER, first-audio latency, the gap's interval
  .venv/bin/python bench/tiny_results.py --echo "$R/bundle-$(basename "$ECHO_RUN")" \
      --gold "$R/bundle-$(basename "$GOLD_RUN")" --t2c "$T2C_MODEL" --data "$DATA/test" \
      --config recipes/tiny/model.yaml --out "${RESULTS:-$R/results}" --threads "$THREADS"
fi
